"""Full fine-tuning against LoRA at the same batch: step time, compile time, training-state bytes and peak memory.

    python -m benchmarks.lora                                    # 124M, float32, batch 8 x 1024, LoRA rank 8 (c_attn)
    python -m benchmarks.lora --preset 124M --batch 8 --seq 1024 --lora_rank 8 --lora_targets c_attn --repeats 5 \\
        --json lora-124M.json

Each variant runs in a process of its own, so its peak memory is its own: the peak resident set (`ru_maxrss`, what
a CPU run needs) and, on an accelerator, the device's peak bytes in use. Both time exactly the step train.py runs
(`build_train_step` over the state `training.state.initial_state` builds: for LoRA the frozen base, the adapters and
AdamW over the adapters alone) on random weights and tokens; the compile is timed apart and the steady state is the
median of `--repeats` steps, each synchronised. The state bytes are computed, not measured (the same
`jax.eval_shape` figure train.py prints at start-up). Time on an idle machine: the figures of two variants are
only comparable when nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

VARIANTS = ("full", "lora")


def measure(
    preset: str, batch: int, seq: int, dtype: str, lora_rank: int, targets: str, repeats: int, remat: bool = False
) -> dict:
    """One variant in this process: lora_rank 0 is full fine-tuning; remat recomputes activations in the backward."""
    import jax
    import numpy as np

    from benchmarks.train import HYPER, model_config, random_batch
    from gpt2_jax.model.lora import LoraConfig, adapter_count, parse_targets
    from gpt2_jax.model.params import count_params
    from gpt2_jax.model.transformer import Tuning, abstract_params, init_params
    from gpt2_jax.training.mesh import bytes_per_device, make_mesh, replicated, shard_batch, tree_shardings
    from gpt2_jax.training.optim import learning_rate_schedule, make_optimizer
    from gpt2_jax.training.state import initial_state
    from gpt2_jax.training.step import build_train_step

    config = model_config(preset, dtype=dtype, remat=remat)
    lora = LoraConfig(lora_rank, float(lora_rank), parse_targets(targets)) if lora_rank else None
    mesh = make_mesh(jax.devices()[:1])
    schedule = learning_rate_schedule(HYPER["learning_rate"], warmup_steps=0, total_steps=10**6, schedule="constant")
    optimizer = make_optimizer(schedule)
    create = jax.jit(lambda p: initial_state(config, optimizer, lora, p, 0), out_shardings=replicated(mesh))
    abstract = jax.eval_shape(lambda p: initial_state(config, optimizer, lora, p, 0), abstract_params(config))
    state = create(init_params(config, 0))
    step = build_train_step(config, optimizer, schedule, mesh, tuning=Tuning(lora=lora))
    batch_BT1 = shard_batch(random_batch(config, batch, seq), mesh)

    def one() -> float:
        nonlocal state
        start = time.perf_counter()
        state, metrics = step(state, batch_BT1)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - start

    first = one()
    one()  # the second call still allocates for the first time
    times = [one() for _ in range(repeats)]
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "variant": "lora" if lora else "full",
        "preset": preset, "batch": batch, "seq": seq, "dtype": dtype, "remat": remat, "lora_rank": lora_rank,
        "lora_targets": list(lora.targets) if lora else None,
        "trainable_params": adapter_count(config, lora) if lora else count_params(config),
        "state_bytes": bytes_per_device(abstract, tree_shardings(abstract, mesh, "replicated")),
        "compile_s": max(first - float(np.median(times)), 0.0),
        "step_s": times, "median_step_s": float(np.median(times)),
        "tokens_per_s": batch * seq / float(np.median(times)),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "device": jax.devices()[0].device_kind,
    }  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="124M", help="model preset (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="global batch in sequences (default: %(default)s)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--lora_rank", type=int, default=8, help="the LoRA variant's rank (default: %(default)s)")
    p.add_argument("--lora_targets", default="c_attn", help="the LoRA variant's targets (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (default: %(default)s)")
    p.add_argument("--remat", action="store_true", help="recompute activations in the backward: less memory")
    p.add_argument("--json", help="write the two results here")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's own
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = (args.preset, args.batch, args.seq, args.dtype)
    if args.variant:
        rank = args.lora_rank if args.variant == "lora" else 0
        result = measure(*settings, rank, args.lora_targets, args.repeats, args.remat)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    results: list[dict[str, Any]] = []
    for variant in VARIANTS:
        child = [sys.executable, "-m", "benchmarks.lora", *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run([*child, "--variant", variant], capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            return out.returncode
        result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
        results.append(result)
        print(
            f"{variant:>4}: {result['median_step_s'] * 1000:.0f} ms/step ({result['tokens_per_s']:.0f} tok/s), "
            f"compile {result['compile_s']:.1f} s, {result['trainable_params']:,} trainable params, state "
            f"{result['state_bytes'] / 2**20:.0f} MiB (computed), peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB"
            + (f", device peak {result['device_peak_bytes'] / 2**20:.0f} MiB" if result["device_peak_bytes"] else ""),
            flush=True,
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
