"""The benchmark suite: its toy sweep end to end (so it cannot rot), the scaling sweep at toy size on 2 of 8 host
devices, the FLOP and byte counts, the PyTorch reference's weights, the report, the data benchmark at toy size.

The toy suite runs in-process at the smallest shapes with two timed runs per point; it checks the JSON schema and
that the derived numbers agree with each other, never how fast anything is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import bandwidth, report, suite
from benchmarks import train as train_bench
from benchmarks.__main__ import build_sweeps, parse_args, pytorch_available, use_host_devices
from benchmarks.__main__ import main as bench_main
from gpt2_jax.config import get_config
from gpt2_jax.errors import UsageError
from gpt2_jax.model.flops import flops_per_token
from gpt2_jax.model.transformer import GPT2, init_params
from gpt2_jax.training.setup import default_scan_unroll

REPO = Path(__file__).resolve().parent.parent
HANG_S = 900  # a subprocess still running after this is hung: a loaded machine may be ten times slower, not this

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


def test_copy_bandwidth_is_the_bytes_moved_over_the_fastest_copy(monkeypatch):
    # A clock of our own: on a loaded machine a real 1 MiB copy may take any time, so no rate is a safe lower bound.
    ticks = iter([0.0, 0.25, 1.0, 1.125])  # two timed copies, of 1/4 s and 1/8 s (exact in binary)
    monkeypatch.setattr(bandwidth, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert bandwidth.measure_copy_bandwidth(1 << 20, repeats=2) == 2 * (1 << 20) * 8  # read + write, best of two
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
            assert p["scan_unroll"] == default_scan_unroll(config)  # what train.py runs here
            assert "scaling_efficiency" not in p  # one device count only
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


def test_a_decode_sweep_of_fused_layers_runs_them_and_marks_its_points(monkeypatch):
    """The GPU call's A/B (benchmarks/gpu/decode.py): the sweep's `kernels` reaches the weights the loop runs (the
    same arrays), its points say "pallas", and a failure of the fused layers is that point's error alone."""
    ran = []

    def fake_time_ours(weights, *args, **kwargs):
        ran.append(weights)
        if weights.kernels == "pallas":
            raise RuntimeError("Triton could not compile ln_linear")
        return {"compile_s": 1.0, "prefill_s": [0.1], "decode_s": [0.3], "kernels": {"kernels_per_step": 9.0}}

    monkeypatch.setattr(suite.decode, "time_ours", fake_time_ours)
    runner = suite.Runner(repeats=1, log=lambda line: None)
    runner._bandwidth = 1e10  # nothing timed
    xla = suite.Sweep("decode", ("tiny",), (1,), seq=4, new_tokens=4)
    points = runner.run([xla, dataclasses.replace(xla, kernels="pallas"), dataclasses.replace(xla, batches=(2,))])
    assert [w.kernels for w in ran] == ["xla", "pallas", "xla"] and ran[0].wte is ran[1].wte
    assert [(p["job"], p["batch"], p.get("kernels"), "error" in p) for p in points] == [
        ("prefill", 1, None, False), ("decode", 1, None, False), ("decode", 1, "pallas", True),
        ("prefill", 2, None, False), ("decode", 2, None, False),
    ]  # fmt: skip
    assert "Triton could not compile" in points[2]["error"]


