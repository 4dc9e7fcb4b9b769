"""`python -m benchmarks.gpu`: the one call on a lent H100/H200 that measures the training issue (21) and the
decoding issue (20) on the project's code as it is, beside llm.c and nanoGPT on the same card.

    python -m benchmarks.gpu.peers fetch       # here, first: the peers' sources (and the server's wheels) into .peers/
    python3 -m benchmarks.gpu --out $OUT       # on the device, with .peers carried: every part in at most 470 s
    python -m benchmarks.gpu --out /tmp/dry --dry           # the same parts at toy sizes on any CPU; peers: commands
    python3 -m benchmarks.gpu --out $OUT --parts lora,profile --budget 240      # some parts again, on a warm machine

The map. Each part is a module of this package, run in a process of its own (`--part NAME`) under min(its cap, what
is left of `--budget`), in this order of value; a part that crashes, runs out of memory or hangs costs only itself,
and one that no longer fits is recorded as skipped. Expected seconds on an H200 (from the 2026-11-30 call's log:
compiles of 124M take 12-17 s, of the unrolled training step 15-17 s; torch.compile of nanoGPT about 45 s):

    part            what it measures                                                         goal             s
    device          nvidia-smi (name, power limit, clocks, driver), the JAX environment,    -                15
                    the dense bf16 peak MFU is counted over, an 8192^3 bf16 matmul, a copy
    shards          `gpt2-jax prepare data/shakespeare` into llm.c shards (issue 22): the    every shard     5
                    tokens ours and llm.c train on                                            >= 64 x 1024 + 1
    check           bf16/cuDNN logits of a random 124M against fp32, cached decoding         ~1% (bf16)       50
                    against one full forward, its steps in the fused Pallas layers against
                    XLA's (check.py)
    train           ours: 124M, T=1024, bf16, batch 32 and 64, batches drawn from the        MFU >= 50%       55
                    shards; the first step's loss and grad norm against a plain-loss step
    llmc            llm.c with cuDNN attention (built in the background from the first      ours/llm.c       30
                    second), batch 32 and 64, 40 steps each, on the same shards              >= 1.15x
    nanogpt         nanoGPT's bench.py, torch.compile, bf16, batch 32 then 64                ours >= 1.3x    110
    decode          ours, 124M bf16, 16-token prompt: batch 1 top-k 40 and greedy, batch     b1 >= 4,000     95
                    64 (128 new tokens), a 1000-token generation at batch 64; then batch     tok/s; b64 >=
                    1 again in the fused Pallas layers (the A/B, decode.py)                  30% of bound
    serve           `--job serve --preset 124M --clients 1,16,64`, bf16                      for the record   55
    lora            benchmarks.lora --preset 1558M --dtype bfloat16, batch 1 x 1024:        for the record  150
                    LoRA, then full fine-tuning (peak device bytes, step time)
    decode_pytorch  the 128-token decode points beside Hugging Face generate, eager and      for the record   95
                    torch.compile
    profile         traces: kernels per decode step (b1 top-k 40, greedy; top-k 40 in the    for the record   70
                    fused Pallas layers), the training step's top kernels (profile.py)
    topk            the top 40 of 50,257 logits three ways (four where top_k takes           for the record   30
                    is_stable: a radix select, its ties checked), beside greedy (topk.py)
    summary         each goal met or not: summary.txt and <card>-verify-<date>.json          -                 2

Through serve that is about 415 s, so the default budget (470 s) leaves lora the rest; what does not fit is
skipped, and `--parts lora,decode_pytorch,profile,topk` runs it in a second call. Compiles land in persistent
caches under --work (JAX's; inductor's in /tmp), so a rerun on a still-warm machine skips most of them.

$OUT gets four files: gpu.log (everything printed), records.jsonl (one line per measurement, written as it is
measured), summary.txt and <card>-verify-<date>.json (for benchmarks/results/). Traces, shards, the peers' builds and
the caches stay in --work.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUMMARY_S = 15  # kept back from the budget for the summary


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    module: str  # benchmarks.gpu.<module>.<function>(out, work, sizes) measures it
    cap_s: int  # the most it may take on the device
    expected_s: int  # the docstring's estimate
    min_s: int = 20  # it starts only with this much of the budget left
    function: str = "run"
    env: tuple[tuple[str, str], ...] = ()


NO_PREALLOCATION = (("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),)
PARTS = (
    Part("device", "device", 60, 15),
    Part("shards", "shards", 60, 5, min_s=10),
    Part("check", "check", 75, 50),
    Part("train", "train", 150, 55, min_s=45),
    Part("llmc", "peers.llmc", 120, 30, min_s=25),
    Part("nanogpt", "peers.nanogpt", 170, 110, min_s=60),
    Part("decode", "decode", 120, 95, min_s=30),
    Part("serve", "serve", 120, 55, min_s=45),
    Part("lora", "lora", 220, 150, min_s=90),
    # PyTorch shares the process: JAX takes memory as it goes instead of 75% up front.
    Part("decode_pytorch", "decode", 150, 95, min_s=45, function="run_pytorch", env=NO_PREALLOCATION),
    Part("profile", "profile", 120, 70, min_s=30),
    Part("topk", "topk", 60, 30),
)
BY_NAME = {p.name: p for p in PARTS}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder of the four result files (created)")
    p.add_argument("--dry", action="store_true", help="every part at toy sizes on any CPU; the peers print commands")
    p.add_argument("--budget", type=float, help="seconds for all parts (default 470; 1500 with --dry)")
    p.add_argument("--parts", help="comma-separated parts to run (default: all, in the order above)")
    p.add_argument("--work", default="/tmp/gpt2_jax_gpu", help="shards, builds, traces, caches (default %(default)s)")
    p.add_argument("--part", choices=list(BY_NAME), help=argparse.SUPPRESS)  # a child: run this one part here
    args = p.parse_args(argv)
    chosen = args.parts.split(",") if args.parts else list(BY_NAME)
    unknown = [name for name in chosen if name not in BY_NAME]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(BY_NAME)}")
    args.parts = [p.name for p in PARTS if p.name in chosen]
    args.budget = args.budget or (1500.0 if args.dry else 470.0)
    return args


def run_one(part: Part, out: str, work: str) -> None:
    """In a child process: the part's own function."""
    from benchmarks.gpu import common

    module = importlib.import_module(f"benchmarks.gpu.{part.module}")
    getattr(module, part.function)(out, work, common.sizes())


