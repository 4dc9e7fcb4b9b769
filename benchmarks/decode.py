"""Sampling benchmark: prefill time, per-token decode latency and tokens/s, against Hugging Face PyTorch `generate`.

    python -m benchmarks.decode                                   # the CPU goal: 124M, fp32, batch 1 and 8
    python -m benchmarks.decode --batches 1,8,64 --lengths 128,512 --no-pytorch --json out.json

Each point times our jitted decoder (`gpt2_jax.sampling.loop`: one prefill, then decode_chunk calls for the other
new tokens, chunked as generate.py chunks them, top-k sampling, no early stop) on a random model after a compile
(timed apart), median of `--repeats` runs.
With PyTorch it also times `GPT2LMHeadModel.generate` (same weights, do_sample, top_k, use_cache, same prompt and
number of new tokens) in the same process, and reports the ratio of generation throughputs (new tokens/s of a
whole call, prefill included, both sides). With `--torch_compile BACKEND` (default inductor) a second PyTorch column
times `generate` as Hugging Face compiles it: a static KV cache and each decode step's forward under torch.compile
(with CUDA graphs on a GPU, Hugging Face's default mode there), the strongest PyTorch generation a user would pick.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import compare, kernels
from gpt2_jax.config import get_config
from gpt2_jax.model.decode import decode_weights
from gpt2_jax.model.transformer import init_params
from gpt2_jax.sampling.generate import cache_slots, next_chunk, prompt_bucket
from gpt2_jax.sampling.loop import decode_chunk, default_steps_per_block, prefill_and_sample
from gpt2_jax.sampling.processors import SamplingConfig

NO_EOT = np.int32(-1)  # no row ever stops early: every run decodes exactly the asked number of tokens


def time_ours(
    weights: Any,
    config: Any,
    prompt_BT: np.ndarray,
    new_tokens: int,
    top_k: int,
    repeats: int,
    sampling: SamplingConfig | None = None,
) -> dict[str, Any]:
    """{'compile_s': seconds, 'prefill_s': [seconds per run], 'decode_s': [seconds per run], 'kernels': counts}: the
    compile, then for each of `repeats` runs after a warm-up the prefill (+ first draw) and the decoding of the other
    `new_tokens - 1` in the chunks generate.py would run (one, or one per attention window on an accelerator), and
    the kernels per decode step counted from the compiled chunks (`decode_kernels`). `sampling` replaces the top-k
    sampling (e.g. greedy, to see what the draw costs). Each run's decode calls lie in a `kernels.DECODE_ANNOTATION`
    trace annotation, for `kernels.trace_kernels_per_step` when a profiler is on."""
    B, T = prompt_BT.shape
    slots = cache_slots(prompt_bucket(T, config.n_ctx) + new_tokens - 1, config.n_ctx)  # generate.py's buckets
    static = dict(config=config, sampling=sampling or SamplingConfig(top_k=top_k))
    mask_BT, row_ids, done = np.ones_like(prompt_BT, bool), np.arange(B, dtype=np.int32), np.zeros(B, bool)
    prefill_args = (weights, prompt_BT, mask_BT, row_ids, done, np.int32(0), np.uint32(0), NO_EOT)
    chunks, index, left = [], T, new_tokens - 1  # (steps, window) per decode_chunk call
    while left:
        chunks.append(next_chunk(index, left, slots))
        index, left = index + chunks[-1][0], left - chunks[-1][0]
    stop_B = np.zeros(B, bool)

    start = time.perf_counter()  # compiled ahead of time, so the compile is timed apart from any run
    prefill = prefill_and_sample.lower(*prefill_args, max_len=slots, **static).compile()
    state = prefill(*prefill_args)[0]
    decode = {
        window: decode_chunk.lower(weights, state, np.int32(steps), stop_B, NO_EOT, window=window, **static).compile()
        for steps, window in chunks
    }
    compile_s = time.perf_counter() - start

    def run_prefill():
        state, first_B = prefill(*prefill_args)
        jax.block_until_ready(first_B)  # one program: the state is ready with it
        return state

    def run_decode(state):
        with jax.profiler.TraceAnnotation(kernels.DECODE_ANNOTATION):
            for steps, window in chunks:  # each call donates `state`: a fresh prefill for every run
                state, _, n = decode[window](weights, state, np.int32(steps), stop_B, NO_EOT)
                assert int(n) == steps
            return jax.block_until_ready(state)

    run_decode(run_prefill())  # warm-up
    prefill_s, decode_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        state = run_prefill()
        middle = time.perf_counter()
        run_decode(state)
        prefill_s.append(middle - start)
        decode_s.append(time.perf_counter() - middle)
    counted = decode_kernels([(decode[window].as_text(), steps) for steps, window in chunks])
    return {"compile_s": compile_s, "prefill_s": prefill_s, "decode_s": decode_s, "kernels": counted}


def decode_kernels(calls: list[tuple[str, int]]) -> dict[str, Any]:
    """Kernels per decode step over a generation's decode calls, each (its compiled HLO text, steps it runs):
    `kernels_per_step` (all launches over all steps) and `kernels_by_kind` (per step, of the longest call's loop);
    benchmarks/kernels.py says what a kernel is on each backend."""
    counts = [kernels.decode_step_kernels(hlo, steps, default_steps_per_block()) for hlo, steps in calls]
    total_steps = sum(steps for _, steps in calls)
    longest = max(range(len(calls)), key=lambda i: calls[i][1])
    return {
        "kernels_per_step": round(sum(c["launches"] for c in counts) / total_steps, 1),
        "kernels_by_kind": counts[longest]["breakdown"],
    }


def hf_model(params: Any, config: Any, *, device: str = "cpu", dtype: str = "float32") -> Any:
    """The PyTorch reference for sampling: GPT2LMHeadModel holding exactly `params` on `device`, weights in `dtype`,
    eval mode; plain ('eager') attention on a CPU, PyTorch's fused SDPA on CUDA."""
    import torch

    from benchmarks.train import torch_model

    model = torch_model(config, params, device, attention="eager" if device == "cpu" else "sdpa")
    return model.to(getattr(torch, dtype)).eval()


def time_pytorch(
    model: Any, prompt_BT: np.ndarray, new_tokens: int, top_k: int, repeats: int, *, device: str = "cpu",
    torch_compile: str | None = None,
) -> list[float]:  # fmt: skip
    """Seconds per `model.generate` call on `device` (sampling, top-k, KV cache, no early stop), after a warm-up.

    torch_compile: a torch.compile backend: generate with a static cache, whose decode steps Hugging Face runs
    through `torch.compile(model.__call__)` (`compile_config`); the warm-up is a whole generation, which compiles
    at the cache's final shape. None: eager, with the dynamic cache.
    """
    import torch

    ids = torch.from_numpy(prompt_BT.astype(np.int64)).to(device)
    kwargs = dict(do_sample=True, top_k=top_k, use_cache=True, pad_token_id=0, eos_token_id=None)
    if torch_compile:
        kwargs.update(cache_implementation="static", compile_config=compile_config(torch_compile, device))

    def generate(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt_BT.shape[1] + n
        return time.perf_counter() - start

    generate(new_tokens if torch_compile else 2)  # warm-up
    if torch_compile and not hasattr(model, "_compiled_call"):  # where get_compiled_call keeps it
        raise RuntimeError("transformers did not compile generate's forward (needs a static cache)")
    return [generate(new_tokens) for _ in range(repeats)]


def compile_config(backend: str, device: str) -> Any:
    """Hugging Face's settings for compiling generate's decode steps with `backend`: its default mode on CUDA
    ('reduce-overhead': CUDA graphs), inductor's default elsewhere; other backends take no mode."""
    import transformers

    mode = ("reduce-overhead" if device == "cuda" else "default") if backend == "inductor" else None
    config = transformers.CompileConfig(backend=backend, mode=mode)
    if device != "cuda":  # generate compiles on accelerators only unless told; the class attribute is the switch
        config._compile_all_devices = True
    return config


def run(
    presets: Sequence[str] = ("124M",),
    batches: Sequence[int] = (1, 8),
    lengths: Sequence[int] = (128,),
    *,
    prompt_len: int = 16,
    dtype: str = "float32",
    top_k: int = 40,
    repeats: int = 3,
    pytorch: bool = True,
    torch_compile: str | None = None,
    torch_threads: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Benchmark points: per (preset, batch, length) one 'prefill' and one 'decode' dict (see the module doc);
    torch_compile: with pytorch, also the compiled column (a backend; benchmarks/compare.py's fields).

    torch_threads: PyTorch's intra-op threads (default: its own choice, all cores). On a busy machine torch's
    spinning threads lose far more than XLA's, so say which setting a ratio used.
    """
    if pytorch and torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    points = []
    for preset in presets:
        config = get_config(preset, dtype=dtype)
        params = init_params(config, 0)
        weights = decode_weights(params, config)
        torch_model = hf_model(params, config) if pytorch else None
        for batch in batches:
            prompt_BT = np.random.default_rng(0).integers(0, config.n_vocab, (batch, prompt_len)).astype(np.int32)
            for new_tokens in lengths:
                ours = time_ours(weights, config, prompt_BT, new_tokens, top_k, repeats)
                prefill_s, decode_s = float(np.median(ours["prefill_s"])), float(np.median(ours["decode_s"]))
                generate_s = prefill_s + decode_s
                common = dict(
                    preset=preset, n_layer=config.n_layer, n_embd=config.n_embd, batch=batch, seq=prompt_len,
                    new_tokens=new_tokens, dtype=dtype, devices=1, compile_s=round(ours["compile_s"], 3),
                )  # fmt: skip
                decode = dict(
                    job="decode", **common, tokens_per_s=batch * new_tokens / generate_s,
                    per_token_ms=1e3 * decode_s / max(new_tokens - 1, 1), **ours["kernels"],
                    pytorch_tokens_per_s=None, ratio=None,
                )  # fmt: skip
                for column, backend in compare.columns(torch_compile) if pytorch else []:
                    seconds = functools.partial(
                        time_pytorch, torch_model, prompt_BT, new_tokens, top_k, repeats, torch_compile=backend
                    )
                    compare.add_column(decode, column, batch * new_tokens, seconds, log, backend)
                prefill = dict(
                    job="prefill", **common, tokens_per_s=batch * prompt_len / prefill_s,
                    prefill_ms=1e3 * prefill_s, pytorch_tokens_per_s=None, ratio=None,
                )  # fmt: skip
                points += [prefill, decode]
                log(format_point(decode))
    return points


def format_point(p: dict) -> str:
    line = (
        f"{p['preset']:>5} {p['dtype']:>8} batch {p['batch']:>3} prompt {p['seq']:>4} new {p['new_tokens']:>5}: "
        f"{p['tokens_per_s']:8.1f} tok/s  {p['per_token_ms']:7.2f} ms/step  {p['kernels_per_step']:6.1f} kernels/step"
        f"  compile {p['compile_s']:6.2f} s"
    )
    if p.get("ratio"):
        line += f"  | PyTorch {p['pytorch_tokens_per_s']:8.1f} tok/s  ratio {p['ratio']:.2f}x"
    return line + compare.compiled_text(p)


def main(argv: Sequence[str] | None = None) -> None:
    ints = lambda s: [int(x) for x in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", type=lambda s: s.split(","), default=["124M"])
    p.add_argument("--batches", type=ints, default=[1, 8])
    p.add_argument("--lengths", type=ints, default=[128], help="new tokens per generation")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--top_k", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-pytorch", dest="pytorch", action="store_false")
    p.add_argument("--torch_threads", type=int, default=None, help="PyTorch intra-op threads (default: torch's)")
    p.add_argument("--torch_compile", default="inductor", help="torch.compile backend of the second PyTorch column, "
                   "or 'off' (default: inductor)")  # fmt: skip
    p.add_argument("--json", default=None, help="write the points to this file")
    args = p.parse_args(argv)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}{load}", flush=True)
    points = run(
        args.presets, args.batches, args.lengths, prompt_len=args.prompt_len, dtype=args.dtype, top_k=args.top_k,
        repeats=args.repeats, pytorch=args.pytorch, torch_threads=args.torch_threads,
        torch_compile=None if args.torch_compile == "off" else args.torch_compile,
        log=lambda s: print(s, flush=True),
    )  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(points, f, indent=1)


if __name__ == "__main__":
    main()