def test_compare_is_skipped_in_one_line_without_torch(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    lines = []
    assert not pytorch_available(lines.append)
    assert lines == ["PyTorch comparison skipped: torch not installed (pip install torch transformers)."]


def test_bad_flags_are_usage_errors():
    with pytest.raises(UsageError):
        bench_main(["--job", "decode", "--preset", "tiny", "--repeats", "0"])
    with pytest.raises(UsageError, match="every value must be at least 1"):
        bench_main(["--batch", "0,2"])
    with pytest.raises(UsageError, match="longer than tiny's context of 128"):
        bench_main(["--job", "train", "--preset", "tiny", "--seq", "500"])
    with pytest.raises(UsageError, match="--preset, --devices shape a sweep of your own"):  # ignored silently before
        build_sweeps(parse_args(["--suite", "quick", "--preset", "tiny", "--devices", "2"]))
    with pytest.raises(UsageError):
        build_sweeps(parse_args(["--suite", "scaling", "--seq", "0"]))
    (fused,) = build_sweeps(parse_args(["--job", "decode", "--batch", "1", "--kernels", "pallas"]))
    assert (fused.job, fused.batches, fused.kernels) == ("decode", (1,), "pallas")
    assert np.isfinite(suite.resolve_devices("all"))


def test_sweeps_resolve_devices_batches_attention_and_scan_unroll():
    n = len(jax.local_devices())
    weak = suite.Sweep("train", ("tiny",), (4,), seq=16, devices=("all",), batch_per_device=True)
    (spec,) = [suite._resolve(weak, s) for s in weak.grid()]
    assert spec["devices"] == str(n) and spec["batch"] == 4 * n
    assert spec["attention"] == "xla"  # 'auto' on a CPU
    assert spec["scan_unroll"] == 1  # train.py's default on a CPU
    unrolled = suite.Sweep("train", ("tiny",), (2,), seq=16, scan_unroll=(None, 2, 99))
    assert [suite._resolve(unrolled, s)["scan_unroll"] for s in unrolled.grid()] == [1, 2, 2]  # clamped to n_layer
    decoding = suite.Sweep("decode", ("tiny",), (1,), seq=4)
    assert [suite._resolve(decoding, s)["attention"] for s in decoding.grid()] == ["-"]
    for name in suite.SUITE_NAMES:  # every named sweep builds valid configs
        for sweep in suite.named_suite(name):
            assert all(get_config(p) for p in sweep.presets), name


def test_scaling_suite_splits_one_global_batch():
    (cpu,) = suite.scaling_suite(8, "cpu")
    assert (cpu.presets, cpu.batches, cpu.seq, cpu.dtype) == (("mini",), (8,), 256, "float32")
    assert cpu.devices == ("1", "2", "4", "8") and not cpu.batch_per_device
    (one_gpu,) = suite.scaling_suite(1, "gpu")
    assert (one_gpu.presets, one_gpu.batches, one_gpu.dtype, one_gpu.devices) == (("124M",), (32,), "bfloat16", ("1",))
    (six,) = suite.scaling_suite(6, "gpu")
    assert six.devices == ("1", "2", "4", "6") and six.batches == (36,)  # a multiple of 12 from 32 up
    # Flags change the suite's points and keep the rest.
    (mine,) = build_sweeps(parse_args(["--suite", "scaling", "--preset", "tiny", "--devices", "1,2", "--seq", "8"]))
    assert mine.presets == ("tiny",) and mine.devices == ("1", "2") and mine.seq == 8


def test_scaling_efficiency_is_over_the_ideal_speedup():
    def point(devices, tokens_per_s, peak):
        config = dict(preset="124M", n_layer=12, n_embd=768, batch=32, seq=1024, dtype="bfloat16", attention="cudnn")
        return dict(job="train", **config, remat=False, scan_unroll=12, devices=devices, tokens_per_s=tokens_per_s,
                    peak_flops=peak)  # fmt: skip

    gpus = [point(1, 100.0, 1e15), point(4, 360.0, 4e15)]  # accelerators: the ideal is N times the rate
    cpus = [point(1, 100.0, 1e11), point(8, 90.0, 1e11)]  # host devices share the cores: the ideal is the same rate
    cpus[1]["preset"] = cpus[0]["preset"] = "mini"
    alone = point(1, 50.0, 1e15) | {"batch": 16}  # no other device count at its batch: left alone
    suite.add_scaling([*gpus, *cpus, alone])
    assert [p["speedup"] for p in gpus] == [1.0, 3.6] and gpus[1]["scaling_efficiency"] == pytest.approx(0.9)
    assert cpus[1]["speedup"] == cpus[1]["scaling_efficiency"] == pytest.approx(0.9)
    assert "scaling_efficiency" not in alone
    table = report.format_table([*gpus, alone])
    assert "scaling" in table.splitlines()[0] and "90.0%" in table and "cost of data parallelism" in table


def test_scaling_suite_runs_on_host_devices(tmp_path):
    # No XLA flag set: `--suite scaling` splits the CPU into 8 devices itself; toy sizes on 1 and 2 of them.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = tmp_path / "scaling.json"
    argv = ["--suite", "scaling", "--preset", "tiny", "--batch", "4", "--seq", "16", "--devices", "1,2"]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", *argv, "--repeats", "1", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["environment"]["device_count"] == suite.SCALING_HOST_DEVICES
    points = results["points"]
    assert [(p["job"], p["devices"], p["batch"], p["preset"]) for p in points] == [
        ("train", 1, 4, "tiny"),
        ("train", 2, 4, "tiny"),
    ]
    one, two = points
    assert one["speedup"] == one["scaling_efficiency"] == 1.0
    assert math.isclose(two["speedup"], two["tokens_per_s"] / one["tokens_per_s"], rel_tol=1e-9)
    assert math.isclose(two["scaling_efficiency"], two["speedup"], rel_tol=1e-9)  # one CPU's peak for both
    assert all(p["scan_unroll"] == 1 and p["tokens_per_s"] > 0 for p in points)
    assert "scaling" in result.stdout and "cost of data parallelism" in result.stdout


def test_host_devices_leave_a_chosen_count_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.config, "update", lambda *a: calls.append(a))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    use_host_devices(8)
    assert calls == []
    monkeypatch.setenv("XLA_FLAGS", "")
    use_host_devices(8)
    assert calls == [("jax_num_cpu_devices", 8)]


