"""Where a GPU training step spends its time: variants timed side by side, and the top kernels of one traced step.

    python -m benchmarks.gpu_profile --out DIR [--batch 16] [--seq 1024] [--variants base,scan]

Each variant is the real `train_step` (benchmarks/train.py's `time_ours`) on GPT-2 124M in bf16 with a config
change from `base`, which is what train.py runs there (layers unrolled on a GPU); the traced run is `base`. The
trace is read back here (Perfetto JSON written by `jax.profiler`) and summed per kernel name, so the
table needs no TensorBoard. Run on a lent GPU after benchmarks/gpu.sh, to say what limited the sweep.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os

import jax
import numpy as np

from benchmarks.train import model_config, random_batch, time_ours
from gpt2_jax.model.flops import flops_per_token
from gpt2_jax.model.transformer import init_params

VARIANTS = {
    "base": {},
    "scan": {"scan_unroll": 1},
    "unroll": {"scan_unroll": 12},
    "remat": {"remat": True},
    "xla_attention": {"attention": "xla"},
}


def top_kernels(trace_dir: str, limit: int = 25) -> list[tuple[str, float, int]]:
    """(kernel name, total ms, count) on the device streams of a Perfetto trace, largest first."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        return []
    with gzip.open(sorted(paths)[-1], "rt") as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device_pids = {pid for pid, name in names.items() if "gpu" in name.lower() or "device" in name.lower()}
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids:
            total[e["name"]] += e.get("dur", 0) / 1000
            count[e["name"]] += 1
    ranked = sorted(total.items(), key=lambda kv: -kv[1])[:limit]
    return [(name, ms, count[name]) for name, ms in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--variants", default="base,scan")
    parser.add_argument("--trace_steps", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
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
