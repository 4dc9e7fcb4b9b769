"""The llmc part: llm.c's GPT-2 124M trainer on the card, at each training batch, on the shards ours trains on.

    ./train_gpt2cu -i 'SHARDS/shakespeare_train_*.bin' -j 'SHARDS/shakespeare_val_*.bin' -e d12 -b 32 -t 1024
        -x 40 -v 100000 -m 1 -s 0 -r 0 -l 0.0001 -c 0.1

llm.c's own flags (train_gpt2.cu): `-e d12` GPT-2 124M from random weights (no checkpoint file), `-b` batch, `-t`
sequence length, `-x` steps, `-r 0` no recompute (its fastest setting where memory allows: the batch is retried with
`-r 1` after an out-of-memory), `-l`/`-c` our learning rate and weight decay. Validation and sampling: `-v 0` would
divide by zero (`step % val_loss_every`), so `-v 100000 -m 1` leaves one validation batch at the first and the last
step (not timed), and `-s 0` turns sampling off. No `-o`: no log folder, no checkpoints.

Each step prints `step N/M | loss .. | norm .. | lr .. | X ms | Y% bf16 MFU | Z tok/s` (Z a moving average, Y by
llm.c's own count, 6N + 6LCT with N over its padded 50,304-token vocabulary, over its own peak table, which has
no H200: there it prints -100%). The point takes the median step time after the first few steps, and counts MFU as
ours: 6N + 12LHQT with N on the real 50,257-token vocabulary (855 MFLOP/token at T=1024) over the card's dense bf16
peak (the device part's, gpt2_jax/model/flops.py).
"""

from __future__ import annotations

import os
import re
import statistics
from typing import Any

from benchmarks.gpu.common import DRY, Sizes, read_records, record, shard_patterns
from benchmarks.gpu.peers import llmc_build
from benchmarks.gpu.peers.points import card_peak, peer_point, run_peer

STEP = re.compile(
    r"^step\s+(\d+)/(\d+) \| loss (\S+) \(.*?\)\| norm (\S+) \(.*?\)\| lr (\S+) \| ([\d.]+) ms \| (-?[\d.]+)% bf16 MFU"
    r" \| ([\d.]+) tok/s"
)
SKIP_STEPS = 5  # left out of the median: allocation, cuBLAS and cuDNN warm-up


def command(binary: str, train: str, val: str, batch: int, seq: int, steps: int, recompute: int = 0) -> list[str]:
    return [
        binary, "-i", train, "-j", val, "-e", "d12", "-b", str(batch), "-t", str(seq), "-x", str(steps),
        "-v", "100000", "-m", "1", "-s", "0", "-r", str(recompute), "-l", "0.0001", "-c", "0.1",
    ]  # fmt: skip


def parse(output: str) -> list[dict[str, float]]:
    """llm.c's step lines: step, ms, its MFU (a fraction) and its moving-average tok/s."""
    steps = []
    for line in output.splitlines():
        m = STEP.match(line.strip())
        if m:
            steps.append({"step": int(m[1]), "loss": float(m[3]), "ms": float(m[6]), "mfu": float(m[7]) / 100,
                          "tokens_per_s": float(m[8]), "line": line.strip()})  # fmt: skip
    return steps


def point_from(output: str, batch: int, seq: int, peak: tuple[float, str], preset: str = "124M") -> dict[str, Any]:
    """A peer point from one run's output (the fields of ours, see points.py), or one with the error."""
    steps = parse(output)
    steady = steps[min(SKIP_STEPS, len(steps) // 2) :]
    if not steady:
        return {"peer": "llm.c", "job": "train", "batch": batch, "seq": seq, "error": "no step lines in its output"}
    point = peer_point("llm.c", preset, batch, seq, [s["ms"] / 1e3 for s in steady], peak)
    total = [line.strip() for line in output.splitlines() if line.startswith("total average iteration time")]
    point.update(
        steps=len(steps), steady_steps=len(steady), first_loss=steps[0]["loss"],
        printed=[s["line"] for s in steps[-3:]] + total,
        tokens_per_s_printed=steady[-1]["tokens_per_s"],
        mfu_printed=statistics.median(s["mfu"] for s in steady),
    )  # fmt: skip
    return point


def run(out: str, work: str, sizes: Sizes) -> None:
    """Build where the background build did not (or use its binary), then each batch in turn."""
    train, val = shard_patterns(work)
    builds = [r for r in read_records(out) if r["kind"] == "peer_build" and r.get("peer") == "llm.c"]
    if DRY:
        build = llmc_build.build(out, work, dry=True)
        for batch in sizes.train_batches:
            shown = " ".join(command(build["binary"], train, val, batch, sizes.seq, sizes.peer_steps))
            record(out, "skipped", peer="llm.c", job="train", batch=batch, reason="no GPU (dry run)", command=shown)
        return
    build = builds[-1] if builds and builds[-1].get("ok") else llmc_build.build(out, work)
    if not build.get("ok"):
        record(out, "skipped", peer="llm.c", job="train", reason="the build failed: see its peer_build record")
        return
    peak = peak_of(out)
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join([*build["run_dirs"], os.environ.get("LD_LIBRARY_PATH", "")]))
    for batch in sizes.train_batches:
        for recompute in (0, 1):
            argv = command(build["binary"], train, val, batch, sizes.seq, sizes.peer_steps, recompute)
            output, error = run_peer(argv, build["folder"], env)
            print(output[-6000:], flush=True)
            point = point_from(output, batch, sizes.seq, peak, sizes.preset)
            point.update(command=" ".join(argv), recompute=recompute, data=train)
            if error:  # measured steps stand even if it failed afterwards
                point["exit_error" if "tokens_per_s" in point else "error"] = error
            if error or "error" in point:
                point["output_tail"] = output[-2000:]
            record(out, "point", **point)
            if not (recompute == 0 and point.get("error") and "out of memory" in output.lower()):
                break


def peak_of(out: str) -> tuple[float, str]:
    """The dense bf16 peak the device part counted ours against (the same figure for every point)."""
    device = next((r for r in read_records(out) if r["kind"] == "device"), {})
    return card_peak(device)
