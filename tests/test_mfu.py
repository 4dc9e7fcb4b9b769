"""The peak behind MFU (gpt2_jax/model/flops.py): on a CPU the median of several timed matmuls, measured once when a
run starts and kept for the whole run, so a log line's MFU moves only with its tokens/s; on an accelerator the
datasheet figure of the device kind JAX reports, per compute dtype; for an accelerator the table does not know, no
figure at all: "MFU unavailable", the device named."""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path

import pytest

from gpt2_jax.model import flops
from gpt2_jax.training import setup
from gpt2_jax.training.loop import run_training

ROOT = Path(__file__).resolve().parent.parent


def test_the_matmul_peak_is_the_median_timing(monkeypatch):
    durations = iter([1.0, 100.0, 2.0, 3.0, 2.5])  # one slow outlier (another program held the cores)
    clock = {"now": 0.0}

    def perf_counter() -> float:  # called at each timing's start and end: advance by the next duration at its end
        clock["tick"] = not clock.get("tick", False)
        if not clock["tick"]:
            clock["now"] += next(durations)
        return clock["now"]

    monkeypatch.setattr(flops, "time", types.SimpleNamespace(perf_counter=perf_counter))
    rate = flops.measure_matmul_flops("float32", n=8, repeats=5)
    assert rate == 2 * 8**3 / 2.5  # the median of 1, 100, 2, 3, 2.5; the best (1) would overstate the peak


@pytest.fixture
def counted_peak(monkeypatch):
    """measure_matmul_flops replaced by a counter returning 1 GFLOP/s; the per-process peak cache emptied around."""
    calls = []

    def measure(dtype: str = "float32", **kwargs) -> float:
        calls.append(dtype)
        return 1e9

    monkeypatch.setattr(flops, "measure_matmul_flops", measure)
    setup._peak_flops.cache_clear()
    yield calls
    setup._peak_flops.cache_clear()  # later runs in this process measure for real


def test_a_run_measures_the_peak_once_and_keeps_it(counted_peak, corpus, tmp_path, capsys):
    flags = dict(
        init="scratch:tiny", dataset=str(corpus), seq_len=16, batch_size=2, steps=4, log_every=1, val_every=1,
        val_batches=1, sample_num=0, out=str(tmp_path / "run"),
    )  # fmt: skip
    assert run_training(flags, bundled_dataset=str(ROOT / "data" / "shakespeare")) == 0
    assert counted_peak == ["float32"]  # at start-up only: validation no longer re-measures
    out = capsys.readouterr().out
    assert "MFU against 0.001 TFLOP/s (float32 2048x2048 matmul measured at start-up on cpu, median of 7)" in out
    assert "; float32 compute (the default on CPUs, where 16-bit matmuls are slower), float32 params" in out
    assert re.search(r"\nmemory: about \S+ MiB per device \(state \S+ MiB \+ gradients \S+ MiB \+ activations \S+ "
                     r"MiB\), estimated before compiling\n", out)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_token = [r["mfu"] / r["tokens_per_s"] for r in records if "mfu" in r]
    assert len(per_token) == 4 and all(math.isclose(x, per_token[0], rel_tol=1e-9) for x in per_token)


# Device kinds as JAX reports them, and the datasheet figures (TFLOP/s per device: bfloat16, float16, float32).
KINDS = {
    "Tesla T4": (8.1, 65, 8.1),
    "Tesla V100-SXM2-16GB": (15.7, 125, 15.7),
    "Tesla V100-SXM2-32GB": (15.7, 125, 15.7),
    "Tesla V100-PCIE-32GB": (14, 112, 14),
    "Tesla V100S-PCIE-32GB": (16.4, 130, 16.4),
    "NVIDIA A10G": (70, 70, 35),
    "NVIDIA A10": (125, 125, 62.5),
    "NVIDIA L4": (121, 121, 60),
    "NVIDIA L40S": (362, 362, 183),
    "NVIDIA A100-SXM4-40GB": (312, 312, 156),
    "NVIDIA A100-SXM4-80GB": (312, 312, 156),
    "NVIDIA A100-PCIE-40GB": (312, 312, 156),
    "NVIDIA A100 80GB PCIe": (312, 312, 156),
    "NVIDIA GeForce RTX 3090": (71, 71, 35.6),
    "NVIDIA GeForce RTX 4090": (165.2, 165.2, 82.6),
    "NVIDIA H100 80GB HBM3": (989, 989, 494.5),
    "NVIDIA H100 PCIe": (756, 756, 378),
    "NVIDIA H200": (989, 989, 494.5),
    "TPU v2": (22.5, None, 22.5),  # half a chip: JAX makes each of its two TensorCores a device
    "TPU v3": (61.5, None, 61.5),
    "TPU v4": (275, None, 275),
    "TPU v5 lite": (197, None, 197),
    "TPU v5e": (197, None, 197),
    "TPU v5": (459, None, 459),
    "TPU v5p": (459, None, 459),
    "TPU v6 lite": (918, None, 918),
    "TPU v6e": (918, None, 918),
}


@pytest.mark.parametrize("kind", KINDS)
def test_the_datasheet_peak_of_each_card_and_dtype(kind):
    expected = dict(zip(("bfloat16", "float16", "float32"), KINDS[kind], strict=True))
    for dtype, tflops in expected.items():
        peak = flops.known_peak_flops(kind, dtype)
        assert peak == (None if tflops is None else pytest.approx(tflops * 1e12)), (kind, dtype, peak)


def test_an_unknown_accelerator_has_no_peak_and_says_so():
    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA RTX PRO 6000 Blackwell")
    assert flops.peak_flops(gpu, "bfloat16") == (
        None,
        "MFU unavailable: no datasheet peak for NVIDIA RTX PRO 6000 Blackwell in bfloat16",
    )
    tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v3")
    assert flops.peak_flops(tpu, "float16")[0] is None  # no float16 matrix path on a TPU
    assert flops.peak_flops(tpu, "bfloat16") == (61.5e12, "datasheet (TPU v3)")


def test_a_run_without_a_known_peak_logs_mfu_unavailable(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(setup, "_peak_flops", lambda device, dtype: (None, "MFU unavailable: no datasheet peak for X"))
    flags = dict(
        init="scratch:tiny", dataset=str(corpus), seq_len=16, batch_size=2, steps=2, log_every=1, val_every=0,
        sample_num=0, out=str(tmp_path / "run"),
    )  # fmt: skip
    assert run_training(flags, bundled_dataset=str(ROOT / "data" / "shakespeare")) == 0
    out = capsys.readouterr().out
    assert "\nMFU unavailable: no datasheet peak for X\n" in out and " mfu=n/a\n" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and not any("mfu" in r for r in records)