def test_pytorch_reference_holds_our_weights():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    config = get_config("tiny")
    params = init_params(config, 0)
    tokens_BT = np.random.default_rng(0).integers(0, config.n_vocab, (2, 16))
    ours = np.asarray(GPT2(config).apply({"params": params}, tokens_BT))
    model = train_bench.torch_model(config, params, attention="eager").eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as GPT-2's head is
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens_BT)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


# --- torch.compile as the second PyTorch column --------------------------------------------------------------
def test_toy_suite_times_pytorch_under_torch_compile_too(toy_run):
    _, results = toy_run
    for p in results["points"]:
        if p["job"] in ("train", "decode"):
            assert p["pytorch_compiled_backend"] == "eager"  # the toy suite's: graph capture, no code generation
            assert p["pytorch_compiled_tokens_per_s"] > 0 and "pytorch_compiled_error" not in p
            expected = p["tokens_per_s"] / p["pytorch_compiled_tokens_per_s"]
            assert math.isclose(p["ratio_compiled"], expected, rel_tol=1e-9)
    header = report.format_table(results["points"]).splitlines()[0]
    assert header.split()[-6:] == ["PyTorch", "tok/s", "ratio", "torch.compile", "tok/s", "ratio"]


def test_a_pytorch_column_that_cannot_run_is_na_with_its_reason(toy_run):
    from benchmarks import compare

    def fails():
        raise RuntimeError("inductor needs a C++ compiler\nthe rest of its message")

    point, logged = {"tokens_per_s": 100.0}, []
    compare.add_column(point, "pytorch", 1000, lambda: [10.0, 5.0, 20.0], logged.append)
    compare.add_column(point, "pytorch_compiled", 1000, fails, logged.append, "inductor")
    assert (point["pytorch_tokens_per_s"], point["ratio"]) == (100.0, 1.0)  # the median of 100, 200 and 50 tok/s
    reason = "RuntimeError: inductor needs a C++ compiler"
    assert point["pytorch_compiled_error"] == reason and "ratio_compiled" not in point
    assert point["pytorch_compiled_backend"] == "inductor"
    assert logged == [f"torch.compile comparison failed: {reason}"]
    assert compare.ratio_text(point) == f" | PyTorch 100.0 tok/s, ratio 1.00x; torch.compile n/a ({reason})"
    decode = next(p for p in toy_run[1]["points"] if p["job"] == "decode")
    failed = {k: v for k, v in decode.items() if not k.startswith(("pytorch_compiled", "ratio_compiled"))}
    row = report.format_table([failed | {"pytorch_compiled_error": reason}]).splitlines()[2]
    assert row.split()[-4:-2] != ["n/a", "n/a"] and row.split()[-2:] == ["n/a", "n/a"]


