"""The benchmark suite: its toy sweep end to end (so it cannot rot), the FLOP and byte counts, the report.

The toy suite runs in-process at the smallest shapes with one timed run per point; it checks the JSON schema and
that the derived numbers agree with each other, never how fast anything is.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from benchmarks import bandwidth, report, suite
from benchmarks.__main__ import main as bench_main
from benchmarks.__main__ import pytorch_available
from gpt2_jax.config import get_config
from gpt2_jax.flops import flops_per_token

POINT_FIELDS = {
    "job", "preset", "n_layer", "n_embd", "batch", "seq", "dtype", "attention", "remat", "devices", "tokens_per_s",
    "tokens_per_s_min", "tokens_per_s_max", "repeats", "compile_s", "model_flops_per_s", "memory_bytes_in_use",
    "memory_peak_bytes",
}  # fmt: skip
ENVIRONMENT_FIELDS = {
    "device_kind", "platform", "device_count", "jax", "jaxlib", "flax", "optax", "xla_flags", "date", "host_cpu_count",
}  # fmt: skip


def test_flops_per_token_124M_by_hand():
    # nanoGPT: 6N + 12 L H Q T with N = 124,439,808 - wpe (1024 x 768) = 123,653,376.
    six_n = 6 * 123_653_376
    attention = 12 * 12 * 12 * 64 * 1024
    assert six_n + attention == 855_166_464
    assert flops_per_token(get_config("124M"), 1024) == 855_166_464
    assert flops_per_token(get_config("124M"), 1024, training=False) == 855_166_464 / 3


def test_decode_bound_by_hand():
    config = get_config("124M")
    assert bandwidth.weight_bytes(config, "bfloat16") == 2 * 123_653_376  # the 249 MB of GUIDE.md, minus wpe
    # keys + values, 12 layers, batch 8, 100 positions, 768 wide, 4 bytes
    assert bandwidth.kv_cache_bytes(config, 8, 100, "float32") == 2 * 12 * 8 * 100 * 768 * 4
    bound = bandwidth.decode_bound(
        config, batch=8, prompt_len=36, new_tokens=128, dtype="float32", seconds_per_step=0.05, bandwidth=20e9
    )
    expected_bytes = 4 * 123_653_376 + 2 * 12 * 8 * 100 * 768 * 4  # mean context 36 + 128 / 2 = 100
    assert bound["bytes_per_step"] == expected_bytes
    assert math.isclose(bound["bandwidth_fraction"], expected_bytes / 20e9 / 0.05)


def test_copy_bandwidth_is_measured():
    assert bandwidth.measure_copy_bandwidth(1 << 20, repeats=2) > 1e8  # any real memory moves > 0.1 GB/s
    assert set(bandwidth.memory_in_use()) == {"memory_bytes_in_use", "memory_peak_bytes"}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--suite", "toy", "--compare", "pytorch", "--repeats", "2"]
    bench_main([*argv, "--json", str(out / "r.json"), "--plot", str(out / "r.png")])
    with open(out / "r.json", encoding="utf-8") as f:
        return out, json.load(f)


def test_toy_suite_json_schema(toy_run):
    _, results = toy_run
    assert ENVIRONMENT_FIELDS <= set(results["environment"])
    points = results["points"]
    assert {p["job"] for p in points} == {"train", "prefill", "decode"}
    for p in points:
        assert "error" not in p, p
        assert POINT_FIELDS <= set(p), POINT_FIELDS - set(p)
        assert p["tokens_per_s_min"] <= p["tokens_per_s"] <= p["tokens_per_s_max"] and p["repeats"] == 2
        assert p["compile_s"] is not None


def test_toy_suite_derived_numbers_agree(toy_run):
    _, results = toy_run
    for p in results["points"]:
        config = get_config(p["preset"])
        if p["job"] == "train":
            expected_flops = p["tokens_per_s"] * flops_per_token(config, p["seq"])
            assert math.isclose(p["model_flops_per_s"], expected_flops, rel_tol=1e-9)
            assert math.isclose(p["mfu"], p["model_flops_per_s"] / p["peak_flops"], rel_tol=1e-9)
            assert "measured" in p["peak_source"]  # a CPU: the peak is a matmul timed in this run
        if p["job"] == "decode":
            assert 0 < p["bandwidth_fraction"] and p["per_token_ms"] > 0
        if p["job"] in ("train", "decode"):  # every toy point is compared with PyTorch
            assert p["pytorch_tokens_per_s"] > 0
            assert math.isclose(p["ratio"], p["tokens_per_s"] / p["pytorch_tokens_per_s"], rel_tol=1e-9)


def test_toy_suite_table_and_plot(toy_run, capsys):
    out, results = toy_run
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.format_table(results["points"])
    lines = table.splitlines()
    assert "tok/s" in lines[0] and "ratio" in lines[0]
    assert len(lines) == 2 + len(results["points"])
    # The merge command reads the files back and prints the same table.
    merged = out / "merged.json"
    assert report.main([str(out / "r.json"), str(out / "r.json"), "--json", str(merged)]) == 0
    assert table.splitlines()[2] in capsys.readouterr().out
    assert len(json.loads(merged.read_text(encoding="utf-8"))["points"]) == 2 * len(results["points"])


def test_a_failed_point_is_kept_and_the_run_goes_on():
    logged = []
    runner = suite.Runner(repeats=1, log=logged.append)
    sweeps = [suite.Sweep("train", ("tiny",), (2,), seq=16, devices=("64",))]  # more devices than exist
    (point,) = runner.run(sweeps)
    assert point["job"] == "train" and "64 devices" in point["error"]
    assert any(line.startswith("FAILED") for line in logged)
    assert "FAILED" in report.format_table([point])


def test_compare_is_skipped_in_one_line_without_torch(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    lines = []
    assert not pytorch_available(lines.append)
    assert lines == ["PyTorch comparison skipped: torch not installed (pip install torch transformers)."]


def test_bad_flags_are_usage_errors():
    from gpt2_jax.errors import UsageError

    with pytest.raises(UsageError):
        bench_main(["--job", "decode", "--preset", "tiny", "--repeats", "0"])
    with pytest.raises(SystemExit):
        bench_main(["--batch", "0,2"])
    assert np.isfinite(suite.resolve_devices("all"))


def test_sweeps_resolve_devices_batches_and_attention():
    n = len(jax.local_devices())
    scaling = suite.Sweep("train", ("tiny",), (4,), seq=16, devices=("all",), batch_per_device=True)
    (spec,) = [suite._resolve(scaling, s) for s in scaling.grid()]
    assert spec["devices"] == str(n) and spec["batch"] == 4 * n
    assert spec["attention"] == "xla"  # 'auto' on a CPU
    decoding = suite.Sweep("decode", ("tiny",), (1,), seq=4)
    assert [suite._resolve(decoding, s)["attention"] for s in decoding.grid()] == ["-"]
    for name, sweeps in suite.SUITES.items():  # every named sweep builds valid configs
        for sweep in sweeps:
            assert all(get_config(p) for p in sweep.presets), name
