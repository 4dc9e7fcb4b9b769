"""The profile part: where a GPU training step or decode loop spends its time, from traces (once
benchmarks/gpu_profile.py).

    python -m benchmarks.gpu.profile --out DIR [--batch 16] [--seq 1024] [--variants base,scan]      # alone
    python -m benchmarks.gpu.profile --out DIR --job decode [--decode_batches 1,64] [--new_tokens 128]

In the GPU call (`run`): the decode loop at batch 1 with top-k 40 and greedy, each timed and traced: kernels per
decode step and how much of the step they keep the device busy (a step much longer than its kernels' sum is
launch-bound, one close to it is bound by the kernels themselves); top-k 40 again in the fused Pallas layers
(model/fused_decode.py; a failure is that record's error); then the training step at the train part's first batch,
timed and traced: its top kernels. Recorded as 'profile' records; the traces (Perfetto JSON written by
`jax.profiler`, read back here and summed per kernel name, no TensorBoard needed) are deleted once read.

Alone, each variant is the real `train_step` (benchmarks/train.py's `time_ours`) on GPT-2 124M in bf16 with a config
change from `base`, which is what train.py runs there (layers unrolled on a GPU); the traced run is `base`.
`--job decode` times the sampler's decode loop (benchmarks/decode.py's `time_ours`: 124M bf16, 16-token prompt) with
top-k 40 and greedy (the difference is what the draw costs per step), then traces the first batch's runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil

import jax
import numpy as np

from benchmarks import decode as decode_bench
from benchmarks import kernels
from benchmarks.gpu.common import Sizes, record
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


def kernel_totals(trace_dir: str) -> tuple[dict[str, float], dict[str, int]]:
    """Per kernel name: total ms and count of its launches in a Perfetto trace (`kernels.kernel_events`)."""
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in kernels.kernel_events(kernels.load_trace(trace_dir)):
        total[e["name"]] += e.get("dur", 0) / 1000
        count[e["name"]] += 1
    return total, count


def profile_decode(
    out: str, batches: list[int], new_tokens: int, results: dict, sizes: Sizes | None = None, *,
    kernels_choice: str = "xla", labels: tuple[str, ...] = ("top-k 40", "greedy"),
) -> None:  # fmt: skip
    """Decode ms/step with each sampling of `labels` per batch, then each traced at the first batch (see the module
    doc), in the layers `kernels_choice` picks (DecodeWeights.kernels; a name other than "xla" joins the labels)."""
    on_gpu = jax.default_backend() == "gpu"
    default = ("124M", "bfloat16") if on_gpu else ("tiny", "float32")  # alone, off a GPU: a smoke test
    preset, dtype = (sizes.preset, sizes.dtype) if sizes else default
    config = get_config(preset, dtype=dtype)
    weights = decode_weights(init_params(config, 0), config, kernels=kernels_choice)
    samplings = {"top-k 40": SamplingConfig(top_k=40), "greedy": SamplingConfig(temperature=0)}
    samplings = {
        label + ("" if kernels_choice == "xla" else f" ({kernels_choice})"): samplings[label] for label in labels
    }
    prompts = {b: np.random.default_rng(0).integers(0, config.n_vocab, (b, 16)).astype(np.int32) for b in batches}
    for batch in batches:
        for label, sampling in samplings.items():
            timing = decode_bench.time_ours(weights, config, prompts[batch], new_tokens, 40, 3, sampling=sampling)
            step_ms = 1e3 * float(np.median(timing["decode_s"])) / (new_tokens - 1)
            results[f"decode batch {batch} {label}"] = {"step_ms": step_ms, "compile_s": timing["compile_s"]}
            print(f"decode batch {batch:3d} {label:8s} {step_ms:7.3f} ms/step  compile {timing['compile_s']:.1f} s")
    batch = batches[0]
    for label, sampling in samplings.items():
        trace_dir = os.path.join(out, "decode_trace")
        options = kernels.profiler_options()  # 2 decode runs traced: the warm-up and one timed
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=options):
            timing = decode_bench.time_ours(weights, config, prompts[batch], new_tokens, 40, 1, sampling=sampling)
        # Only the launches inside the decode calls' annotations: the prefills' are left out.
        traced = kernels.trace_kernels_per_step(kernels.load_trace(trace_dir), steps=2 * (new_tokens - 1))
        total, count = kernel_totals(trace_dir)
        shutil.rmtree(trace_dir, ignore_errors=True)
        busy_ms, per_step = traced["busy_ms_per_step"], traced["kernels_per_step"]
        step_ms = results[f"decode batch {batch} {label}"]["step_ms"]
        top = sorted(total.items(), key=lambda kv: -kv[1])[:25]
        results[f"decode_trace {label}"] = {
            "batch": batch, "kernels_per_step": per_step, "busy_ms_per_step": busy_ms, "step_ms": step_ms,
            "hlo_kernels_per_step": timing["kernels"]["kernels_per_step"],
            "top_kernels": [(name, ms, count[name]) for name, ms in top],
        }  # fmt: skip
        print(
            f"batch {batch} {label}: {per_step:.0f} kernels per decode step in the trace "
            f"({timing['kernels']['kernels_per_step']:.0f} counted in the HLO), {busy_ms:.3f} ms of kernel time per "
            f"step against {step_ms:.3f} ms per step ({100 * busy_ms / step_ms:.0f}% busy); top kernels, ms / count:"
        )
        for name, ms in top:
            print(f"  {ms:9.2f} ms {count[name]:6d}x  {name[:110]}")


def profile_train(out: str, config, batch: int, seq: int, variants: list[str], trace_steps: int, results: dict) -> None:
    """Each variant timed, then `base` traced over `trace_steps` steps: its top kernels (see the module doc)."""
    params = init_params(config, 0)
    batch_BT1 = random_batch(config, batch, seq)
    tokens = batch * seq
    for name in variants:
        cfg = config.replace(**VARIANTS[name])
        timing = time_ours(cfg, params, batch_BT1, repeats=5)
        step_s = float(np.median(timing["step_s"]))
        tflops = flops_per_token(cfg, seq) * tokens / step_s / 1e12
        results[name] = {"step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s, "model_tflops": tflops,
                         "compile_s": timing["compile_s"]}  # fmt: skip
        flags = os.environ.get("XLA_FLAGS", "")
        print(f"{name:14s} {step_s * 1e3:8.1f} ms/step  {tokens / step_s:10,.0f} tok/s  {tflops:6.1f} TFLOP/s  "
              f"compile {timing['compile_s']:.1f} s  XLA_FLAGS={flags!r}", flush=True)  # fmt: skip
    if trace_steps == 0:
        return
    trace_dir = os.path.join(out, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        time_ours(config, params, batch_BT1, repeats=trace_steps)
    total, count = kernel_totals(trace_dir)
    shutil.rmtree(trace_dir, ignore_errors=True)
    results["kernels_per_step"] = sum(count.values()) / (trace_steps + 2)  # the compile step and a warm-up too
    results["top_kernels"] = [(n, ms, count[n]) for n, ms in sorted(total.items(), key=lambda kv: -kv[1])[:25]]
    print(f"top kernels over the traced run (compile step + warm-up + {trace_steps} steps), ms total / count:")
    for name, ms, n in results["top_kernels"]:
        print(f"  {ms:9.2f} ms {n:5d}x  {name[:110]}")


def run(out: str, work: str, sizes: Sizes) -> None:
    """The GPU call's profile part: the decode traces, then the training step's (traces in work/, deleted)."""
    decode: dict = {"device": jax.devices()[0].device_kind}
    profile_decode(work, [sizes.decode_batches[0]], sizes.new_tokens, decode, sizes)
    record(out, "profile", job="decode", **decode)
    if jax.default_backend() != "cpu":  # the fused layers run over accelerators' one-buffer cache only
        fused: dict = {"device": jax.devices()[0].device_kind}
        try:  # a kernel that fails on the card is this record's error; the training profile still runs
            profile_decode(work, [sizes.decode_batches[0]], sizes.new_tokens, fused, sizes, kernels_choice="pallas",
                           labels=("top-k 40",))  # fmt: skip
        except Exception as e:
            fused["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        record(out, "profile", job="decode", kernels="pallas", **fused)
    config = model_config(sizes.preset, dtype=sizes.dtype)
    train = {"device": jax.devices()[0].device_kind, "batch": sizes.profile_batch, "seq": sizes.seq}
    profile_train(work, config, sizes.profile_batch, sizes.seq, ["base"], 2, train)
    record(out, "profile", job="train", **train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    results = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if args.job == "decode":
        profile_decode(args.out, [int(b) for b in args.decode_batches.split(",")], args.new_tokens, results)
    else:
        on_gpu = jax.default_backend() == "gpu"
        config = model_config("124M", dtype="bfloat16") if on_gpu else model_config("tiny", dtype="float32")
        batch, seq = (args.batch, args.seq) if on_gpu else (2, 32)  # a smoke test anywhere else
        profile_train(args.out, config, batch, seq, args.variants.split(","), args.trace_steps, results)
    with open(os.path.join(args.out, f"{args.job}_profile.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