def test_torch_compile_flag_sets_the_backend_of_every_sweep():
    def backends(*argv):
        return {sweep.torch_compile for sweep in build_sweeps(parse_args(list(argv)))}

    assert backends("--suite", "toy") == {"eager"} and backends("--suite", "quick") == {"inductor"}
    assert backends("--suite", "quick", "--torch_compile", "off") == {None}
    mine = ("--job", "train", "--preset", "tiny", "--seq", "32")
    assert backends(*mine) == {"inductor"} and backends(*mine, "--torch_compile", "aot_eager") == {"aot_eager"}
    with pytest.raises(UsageError, match="invalid choice: 'fastest'"):
        parse_args(["--torch_compile", "fastest"])


# --- the GPU call (benchmarks/gpu/; its peers: tests/test_gpu_peers.py) -------------------------------------------
def test_gpu_call_checks_the_production_step_against_a_plain_loss(toy_run):
    from benchmarks.gpu import train as gpu_train

    (train,) = [p for p in toy_run[1]["points"] if p["job"] == "train"]
    batch_BT1 = train_bench.random_batch(get_config("tiny"), train["batch"], train["seq"])  # the toy point's batch
    plain = gpu_train.plain_first_step(train, batch_BT1)
    check = gpu_train.loss_check(train, plain)  # the toy point's first step: tiny, float32, the fused head
    assert check["ok"] and check["loss_diff"] <= 1e-4 and check["grad_norm_rel_diff"] <= 1e-4
    assert plain["loss"] == pytest.approx(math.log(50257), rel=0.05)  # a random model: about uniform
    assert not gpu_train.loss_check(train | {"first_loss": train["first_loss"] + 0.02}, plain)["ok"]
    assert not gpu_train.loss_check(train | {"first_grad_norm": train["first_grad_norm"] * 1.02}, plain)["ok"]


