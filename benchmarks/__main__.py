"""`python -m benchmarks`: how fast this is, against the hardware's limits and against PyTorch, in one command.

    python -m benchmarks --suite quick --compare pytorch          # ~3 min on an idle 2-core CPU: both CPU goals
    python -m benchmarks --suite full --json out.json --plot out.png   # a GPU/TPU: 124M at T=1024 in bf16, all devices
    python -m benchmarks --suite scaling        # one global batch on 1, 2, 4... devices (8 host devices on a CPU)
    python -m benchmarks --job train --preset 124M --batch 8,16 --seq 1024 --dtype bfloat16 --attention cudnn,xla
    python -m benchmarks --job decode --preset 124M --batch 1,8,64 --seq 16 --new_tokens 128
    python -m benchmarks --job serve --preset 124M --clients 1,4,16,64      # gpt2-jax serve under concurrent clients

Prints a progress line per point, then one table (median tokens/s over --repeats timed runs with its min-max, compile
time, MFU, model TFLOP/s, peak memory, fraction of the bandwidth bound, PyTorch eager and under torch.compile, and
the ratios). --json is rewritten
after every point, so an interrupted run keeps what it measured. benchmarks/suite.py documents every field.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Sequence

import jax

from benchmarks import report, suite
from benchmarks import serve as serve_bench
from gpt2_jax.cli import ArgumentParser, run_cli
from gpt2_jax.config import get_config
from gpt2_jax.data.cache import default_cache_dir
from gpt2_jax.errors import UsageError
from gpt2_jax.hints import command_for
from gpt2_jax.xla_cpu import use_training_flags


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be at least 1, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _remat(text: str) -> tuple[bool, ...]:
    choices = {"off": False, "on": True}
    if any(x not in choices for x in _names(text)):
        raise argparse.ArgumentTypeError(f"--remat takes off, on or off,on; got {text!r}")
    return tuple(choices[x] for x in _names(text))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog=command_for("bench"), description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="quick", choices=suite.SUITE_NAMES, help="named sweep (default: quick)")
    p.add_argument("--compare", choices=["pytorch"], help="also time Hugging Face PyTorch GPT-2 at the same points")
    p.add_argument(
        "--torch_compile", choices=["inductor", "aot_eager", "eager", "off"],
        help="with --compare: the torch.compile backend of the second PyTorch column, or off (default: inductor; "
        "the toy suite: eager)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point after warm-up (default: 3)")
    p.add_argument("--json", help="write {environment, points} here (rewritten after every point)")
    p.add_argument("--plot", help="write a PNG of tokens/s against batch size here")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    custom = p.add_argument_group(
        "a sweep of your own (replaces --suite when --job is given; with --suite scaling, changes its points)"
    )
    custom.add_argument("--job", choices=["train", "decode", "serve"], help="decode also measures prefill")
    custom.add_argument("--preset", type=_names, help="model presets, comma-separated (default: 124M)")
    custom.add_argument("--batch", type=_ints, help="global batch sizes (sequences), comma-separated (default: 8)")
    custom.add_argument("--seq", type=int, help="train: tokens per sequence (default 1024); decode: prompt (16)")
    custom.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: float32)")
    custom.add_argument("--attention", type=_names, help="train: auto,xla,cudnn (comma list; default: auto)")
    custom.add_argument("--remat", type=_remat, help="train: off, on or off,on (default: off)")
    custom.add_argument("--scan_unroll", type=_ints, help="train: layers per scan step (default: train.py's)")
    custom.add_argument("--devices", type=_names, help="train: device counts or 'all', comma list (default: 1)")
    custom.add_argument("--new_tokens", type=int, default=128, help="decode: tokens generated per sequence")
    custom.add_argument("--top_k", type=int, default=40, help="decode: top-k of the sampler")
    custom.add_argument(
        "--kernels",
        choices=["xla", "pallas"],
        help="decode: the layers' kernels (default xla; pallas: model/fused_decode.py, accelerators)",
    )
    custom.add_argument("--compare_at", type=_ints, default=None, help="only compare with PyTorch at these batches")
    serving = p.add_argument_group(
        "--job serve (benchmarks/serve.py; also takes --preset, --seq, --new_tokens, --dtype)"
    )
    serving.add_argument("--clients", type=_ints, default=(1, 4, 16, 64), help="concurrent clients (default 1,4,16,64)")
    serving.add_argument("--requests", type=int, default=4, help="requests per client per point (default 4)")
    serving.add_argument("--seconds", type=float, default=120, help="no new request after this per point (120)")
    serving.add_argument("--max_batch", type=int, default=16, help="the server's rows (default 16)")
    serving.add_argument("--chunk", type=int, help="the server's decode steps per chunk (default: the server's)")
    return p.parse_args(argv)


# Flags that shape a sweep, and the Sweep field each sets.
SWEEP_FLAGS = dict(
    preset="presets", batch="batches", seq="seq", dtype="dtype", attention="attention", remat="remat",
    scan_unroll="scan_unroll", devices="devices", compare_at="compare_batches", kernels="kernels",
)  # fmt: skip


def build_sweeps(args: argparse.Namespace) -> tuple[suite.Sweep, ...]:
    sweeps = shaped_sweeps(args)
    if args.torch_compile is None:  # each sweep's own backend
        return sweeps
    backend = None if args.torch_compile == "off" else args.torch_compile
    return tuple(dataclasses.replace(sweep, torch_compile=backend) for sweep in sweeps)


def shaped_sweeps(args: argparse.Namespace) -> tuple[suite.Sweep, ...]:
    """The named suite, or the sweep the shaping flags describe."""
    given = {field: getattr(args, flag) for flag, field in SWEEP_FLAGS.items() if getattr(args, flag) is not None}
    if given.get("seq", 1) < 1 or args.new_tokens < 1 or args.top_k < 0:
        raise UsageError("--seq and --new_tokens must be at least 1 and --top_k at least 0.")
    if args.job is not None:
        seq = given.pop("seq", 1024 if args.job == "train" else 16)
        given = {"presets": ("124M",), "batches": (8,), **given}
        return check_context(suite.Sweep(args.job, seq=seq, new_tokens=args.new_tokens, top_k=args.top_k, **given))
    if args.suite == "scaling":
        return check_context(*(dataclasses.replace(sweep, **given) for sweep in suite.named_suite("scaling")))
    if given:
        names = ", ".join(f"--{flag}" for flag in SWEEP_FLAGS if getattr(args, flag) is not None)
        raise UsageError(f"{names} shape a sweep of your own: add --job train or --job decode, or use --suite scaling.")
    return suite.named_suite(args.suite)


def check_context(*sweeps: suite.Sweep) -> tuple[suite.Sweep, ...]:
    """Refuse, before anything runs, a sweep whose tokens do not fit a preset's context."""
    for sweep in sweeps:
        tokens = sweep.seq + (sweep.new_tokens if sweep.job == "decode" else 0)
        what = "--seq" if sweep.job == "train" else "--seq + --new_tokens"
        for preset in sweep.presets:
            n_ctx = get_config(preset).n_ctx
            if tokens > n_ctx:
                raise UsageError(f"{what} = {tokens} is longer than {preset}'s context of {n_ctx} tokens.")
    return sweeps


