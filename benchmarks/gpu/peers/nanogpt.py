"""The nanogpt part: nanoGPT's own benchmark, bench.py, unchanged, from its carried copy (.peers/nanoGPT):

    python3 bench.py --batch_size=32 --block_size=1024 --dtype=bfloat16 --compile=True --real_data=False --bias=True

Through its configurator (`--key=value` over bench.py's globals): GPT-2 124M's shapes (12 x 768, block 1024), with
biases as GPT-2 has them (bench.py's default is bias=False; ours and llm.c's model have biases), bf16 autocast,
`torch.compile` (the default mode), random tokens on the device (`real_data=False`: its real-data path reads
data/openwebtext/train.bin). It runs 10 steps to warm up and compile, then times 20 steps with a synchronize and a
`loss.item()` every step (as ours syncs the host every step), and prints `time per iteration: Xms, MFU: Y%` (Y over
an A100's 312 TFLOP/s, with N over its padded 50,304-token vocabulary). The point takes X as the step time and counts
MFU as ours does (points.py): batch x 1024 tokens per step, 6N + 12LHQT on 50,257, over the card's bf16 peak.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from benchmarks.gpu.common import DRY, Sizes, record, time_left
from benchmarks.gpu.peers.carry import PEERS
from benchmarks.gpu.peers.llmc import peak_of
from benchmarks.gpu.peers.points import peer_point, run_peer

TIMED = re.compile(r"^time per iteration: ([\d.]+)ms, MFU: (-?[\d.]+)%")
LOSS = re.compile(r"^(\d+)/(\d+) loss: (\S+)")


def command(batch: int, seq: int) -> list[str]:
    return [
        sys.executable, "bench.py", f"--batch_size={batch}", f"--block_size={seq}", "--dtype=bfloat16",
        "--compile=True", "--real_data=False", "--bias=True",
    ]  # fmt: skip


def point_from(output: str, batch: int, seq: int, peak: tuple[float, str], preset: str = "124M") -> dict[str, Any]:
    """A peer point from bench.py's output, or one with the error."""
    lines = [line.strip() for line in output.splitlines()]
    timed = [m for line in lines if (m := TIMED.match(line))]
    if not timed:
        return {"peer": "nanoGPT", "job": "train", "batch": batch, "seq": seq, "error": "no 'time per iteration' line"}
    step_ms, mfu = float(timed[-1][1]), float(timed[-1][2]) / 100
    point = peer_point("nanoGPT", preset, batch, seq, [step_ms / 1e3], peak)
    losses = [line for line in lines if LOSS.match(line)]
    point.update(
        steps=20, printed=[*losses[-1:], timed[-1][0]], mfu_printed=mfu,
        tokens_per_s_printed=None,  # bench.py prints no tok/s: tokens_per_s is batch x seq over its ms
        first_loss=float(LOSS.match(losses[0])[3]) if losses else None,
    )  # fmt: skip
    return point


def run(out: str, work: str, sizes: Sizes) -> None:
    folder = os.path.join(PEERS, "nanoGPT")
    for batch in sizes.train_batches:
        argv = command(batch, sizes.seq)
        shown = f"cd {folder} && python3 {' '.join(argv[1:])}"
        if DRY:
            record(out, "skipped", peer="nanoGPT", job="train", batch=batch, reason="no GPU (dry run)", command=shown)
            continue
        if not os.path.isfile(os.path.join(folder, "bench.py")):
            record(out, "skipped", peer="nanoGPT", reason=f"{folder} is missing: run `python -m benchmarks.gpu.peers"
                   " fetch` before the call and carry .peers")  # fmt: skip
            return
        if time_left() < 50:
            record(out, "skipped", peer="nanoGPT", job="train", batch=batch, reason="time limit")
            continue
        output, error = run_peer(argv, folder)
        print(output[-4000:], flush=True)
        point = point_from(output, batch, sizes.seq, peak_of(out), sizes.preset)
        point.update(command=shown, data="random tokens (bench.py real_data=False)")
        if error:
            point["exit_error" if "tokens_per_s" in point else "error"] = error
            point["output_tail"] = output[-2000:]
        record(out, "point", **point)
