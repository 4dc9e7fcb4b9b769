"""Turn a corpus into llm.c token shards ahead of pretraining: `gpt2-jax prepare INPUT OUT_DIR` (also `python -m
gpt2_jax.prepare`).

    gpt2-jax prepare 'fineweb/sample/10BT/*.parquet' data/fineweb10B --name fineweb --workers 16

INPUT is any dataset path train.py takes; the shards hold GPT-2's ids, 100M tokens each, the first one validation
(gpt2_jax/data/shard_corpus.py says how the stream is made; manifest.py what is recorded and how a killed run resumes).
Nothing here imports JAX, so the worker processes are plain forks (data/workers.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from gpt2_jax.cli import ArgumentParser, run_cli
from gpt2_jax.data.manifest import MANIFEST
from gpt2_jax.data.shard_corpus import DEFAULT_SHARD_SIZE, PrepareOptions, prepare_shards
from gpt2_jax.hints import command_for


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the whole machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m gpt2_jax.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="dataset: a file, folder or glob of any format train.py --dataset reads")
    parser.add_argument("out_dir", help="folder for the shards and manifest.json (created)")
    parser.add_argument("--name", help="shard name prefix: NAME_val_000000.bin, NAME_train_000001.bin, ... "
                        "(default: OUT_DIR's name)")  # fmt: skip
    parser.add_argument(
        "--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per shard (default: %(default)s)"
    )
    parser.add_argument(
        "--val_shards", type=int, default=1, help="the first this many shards are validation; 0: none (default: 1)"
    )
    parser.add_argument("--workers", type=int, help="tokenizing processes (default: every core this process may use)")
    parser.add_argument("--text_column", help="field or column with the text in .jsonl, .csv, .parquet (default: text)")
    parser.add_argument("--overwrite", action="store_true", help="delete the shards of another run in OUT_DIR first")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = os.path.abspath(args.out_dir)
    options = PrepareOptions(
        name=args.name or os.path.basename(out_dir), shard_size=args.shard_size, val_shards=args.val_shards,
        workers=available_cores() if args.workers is None else args.workers, text_column=args.text_column,
        overwrite=args.overwrite, progress=not args.quiet,
    )  # fmt: skip
    done = prepare_shards(args.input, args.out_dir, options)
    totals, n_val = done.totals, sum(s["split"] == "val" for s in done.shards)
    if done.already_complete:
        print(f"{args.out_dir} already holds the finished shards of {args.input} (see its {MANIFEST}).")
    else:
        resumed = f", after the {done.kept} a previous run had finished" if done.kept else ""
        print(
            f"wrote {len(done.shards) - done.kept} shards{resumed}: {len(done.shards)} in all ({n_val} validation), "
            f"{totals['tokens']:,} tokens from {totals['documents']:,} documents, into {args.out_dir}"
        )
    for what, count in (("invalid UTF-8 bytes replaced", "replaced_bytes"), ("null texts skipped", "null_texts")):
        if totals.get(count):
            print(f"note: {totals[count]:,} {what}", file=sys.stderr)
    pattern = os.path.join(args.out_dir, options.name)
    if n_val == len(done.shards):
        print("note: every shard is validation; lower --shard_size or --val_shards to train on some.", file=sys.stderr)
    else:
        val = f" --val_dataset '{pattern}_val_*.bin'" if n_val else ""
        print(f"train on them: {command_for('train')} --dataset '{pattern}_train_*.bin'{val} ...")
    return 0


if __name__ == "__main__":
    run_cli(main)