def gpu_records() -> list[dict]:
    """A GPU call's records as the parts write them (numbers made up, on an H100's peak)."""

    def point(part, job, batch, tokens_per_s, **fields):
        return dict(kind="point", part=part, job=job, preset="124M", n_layer=12, n_embd=768, batch=batch, seq=1024,
                    dtype="bfloat16", devices=1, tokens_per_s=tokens_per_s, xla_flags="") | fields  # fmt: skip

    def decode(part, batch, new_tokens, tokens_per_s, of_bw, sampling="top-k 40", **fields):
        return point(part, "decode", batch, tokens_per_s, new_tokens=new_tokens, per_token_ms=0.25, seq=16,
                     bandwidth_fraction=of_bw, bound_ms_per_step=0.1, sampling=sampling, **fields)  # fmt: skip

    def peer(name, batch, tokens_per_s, **fields):
        return point(name.lower(), "train", batch, tokens_per_s, peer=name, mfu=tokens_per_s * 855166464 / 989e12,
                     step_ms=batch * 1024 / tokens_per_s * 1e3, **fields)  # fmt: skip

    def serve(clients, tokens_per_s, ttft):
        return dict(kind="point", part="serve", job="serve", preset="124M", n_layer=12, n_embd=768, dtype="bfloat16",
                    clients=clients, requests=4 * clients, seq=16, new_tokens=128, max_batch=16, chunk=None,
                    max_len=192, tokens_per_s=tokens_per_s, ttft_p50_s=ttft / 2, ttft_p99_s=ttft, latency_p50_s=1.0,
                    latency_p99_s=1.5, wall_s=3.0)  # fmt: skip

    train_pattern = "/w/shards/shakespeare_train_*.bin"
    smi = {"name": "NVIDIA H100 80GB HBM3", "power.limit": "700.00 W", "clocks.max.sm": "1980 MHz"}
    return [
        dict(kind="device", part="device", environment={"device_kind": "NVIDIA H100 80GB HBM3"}, nvidia_smi=smi,
             peak_flops=989e12, peak_source="datasheet (NVIDIA H100 80GB HBM3)", bf16_matmul_tflops=790.0,
             copy_gb_per_s=3000.0),
        dict(kind="shards", part="shards", command="gpt2-jax prepare data/shakespeare /w/shards", shards=[{}] * 4,
             tokens=456429, train_pattern=train_pattern, ok=True, error=None),
        point("train", "train", 32, 560_000.0, mfu=0.484, data=train_pattern),
        dict(kind="check", part="train", batch=32, loss=11.0, plain_loss=11.001, loss_diff=1e-3, grad_norm=1.0,
             plain_grad_norm=1.002, grad_norm_rel_diff=0.002, ok=True),
        point("train", "train", 64, 590_000.0, mfu=0.51, data=train_pattern),
        dict(kind="peer_build", part="llmc", peer="llm.c", ok=True),
        peer("llm.c", 32, 480_000.0, data=train_pattern, mfu_printed=0.38),
        peer("llm.c", 64, 500_000.0, data=train_pattern, mfu_printed=0.39),
        peer("nanoGPT", 32, 470_000.0, mfu_printed=1.2),
        point("nanogpt", "train", 64, None, peer="nanoGPT", error="exit code 1"),
        decode("decode", 1, 128, 4_100.0, 0.2, kernels_per_step=190.0),
        decode("decode", 1, 128, 4_600.0, 0.22, sampling="greedy"),
        decode("decode", 64, 128, 70_000.0, 0.25),
        decode("decode", 64, 1000, 60_000.0, 0.2),
        decode("decode", 1, 128, 5_125.0, 0.3, kernels="pallas", kernels_per_step=80.0),
        point("decode", "decode", 1, None, new_tokens=128, sampling="greedy", kernels="pallas", error="Triton failed"),
        serve(1, 1000.0, 0.02), serve(16, 12_000.0, 0.05), serve(64, 13_000.0, 0.9),
        dict(kind="lora", part="lora", variant="lora", remat=False, median_step_s=0.2, device_peak_bytes=9 * 2**30,
             trainable_params=2_457_600),
        dict(kind="lora", part="lora", variant="full", remat=False, error="stopped after 40 s"),
        decode("decode_pytorch", 1, 128, 4_000.0, 0.2, pytorch_tokens_per_s=100.0, ratio=40.0,
               pytorch_compiled_error="RuntimeError: no compiler"),
        dict(kind="profile", part="profile", job="decode", **{"decode_trace top-k 40": dict(
            kernels_per_step=193.2, busy_ms_per_step=0.41, step_ms=0.43)}),
        dict(kind="profile", part="profile", job="decode", kernels="pallas", error="XlaRuntimeError: Triton"),
        dict(kind="numerics", part="check", bf16_xla_rel_err=0.01, bf16_xla_loss=11.0,
             fused_vs_xla_cached_bf16_rel_err=0.002, fused_same_argmax=0.99),
        dict(kind="skipped", part="topk", reason="budget: 10 s < 20 s"),
        dict(kind="part", part="topk", status="stopped at its limit"),
    ]  # fmt: skip