class Call:
    """The parent: the environment every part gets, its log, the background build, the budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.start = args, time.time()
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(args.work, exist_ok=True)
        self.log: IO[str] = open(os.path.join(args.out, "gpu.log"), "a", encoding="utf-8")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
        self.env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(args.work, "jax_cache")
        self.env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
        if args.dry:
            self.env["GPT2_JAX_BENCH_DRY"] = "1"
        self.build: subprocess.Popen | None = None

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.args.budget - (time.time() - self.start)

    def run_child(self, command: list[str], limit: float, env: dict[str, str]) -> int | None:
        """`command` in a process group of its own, its output into the log; killed (group and all: a server it
        started too) at `limit`. Its exit code, or None where it was stopped."""
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", start_new_session=True,
        )  # fmt: skip
        pump = threading.Thread(target=lambda: [self.say(line.rstrip("\n")) for line in proc.stdout], daemon=True)
        pump.start()
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return None
        finally:
            pump.join(timeout=10)

    def part(self, part: Part) -> None:
        from benchmarks.gpu.common import record

        scale = 3 if self.args.dry else 1  # a loaded CPU is slower than the device at toy sizes
        limit = min(part.cap_s * scale, self.left() - SUMMARY_S)
        if limit < part.min_s:
            self.say(f"=== {part.name}: SKIPPED, {self.left():.0f} s left of the {self.args.budget:.0f} s budget")
            record(self.args.out, "skipped", part=part.name, reason=f"budget: {limit:.0f} s < {part.min_s} s")
            return
        if part.name == "llmc":
            self.wait_for_build(limit)
            limit = min(limit, self.left() - SUMMARY_S)
        elapsed = time.time() - self.start
        self.say(f"=== {part.name} (limit {limit:.0f} s, {elapsed:.0f} s elapsed)")
        env = dict(self.env, **dict(part.env), GPU_PART=part.name, GPU_PART_DEADLINE=str(time.time() + limit - 5))
        began = time.time()
        rc = self.run_child([sys.executable, "-m", "benchmarks.gpu", *self.passed(), "--part", part.name], limit, env)
        status = "stopped at its limit" if rc is None else "ok" if rc == 0 else f"failed with exit code {rc}"
        if rc != 0:
            self.say(f"=== {part.name}: {status.upper()}; continuing")
        record(self.args.out, "part", part=part.name, seconds=time.time() - began, limit_s=limit, status=status)

    def passed(self) -> list[str]:
        return ["--out", self.args.out, "--work", self.args.work] + (["--dry"] if self.args.dry else [])

    def start_build(self) -> None:
        """llm.c's build uses CPUs only: it starts now and runs while the first parts use the GPU."""
        if "llmc" not in self.args.parts or self.args.dry:  # the dry run prints the build's commands in its part
            return
        log = open(os.path.join(self.args.work, "llmc_build.log"), "w", encoding="utf-8")
        command = [sys.executable, "-m", "benchmarks.gpu.peers", "build", *self.passed()]
        self.build = subprocess.Popen(command, cwd=ROOT, env=dict(self.env, GPU_PART="llmc"), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.say(f"=== llm.c build started in the background (log: {log.name})")

    def wait_for_build(self, limit: float) -> None:
        if self.build is None:
            return
        try:
            self.build.wait(timeout=max(limit - 25, 1))
        except subprocess.TimeoutExpired:
            stop_group(self.build)
            self.say("=== llm.c build: STOPPED, it did not finish in time")
        with open(os.path.join(self.args.work, "llmc_build.log"), encoding="utf-8", errors="replace") as f:
            self.say("=== llm.c build log\n" + f.read().rstrip())

    def summary(self) -> None:
        self.say(f"=== summary ({time.time() - self.start:.0f} s elapsed)")
        env = dict(self.env, JAX_PLATFORMS="cpu", GPU_PART="summary")
        self.run_child([sys.executable, "-m", "benchmarks.gpu.summary", *self.passed()], 120, env)
        self.say(f"=== done in {time.time() - self.start:.0f} s; files in {self.args.out}")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL 10 s later if anything is left."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry:
        os.environ["GPT2_JAX_BENCH_DRY"] = "1"
    if args.part:
        run_one(BY_NAME[args.part], args.out, args.work)
        return 0
    call = Call(args)
    call.say(("DRY RUN: the same parts at toy sizes; " if args.dry else "") + f"parts: {', '.join(args.parts)}; "
             f"budget {args.budget:.0f} s; out {args.out}; work {args.work}")  # fmt: skip
    from benchmarks.gpu.peers import carry

    call.env = carry.install_wheels(call.env, args.out, args.work, call.say)
    call.start_build()
    for name in args.parts:
        call.part(BY_NAME[name])
    if call.build is not None and call.build.poll() is None:
        stop_group(call.build)
    call.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