def use_host_devices(n: int, log=print) -> None:
    """Split a machine's CPU into `n` JAX devices, unless XLA_FLAGS or JAX_NUM_CPU_DEVICES already chose a count.

    Through jax's own `jax_num_cpu_devices` option rather than XLA_FLAGS=--xla_force_host_platform_device_count:
    that flag must be in the environment before jax is imported (so before this module's imports: argv sniffing, or
    a re-exec of the whole process), while the option may be set any time before the first JAX operation, here
    after the flags are parsed. It changes only the CPU platform, so on a GPU or TPU machine the accelerators stay
    the devices and nothing needs detecting first (which would start the backends, too late to split the CPU).
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices > 0:
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX already runs in this process (main() called from Python): keep its devices
        log(f"JAX already started here with {len(jax.devices('cpu'))} CPU device(s); the scaling suite uses those.")


def pytorch_available(log=print) -> bool:
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        log(f"PyTorch comparison skipped: {' and '.join(missing)} not installed (pip install torch transformers).")
    return not missing


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}.")
    log = lambda line: print(line, flush=True)
    if args.job == "serve":
        return serve(args, log)
    if args.suite == "scaling" and args.job is None:
        use_host_devices(suite.SCALING_HOST_DEVICES, log)  # before anything starts JAX's backends
    sweeps = build_sweeps(args)
    if any(sweep.job == "train" for sweep in sweeps):  # train.py's XLA:CPU flags, so its ratios are train.py's
        use_training_flags(default_cache_dir())
    env = report.environment()
    log(report.describe_environment(env))
    compare = args.compare == "pytorch" and pytorch_available(log)
    runner = suite.Runner(repeats=args.repeats, compare=compare, log=log)
    save = (lambda points: report.write_json(args.json, env, points)) if args.json else None
    points = runner.run(sweeps, on_point=save)
    print()
    print(report.format_table(points))
    if args.plot:
        report.plot(args.plot, points, report.describe_environment(env))
    failed = [p for p in points if p.get("error")]
    if failed:
        print(f"{len(failed)} of {len(points)} points failed (see FAILED above).", file=sys.stderr)
    return 1 if failed and len(failed) == len(points) else 0


def serve(args: argparse.Namespace, log) -> int:
    """--job serve: benchmarks/serve.py at each preset; its own table (clients, not batches)."""
    if args.requests < 1 or args.seconds <= 0 or args.max_batch < 1 or (args.chunk or 1) < 1:
        raise UsageError("--requests, --max_batch and --chunk must be at least 1 and --seconds positive.")
    seq, dtype = args.seq or 16, args.dtype or "float32"
    check_context(
        suite.Sweep("decode", presets=args.preset or ("124M",), batches=(1,), seq=seq, new_tokens=args.new_tokens)
    )
    env = report.environment()
    log(report.describe_environment(env))
    points: list[dict] = []
    for preset in args.preset or ("124M",):
        save = (lambda new, done=list(points): report.write_json(args.json, env, done + new)) if args.json else None
        points += serve_bench.run(
            preset=preset, clients=args.clients, seq=seq, new_tokens=args.new_tokens, requests=args.requests,
            seconds=args.seconds, max_batch=args.max_batch, chunk=args.chunk, dtype=dtype, log=log, on_point=save,
        )  # fmt: skip
    if args.json:
        report.write_json(args.json, env, points)
    print()
    print(serve_bench.format_table(points))
    failed = [p for p in points if p.get("error")]
    return 1 if failed and len(failed) == len(points) else 0


if __name__ == "__main__":
    run_cli(main)
