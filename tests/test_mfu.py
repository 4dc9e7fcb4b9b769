"""The peak behind MFU on a CPU (gpt2_jax/model/flops.py): the median of several timed matmuls, measured once when
a run starts and kept for the whole run, so a log line's MFU moves only with its tokens/s."""

from __future__ import annotations

import json
import math
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
    assert "MFU against 0.001 TFLOP/s (float32 2048x2048 matmul measured at start-up on cpu, median of 7)" in (
        capsys.readouterr().out
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_token = [r["mfu"] / r["tokens_per_s"] for r in records if "mfu" in r]
    assert len(per_token) == 4 and all(math.isclose(x, per_token[0], rel_tol=1e-9) for x in per_token)