def test_gpu_call_summary_says_which_goals_were_met(tmp_path):
    from benchmarks.gpu import summary

    lines = [json.dumps(r) for r in gpu_records()] + ['{"kind": "point", "pa']  # the last cut short by a kill
    (tmp_path / "records.jsonl").write_text("\n".join(lines), encoding="utf-8")
    saved = summary.write(str(tmp_path), dry=False)
    text = (tmp_path / "summary.txt").read_text(encoding="utf-8")
    assert "power.limit 700.00 W" in text and "790 TFLOP/s bf16 matmul" in text
    assert "[met] issue 21: training 124M, T=1024, bfloat16, ours: MFU >= 50%; measured: batch 32: 560,000" in text
    assert "[met] issue 21: first step against a plain-loss step" in text
    # Each at its best batch: ours 590,000 (64) over llm.c's 500,000 (64) is 1.18x; over nanoGPT's 470,000, 1.26x.
    assert "[met] issue 21: ours / llm.c, each at its best batch: >= 1.15x tokens/s; measured: ours batch 64" in text
    assert "= 1.18x" in text and "[NOT met] issue 21: ours / nanoGPT" in text and "= 1.26x" in text
    assert "[met] issue 22: llm.c and ours train on gpt2-jax prepare's shards" in text and "llm.c: yes" in text
    assert "lora: 200 ms/step, device peak 9.00 GiB, 2,457,600 trainable params; full: stopped after 40 s" in text
    assert "[met] issue 20: decode batch 1, 16+128 tokens, top-k 40: >= 4,000 tok/s" in text
    assert "190 kernels/step" in text and "greedy: for the record; measured: 4,600 tok/s" in text
    assert "[NOT met] issue 20: kernels per batch-1 decode step, top-k 40: <= 60" in text
    assert "[NOT met] issue 20: decode batch 64: >= 30% of the bandwidth bound" in text
    # The fused layers' A/B: beside XLA's batch-1 point, which the goals above keep reading; a failed point says so.
    assert (
        "decode batch 1 in the fused Pallas layers: for the record: the default stays XLA's until this is faster; "
        "measured: top-k 40: 5,125 tok/s, 0.250 ms/step, 30.0% of the bound (0.100 ms/step), 80 kernels/step, 1.25x "
        "XLA's; greedy: FAILED: Triton failed" in text
    )
    assert "16 clients: 12,000 tok/s (12.00x 1 client), TTFT p99 0.050 s" in text
    assert "top-k 40: 193 kernels/step, 95% busy; pallas layers: FAILED: XlaRuntimeError: Triton" in text
    assert "check: bf16_xla_rel_err 0.01, fused_vs_xla_cached_bf16_rel_err 0.002, fused_same_argmax 0.99" in text
    assert "batch 1: PyTorch 40.00x, torch.compile n/a" in text
    assert "skipped: topk : budget: 10 s < 20 s" in text and "part: topk : stopped at its limit" in text
    assert "llm.c    batch  64: 500,000 tok/s" in text and "nanoGPT  batch  64: FAILED: exit code 1" in text
    assert os.path.basename(saved).startswith("h100-80gb-hbm3-verify-")  # a name for benchmarks/results/
    results = report.read_json(saved)
    assert [g["met"] for g in results["goals"][:5]] == [True, True, True, False, True]
    assert len(results["points"]) == 16 and results["checks"][0]["ok"] and len(results["lora"]) == 2


def test_data_benchmark_runs_at_toy_size_and_writes_its_points(tmp_path, capsys):
    from benchmarks import data as data_bench

    out = tmp_path / "data.json"
    toy = ["--text_mb", "0.3", "--workers", "1", "--shards", "2", "--shard_tokens", "50000", "--batch", "4"]
    assert data_bench.main([*toy, "--seq", "64", "--steps", "3", "--json", str(out)]) == 0
    results = json.loads(out.read_text(encoding="utf-8"))
    assert {"host_cpu", "cores_usable", "tiktoken", "pyarrow", "date"} <= set(results["environment"])
    reference, prepared, *batches = results["points"]
    assert (reference["job"], prepared["job"], [b["job"] for b in batches]) == ("tiktoken", "prepare", ["batches"] * 2)
    # The same text both ways (0.3 MB: two plays and part of a third), plus the <|endoftext|> prepare puts before
    # each document.
    assert prepared["text_bytes"] == reference["text_bytes"] and prepared["documents"] == 3
    assert prepared["tokens"] == reference["tokens"] + prepared["documents"]
    assert math.isclose(prepared["vs_tiktoken"], prepared["mb_per_s_per_worker"] / reference["mb_per_s"])
    assert [(b["shards"], b["tokens_in_shards"]) for b in batches] == [(2, 100_000), (1, 50_000)]
    for b in batches:
        assert b["tokens_per_s"] > 0 and b["meets_goal"] == (b["tokens_per_s"] >= b["goal_tokens_per_s"] == 1e6)
    printed = capsys.readouterr().out
    assert "MB/s per worker" in printed and "tiktoken per core" in printed and "1M tok/s goal" in printed
