"""What the parts of the GPU call share: their sizes (the device's and the dry run's), the records file, the time
left, the card as nvidia-smi names it, and where the shards lie. Imports no JAX: the orchestrator and the parts that
leave the GPU to another program (the peers, the server, LoRA's children) use it too.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import time
from typing import Any

DRY = os.environ.get("GPT2_JAX_BENCH_DRY") == "1"
DEADLINE = float(os.environ.get("GPU_PART_DEADLINE", "inf"))  # Unix time a part must be done by
PART = os.environ.get("GPU_PART", "")
SHARD_NAME = "shakespeare"


@dataclasses.dataclass(frozen=True)
class Sizes:
    preset: str  # ours and both peers train this GPT-2
    dtype: str
    seq: int  # training tokens per row
    train_batches: tuple[int, ...]  # ours and llm.c; the first also gets the loss check and nanoGPT's first run
    data_batches: int  # distinct shard batches a timed training step cycles through
    peer_steps: int  # llm.c steps per run (the first few are left out of the median)
    decode_batches: tuple[int, ...]  # the first: batch-1 latency, greedy too; the last: bandwidth and the long run
    prompt: int
    new_tokens: int
    long_tokens: int
    matmul_n: int  # of the bf16 matmul ceiling
    check: tuple[str, int, int]  # the check part's preset, batch, seq
    point_s: float  # a part starts a point only with this many seconds left (twice that beside PyTorch)
    torch_compile: str  # backend of the torch.compile column beside our decoding
    serve: tuple[str, tuple[int, ...], int, int]  # preset, clients, requests per client, new tokens
    lora: tuple[str, int, int]  # preset, batch, seq
    topk: tuple[tuple[int, ...], int]  # batches, iterations per timed loop
    profile_batch: int  # the traced training step's batch


SIZES = Sizes(
    preset="124M", dtype="bfloat16", seq=1024, train_batches=(32, 64), data_batches=8, peer_steps=40,
    decode_batches=(1, 64), prompt=16, new_tokens=128, long_tokens=1000, matmul_n=8192, check=("124M", 4, 1024),
    point_s=40.0, torch_compile="inductor", serve=("124M", (1, 16, 64), 4, 128), lora=("1558M", 1, 1024),
    topk=((1, 64), 200), profile_batch=32,
)  # fmt: skip
# The dry run checks the plumbing on a CPU: every part at toy sizes, torch.compile's graph capture without
# inductor's minutes of code generation.
DRY_SIZES = Sizes(
    preset="tiny", dtype="float32", seq=64, train_batches=(4, 8), data_batches=3, peer_steps=12,
    decode_batches=(1, 8), prompt=16, new_tokens=16, long_tokens=96, matmul_n=512, check=("tiny", 2, 64),
    point_s=5.0, torch_compile="eager", serve=("tiny", (1, 4), 2, 16), lora=("tiny", 1, 64), topk=((1, 2), 5),
    profile_batch=4,
)  # fmt: skip


def sizes() -> Sizes:
    return DRY_SIZES if DRY else SIZES


def time_left() -> float:
    return DEADLINE - time.time()


def record(out: str, kind: str, **fields: Any) -> dict:
    """Append one record to out/records.jsonl as soon as it exists (and print it); a part killed later keeps it."""
    fields = {"kind": kind, "part": fields.pop("part", PART), **fields}
    fields |= {"xla_flags": os.environ.get("XLA_FLAGS", ""), "time": time.time()}
    line = json.dumps(fields, default=float)
    print(line, flush=True)
    with open(os.path.join(out, "records.jsonl"), "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return fields


def read_records(out: str) -> list[dict]:
    """records.jsonl's records; a line cut short by a killed part is left out."""
    records = []
    path = os.path.join(out, "records.jsonl")
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def device_record(out: str) -> dict:
    """The device part's record (card, peak, ceilings), or {} where it did not run."""
    return next((r for r in read_records(out) if r["kind"] == "device"), {})


def nvidia_smi() -> dict[str, str]:
    """The first GPU's name, power limits, max clocks, memory, compute capability and driver, as nvidia-smi prints
    them (an SXM and an NVL part of the same chip differ in power, clocks and peak)."""
    fields = ["name", "power.limit", "power.max_limit", "clocks.max.sm", "clocks.max.mem", "memory.total"]
    fields += ["compute_cap", "driver_version"]
    query = [f"--query-gpu={','.join(fields)}", "--format=csv,noheader"]
    try:
        out = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    return dict(zip(fields, (v.strip() for v in out.splitlines()[0].split(","))))


def shard_patterns(work: str) -> tuple[str, str]:
    """The train and validation shard patterns that the shards part writes (gpt2-jax prepare's names)."""
    folder = os.path.join(work, "shards")
    return os.path.join(folder, f"{SHARD_NAME}_train_*.bin"), os.path.join(folder, f"{SHARD_NAME}_val_*.bin")


def shards_ready(work: str) -> bool:
    return all(glob.glob(pattern) for pattern in shard_patterns(work))
