"""The data path at pretraining scale: `prepare`'s tokenizing throughput, and training batches from memory-mapped
llm.c shards.

    python -m benchmarks.data                                        # 64 MB of text, 1 worker and every core
    python -m benchmarks.data --text_mb 256 --workers 1,8,16 --batch 64 --seq 1024 --json data.json

Three kinds of point, all on the host CPU (no JAX is imported, so `prepare`'s workers fork as they do in use):
- `prepare`: `gpt2_jax.data.shard_corpus.prepare_shards` (what `gpt2-jax prepare` runs) on a jsonl corpus of
  `--text_mb` MB (the bundled Shakespeare plays, one document each, repeated), with each `--workers` count: MB of
  text per second in all and per worker, and tokens per second. Shards and manifest are written and hashed, as in
  use (into a temporary folder).
- `tiktoken`: the reference: `encode_ordinary_batch` of the same documents on one thread (tiktoken's own batch
  encoder), MB/s; each `prepare` point's `vs_tiktoken` is its MB/s per worker over this.
- `batches`: `BatchSampler` (data/batches.py, the training loop's own batch path) drawing `--steps` batches of
  `--batch` x (`--seq` + 1) tokens from `--shards` llm.c shards of `--shard_tokens` random GPT-2 ids read as one
  stream (`TokenShards`, windows crossing shards), and from one shard alone, on one core: tokens per second (of
  inputs, batch x seq) beside the goal of 1M tokens/s, which keeps a 500k tokens/s training step fed with room to
  spare. The shards are read once before timing (page cache warm, as after the first epoch of a run).

Time on an idle machine: the figures are only meaningful when nothing else runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.host import cpu_model, package_version
from gpt2_jax.data.batches import BatchSampler
from gpt2_jax.data.dataset import read_token_stream
from gpt2_jax.data.shard_corpus import PrepareOptions, prepare_shards
from gpt2_jax.data.shards import ShardFile
from gpt2_jax.prepare import available_cores
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer

CORPUS = Path(__file__).resolve().parent.parent / "data" / "shakespeare"
BATCH_GOAL_TOKENS_PER_S = 1e6


def write_corpus(folder: Path, megabytes: float) -> tuple[Path, list[str]]:
    """A jsonl corpus of about `megabytes` MB of text made of the bundled plays, and its documents."""
    plays = [p.read_text(encoding="utf-8") for p in sorted(CORPUS.glob("*.txt"))]
    documents, size = [], 0
    while size < megabytes * 1e6:
        play = plays[len(documents) % len(plays)]
        documents.append(play[: int(megabytes * 1e6 - size) + 1])
        size += len(documents[-1].encode("utf-8"))
    path = folder / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents)
    return path, documents


def prepare_point(corpus: Path, text_bytes: int, workers: int, out: Path) -> dict[str, Any]:
    options = PrepareOptions(name="bench", shard_size=10_000_000, workers=workers, overwrite=True, progress=False)
    start = time.perf_counter()
    done = prepare_shards(str(corpus), str(out), options)
    seconds = time.perf_counter() - start
    return {
        "job": "prepare", "workers": workers, "text_bytes": text_bytes, "seconds": seconds,
        "mb_per_s": text_bytes / 1e6 / seconds, "mb_per_s_per_worker": text_bytes / 1e6 / seconds / workers,
        "tokens": done.totals["tokens"], "tokens_per_s": done.totals["tokens"] / seconds,
        "documents": done.totals["documents"],
    }  # fmt: skip


def tiktoken_point(documents: list[str], text_bytes: int) -> dict[str, Any]:
    encoding = gpt2_tokenizer().encoding
    start = time.perf_counter()
    n_tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(documents, num_threads=1))
    seconds = time.perf_counter() - start
    return {
        "job": "tiktoken", "workers": 1, "text_bytes": text_bytes, "seconds": seconds,
        "mb_per_s": text_bytes / 1e6 / seconds, "tokens": n_tokens, "tokens_per_s": n_tokens / seconds,
    }  # fmt: skip


def write_random_shards(folder: Path, n_shards: int, n_tokens: int) -> str:
    """`n_shards` llm.c shards of random GPT-2 ids; their glob."""
    rng = np.random.default_rng(0)
    for index in range(n_shards):
        shard = ShardFile(str(folder / f"random_train_{index + 1:06d}.bin"))
        for start in range(0, n_tokens, 1 << 22):
            shard.write(rng.integers(0, 50257, size=min(1 << 22, n_tokens - start), dtype=np.uint16))
        shard.commit()
    return str(folder / "random_train_*.bin")


def batches_point(pattern: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
    tokens = read_token_stream(pattern, gpt2_tokenizer(), progress=False).tokens
    for part in getattr(tokens, "parts", [tokens]):
        int(np.asarray(part).sum(dtype=np.int64))  # read every page once: the timing is of batches, not the disk
    sampler = BatchSampler(tokens, batch, seq, seed=0)
    sampler.next_batch()
    start = time.perf_counter()
    for _ in range(steps):
        sampler.next_batch()
    seconds = time.perf_counter() - start
    rate = steps * batch * seq / seconds
    n_shards = len(getattr(tokens, "parts", [tokens]))
    return {
        "job": "batches", "shards": n_shards, "tokens_in_shards": len(tokens), "batch": batch, "seq": seq,
        "steps": steps, "seconds": seconds, "tokens_per_s": rate, "goal_tokens_per_s": BATCH_GOAL_TOKENS_PER_S,
        "meets_goal": rate >= BATCH_GOAL_TOKENS_PER_S,
    }  # fmt: skip


def environment() -> dict[str, Any]:
    return {
        "host_cpu": cpu_model(), "host_cpu_count": os.cpu_count(), "cores_usable": available_cores(),
        "python": platform.python_version(), "numpy": np.__version__, "tiktoken": package_version("tiktoken"),
        "pyarrow": package_version("pyarrow"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host_load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }  # fmt: skip


def describe(point: dict[str, Any]) -> str:
    if point["job"] == "batches":
        verdict = "meets" if point["meets_goal"] else "misses"
        return (
            f"batches  {point['shards']} shard(s), {point['batch']} x ({point['seq']} + 1): "
            f"{point['tokens_per_s'] / 1e6:.2f}M tok/s on one core ({verdict} the 1M tok/s goal)"
        )
    per_worker = f", {point['mb_per_s_per_worker']:.2f} MB/s per worker" if point["job"] == "prepare" else ""
    ratio = f", {point['vs_tiktoken']:.2f}x tiktoken per core" if "vs_tiktoken" in point else ""
    return (
        f"{point['job']:<8} {point['workers']} worker(s): {point['mb_per_s']:.2f} MB/s of text{per_worker}, "
        f"{point['tokens_per_s'] / 1e3:,.0f}k tok/s{ratio}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cores = available_cores()
    p = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--text_mb", type=float, default=64, help="MB of text for prepare (default: %(default)s)")
    p.add_argument("--workers", default=",".join(sorted({"1", str(cores)})), help="comma list (default: 1,CORES)")
    p.add_argument("--shards", type=int, default=4, help="shards the batches are drawn from (default: %(default)s)")
    p.add_argument("--shard_tokens", type=int, default=1 << 24, help="tokens per shard (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="sequences per batch (default: %(default)s)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="batches timed (default: %(default)s)")
    p.add_argument("--json", help="write {environment, points} here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus, documents = write_corpus(Path(tmp), args.text_mb)
        text_bytes = sum(len(d.encode("utf-8")) for d in documents)
        reference = tiktoken_point(documents, text_bytes)
        for n in workers:
            point = prepare_point(corpus, text_bytes, n, Path(tmp) / "prepared")
            points.append({**point, "vs_tiktoken": point["mb_per_s_per_worker"] / reference["mb_per_s"]})
        points.insert(0, reference)
        (Path(tmp) / "shards").mkdir()
        pattern = write_random_shards(Path(tmp) / "shards", args.shards, args.shard_tokens)
        one = pattern.replace("*", f"{1:06d}")
        for source in (pattern, one) if args.shards > 1 else (one,):
            points.append(batches_point(source, args.batch, args.seq, args.steps))
    for point in points:
        print(describe(point), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": environment(), "points": points}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
