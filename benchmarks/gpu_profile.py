"""Where a GPU training step or decode loop spends its time: variants timed side by side, and the top kernels of
one traced run.

    python -m benchmarks.gpu_profile --out DIR [--batch 16] [--seq 1024] [--variants base,scan]
    python -m benchmarks.gpu_profile --out DIR --job decode [--decode_batches 1,64] [--new_tokens 128]

Each variant is the real `train_step` (benchmarks/train.py's `time_ours`) on GPT-2 124M in bf16 with a config
change from `base`, which is what train.py runs there (layers unrolled on a GPU); the traced run is `base`. The
trace is read back here (Perfetto JSON written by `jax.profiler`) and summed per kernel name, so the
table needs no TensorBoard. Run on a lent GPU after benchmarks/gpu.sh, to say what limited the sweep.

`--job decode` times the sampler's decode loop (benchmarks/decode.py's `time_ours`: 124M bf16, 16-token prompt)
with top-k 40 and greedy (the difference is what the draw costs per step), then traces one batch-1 top-k run and
says how many kernels a decode step launches and how much of the step they keep the device busy: a step much longer
than its kernels' sum is launch-bound, one close to it is bound by the kernels themselves.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import jax
import numpy as np

from benchmarks import decode as decode_bench
from benchmarks import kernels
from benchmarks.train import model_config, random_batch, time_ours
from gpt2_jax.config import get_config
from gpt2_jax.model.decode import decode_weights
from gpt2_jax.model.flops import flops_per_token
from gpt2_jax.model.transformer import init_params
from gpt2_jax.sampling.processors import SamplingConfig

VARIANTS = {
    "base": {},
    "scan": {"scan_unroll": 1},
    "unroll": {"scan_unroll": 12},
    "remat": {"remat": True},
    "xla_attention": {"attention": "xla"},
}


def top_kernels(trace_dir: str, limit: int = 25) -> list[tuple[str, float, int]]:
    """(kernel name, total ms, count) on the device streams of a Perfetto trace, largest first."""
    total, count = kernel_totals(trace_dir)
    ranked = sorted(total.items(), key=lambda kv: -kv[1])[:limit]
    return [(name, ms, count[name]) for name, ms in ranked]


def kernel_totals(trace_dir: str) -> tuple[dict[str, float], dict[str, int]]:
    """Per kernel name: total ms and count of its launches in a Perfetto trace (`kernels.kernel_events`)."""
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in kernels.kernel_events(kernels.load_trace(trace_dir)):
        total[e["name"]] += e.get("dur", 0) / 1000
        count[e["name"]] += 1
    return total, count


def profile_decode(out: str, batches: list[int], new_tokens: int, results: dict) -> None:
    """Decode ms/step with top-k 40 and greedy per batch, then a traced batch-1 top-k run (see the module doc)."""
    on_gpu = jax.default_backend() == "gpu"
    config = get_config("124M" if on_gpu else "tiny", dtype="bfloat16" if on_gpu else "float32")
    weights = decode_weights(init_params(config, 0), config)
    samplings = {"top-k 40": SamplingConfig(top_k=40), "greedy": SamplingConfig(temperature=0)}
    prompts = {b: np.random.default_rng(0).integers(0, config.n_vocab, (b, 16)).astype(np.int32) for b in batches}
    for batch in batches:
        for label, sampling in samplings.items():
            timing = decode_bench.time_ours(weights, config, prompts[batch], new_tokens, 40, 3, sampling=sampling)
            step_ms = 1e3 * float(np.median(timing["decode_s"])) / (new_tokens - 1)
            results[f"decode batch {batch} {label}"] = {"step_ms": step_ms, "compile_s": timing["compile_s"]}
            print(f"decode batch {batch:3d} {label:8s} {step_ms:7.3f} ms/step  compile {timing['compile_s']:.1f} s")
    trace_dir = os.path.join(out, "decode_trace")
    batch = batches[0]
    options = kernels.profiler_options()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=options):  # warm-up and 1 run
        timing = decode_bench.time_ours(weights, config, prompts[batch], new_tokens, 40, 1)
    # Only the launches inside the decode calls' annotations: the prefills' are left out.
    traced = kernels.trace_kernels_per_step(kernels.load_trace(trace_dir), steps=2 * (new_tokens - 1))
    busy_ms, per_step = traced["busy_ms_per_step"], traced["kernels_per_step"]
    step_ms = results[f"decode batch {batch} top-k 40"]["step_ms"]
    results["decode_trace"] = {
        "batch": batch, "kernels_per_step": per_step, "busy_ms_per_step": busy_ms,
        "hlo_kernels_per_step": timing["kernels"]["kernels_per_step"],
    }  # fmt: skip
    results["decode_top_kernels"] = top_kernels(trace_dir)
    print(
        f"batch {batch} top-k 40: {per_step:.0f} kernels per decode step in the trace "
        f"({timing['kernels']['kernels_per_step']:.0f} counted in the HLO), {busy_ms:.3f} ms of kernel time per step "
        f"against {step_ms:.3f} ms per step ({100 * busy_ms / step_ms:.0f}% busy); top kernels, ms total / count:"
    )
    for name, ms, n in results["decode_top_kernels"]:
        print(f"  {ms:9.2f} ms {n:6d}x  {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--variants", default="base,scan")
    parser.add_argument("--trace_steps", type=int, default=2)
    parser.add_argument("--job", choices=("train", "decode"), default="train")
    parser.add_argument("--decode_batches", default="1,64")
    parser.add_argument("--new_tokens", type=int, default=128)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.job == "decode":
        results = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", "")}
        profile_decode(args.out, [int(b) for b in args.decode_batches.split(",")], args.new_tokens, results)
        with open(os.path.join(args.out, "decode_profile.json"), "w") as f:
            json.dump(results, f, indent=1)
        return
    base = model_config("124M", dtype="bfloat16", attention="cudnn" if jax.default_backend() == "gpu" else "xla")
    if jax.default_backend() != "gpu":  # a smoke test anywhere else
        base = model_config("tiny", dtype="float32")
        args.batch, args.seq = 2, 32
    params = init_params(base, 0)
    batch = random_batch(base, args.batch, args.seq)
    tokens = args.batch * args.seq
    results = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for name in args.variants.split(","):
        cfg = base.replace(**VARIANTS[name])
        timing = time_ours(cfg, params, batch, repeats=5)
        step_s = float(np.median(timing["step_s"]))
        tflops = flops_per_token(cfg, args.seq) * tokens / step_s / 1e12
        results[name] = {
            "step_ms": step_s * 1e3,
            "tokens_per_s": tokens / step_s,
            "model_tflops": tflops,
            "compile_s": timing["compile_s"],
        }
        print(
            f"{name:14s} {step_s * 1e3:8.1f} ms/step  {tokens / step_s:10,.0f} tok/s  {tflops:6.1f} TFLOP/s  "
            f"compile {timing['compile_s']:.1f} s  XLA_FLAGS={results['xla_flags']!r}",
            flush=True,
        )

    if args.trace_steps == 0:
        print(json.dumps(results))
        return
    trace_dir = os.path.join(args.out, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        time_ours(base, params, batch, repeats=args.trace_steps)
    kernels = top_kernels(trace_dir)
    results["top_kernels"] = kernels
    print(f"top kernels over the traced run (compile step + {args.trace_steps} steps), ms total / count:")
    for name, ms, n in kernels:
        print(f"  {ms:9.2f} ms {n:5d}x  {name[:110]}")
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
