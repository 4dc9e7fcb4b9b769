"""The shards part (issue 22): the bundled corpus tokenized by our own `gpt2-jax prepare` into llm.c shards, the
tokens both ours (the train part) and llm.c (the llmc part) train on.

    gpt2-jax prepare data/shakespeare WORK/shards --name shakespeare --shard_size 114688

data/shakespeare holds 456,429 GPT-2 tokens: one validation shard and three training shards of 112 Ki tokens (the
last one a little shorter). llm.c's loader asserts that every shard it opens, validation included, holds at least
batch x seq + 1 tokens (65,537 at batch 64), so the part checks that too, before llm.c would abort on it. Prepare
runs no JAX and takes seconds; a rerun finds the finished shards and keeps them.
"""

from __future__ import annotations

import glob
import os
import time

from benchmarks.gpu.common import SHARD_NAME, Sizes, record, shard_patterns
from gpt2_jax.data.shards import shard_tokens
from gpt2_jax.prepare import main as prepare

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "data", "shakespeare")
SHARD_TOKENS = 114_688


def run(out: str, work: str, sizes: Sizes) -> None:
    folder = os.path.join(work, "shards")
    argv = [CORPUS, folder, "--name", SHARD_NAME, "--shard_size", str(SHARD_TOKENS), "--workers", "4", "--quiet"]
    start = time.time()
    prepare(argv)
    seconds = time.time() - start
    train, val = shard_patterns(work)
    paths = sorted(glob.glob(val) + glob.glob(train))
    shards = [{"file": os.path.basename(p), "tokens": shard_tokens(p)} for p in paths]
    needed = max(sizes.train_batches) * sizes.seq + 1  # llm.c's dataloader_init assert, per shard
    short = [s["file"] for s in shards if s["tokens"] < needed]
    record(
        out, "shards", command="gpt2-jax prepare " + " ".join(argv), seconds=seconds, train_pattern=train,
        val_pattern=val, shards=shards, tokens=sum(s["tokens"] for s in shards), tokens_needed_per_shard=needed,
        ok=bool(shards) and not short, error=f"shorter than {needed:,} tokens: {', '.join(short)}" if short else None,
    )  # fmt: skip
