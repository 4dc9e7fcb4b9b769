"""`prepare`'s work: a dataset read once, tokenized by worker processes, and cut into llm.c shards (shards.py).

The stream: the input's documents in the order train.py reads them (files.py), joined by <|endoftext|> as train.py
joins them (joining.py), with one more <|endoftext|> in front, so that every document begins with it as in llm.c's
fineweb.py (and modded-nanogpt's loaders, which align batches to it). Every `shard_size` tokens make a shard; the
first `val_shards` are validation (`NAME_val_000000.bin`), the rest training (`NAME_train_000001.bin`, ...).

Deterministic: the stream is cut into groups by the input alone (GROUP_CHARS, never the worker count) and the groups'
tokens are written in input order, so 1 worker or N give the same bytes.

Resumable: a shard is written as `NAME.bin.tmp`, renamed when complete, then recorded in the manifest (manifest.py)
with where the stream stands after it: the group and the token offset in it. A restart keeps the recorded shards,
re-reads the input up to that group without tokenizing it, and goes on from there.

Bounded memory: documents stream from the readers, at most 2 x workers groups are in flight (workers.py), and tokens
go straight into the shard file.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from gpt2_jax.data import files as data_files
from gpt2_jax.data import manifest, shards
from gpt2_jax.data.joining import Group, Joiner, encode_group
from gpt2_jax.data.workers import OrderedPool
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.tokenizers.base import Tokenizer
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer

GROUP_CHARS = 1 << 19  # text per task sent to a worker: enough to pay for the hand-over, little to hold in flight
DEFAULT_SHARD_SIZE = 100_000_000


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    name: str  # shards are NAME_val_000000.bin, NAME_train_000001.bin, ...
    shard_size: int = DEFAULT_SHARD_SIZE  # tokens per shard (the last one may hold fewer)
    val_shards: int = 1  # the first this many shards are validation
    workers: int = 1  # tokenizing processes
    text_column: str | None = None  # field or column of .jsonl, .csv and .parquet files that holds the text
    overwrite: bool = False  # delete shards of another run in the output folder instead of refusing
    progress: bool = True  # a progress bar on stderr

    def check(self) -> None:
        if not (self.name and all(c.isalnum() or c in "._-" for c in self.name)):
            raise UsageError(f"--name {self.name!r} must be letters, digits, '.', '_' or '-' (it starts file names).")
        if not 1 <= self.shard_size <= shards.MAX_TOKENS:
            raise UsageError(f"--shard_size must lie in 1 .. {shards.MAX_TOKENS:,} tokens, got {self.shard_size}.")
        if self.val_shards < 0:
            raise UsageError(f"--val_shards must be 0 (no validation shard) or more, got {self.val_shards}.")
        if self.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {self.workers}.")


@dataclasses.dataclass
class Prepared:
    shards: list[dict]  # every shard, as the manifest lists it
    totals: dict  # tokens, documents, input bytes, replaced bytes, null texts
    kept: int  # shards a previous, interrupted run had finished
    already_complete: bool  # a previous run had finished it all: nothing was done


def prepare_shards(input_path: str, out_dir: str, options: PrepareOptions) -> Prepared:
    """Write the shards of `input_path` into `out_dir` (see the module docstring), or resume or refuse."""
    options.check()
    files = data_files.find_dataset_files(input_path)
    data_files.are_shards(files, "INPUT")  # the same rule as train.py's: shards alone, or none
    tokenizer = gpt2_tokenizer()  # llm.c shards hold GPT-2's ids
    settings = _settings(files, tokenizer, options)
    os.makedirs(out_dir, exist_ok=True)
    kept, totals = manifest.resume_point(out_dir, settings, options.overwrite)
    if totals is not None:
        return Prepared(kept, totals, len(kept), True)
    if kept and kept[-1]["next"] is None:  # killed after the last shard, before the totals: redo that shard
        kept.pop()
    sink = ShardSink(out_dir, options, settings, kept)
    resume = tuple(kept[-1]["next"]) if kept else (0, 0)
    # The pool first: its processes are forked before this one starts threads (workers.py).
    with OrderedPool(options.workers, _set_tokenizer, (tokenizer,)) as pool:
        data_files.reset_replaced_count()
        can_cut = data_files.cuts_are_exact(tokenizer)
        pieces = (
            piece
            for path in files.paths
            for piece in data_files.read_file(path, tokenizer.n_vocab, can_cut, options.text_column)
        )
        joiner = Joiner(tokenizer.eot_id, np.dtype(np.uint16), GROUP_CHARS)
        total_bytes = sum(size for _, size, _ in settings["input"]["files"])
        with _Progress(total_bytes, f"preparing {files.stem}", options.progress) as progress:
            try:
                todo = _groups_from(joiner.groups(pieces), resume[0], progress)
                for index, n_bytes, tokens_T in pool.map(_encode, todo):
                    if index == 0 and len(tokens_T) and tokens_T[0] != tokenizer.eot_id:
                        tokens_T = np.concatenate([[tokenizer.eot_id], tokens_T]).astype(np.uint16)
                    sink.write(tokens_T, index, resume[1] if index == resume[0] else 0)
                    progress.advance(n_bytes, len(tokens_T))
                sink.finish()
            except BaseException:
                sink.abort()
                raise
    n_tokens = sum(s["tokens"] for s in sink.shards)
    if n_tokens == 0:
        raise UserError(f"Dataset {input_path} holds no text: {len(files.paths)} file(s) read, 0 tokens.")
    totals = {
        "tokens": n_tokens,
        "val_tokens": sum(s["tokens"] for s in sink.shards if s["split"] == "val"),
        "documents": joiner.n_documents,
        "input_bytes": total_bytes,
        "replaced_bytes": data_files.replaced_count(),
        "null_texts": data_files.null_count(),
    }
    manifest.write(out_dir, settings, sink.shards, totals)
    return Prepared(sink.shards, totals, len(kept), False)


def _settings(files: data_files.DatasetFiles, tokenizer: Tokenizer, options: PrepareOptions) -> dict:
    """What the shards' bytes depend on; not how the run goes (workers, progress) nor `overwrite`."""
    choices = dataclasses.asdict(options)
    for key in ("workers", "overwrite", "progress"):
        del choices[key]
    return manifest.settings_of(files, tokenizer, group_chars=GROUP_CHARS, **choices)


def _groups_from(groups: Iterator[Group], first: int, progress: _Progress) -> Iterator[tuple[int, Group]]:
    """(index, group) from group `first` on; the earlier ones (done before a restart) are read, never encoded."""
    for index, group in enumerate(groups):
        if index < first:
            progress.advance(group.n_bytes, 0)
            continue
        yield index, group


_tokenizer: Tokenizer | None = None  # in each worker: the tokenizer, set once by the pool


def _set_tokenizer(tokenizer: Tokenizer) -> None:
    global _tokenizer
    _tokenizer = tokenizer


def _encode(task: tuple[int, Group]) -> tuple[int, int, np.ndarray]:
    index, group = task
    return index, group.n_bytes, encode_group(group, _tokenizer, np.dtype(np.uint16), threads=1)


class ShardSink:
    """Takes the stream's tokens group by group and writes them as shards of `shard_size`; after each shard, the
    manifest records it with the (group, offset) the next shard starts at."""

    def __init__(self, out_dir: str, options: PrepareOptions, settings: dict, kept: list[dict]) -> None:
        self.out_dir, self.options, self.settings = out_dir, options, settings
        self.shards = list(kept)
        self.file: shards.ShardFile | None = None

    def write(self, tokens_T: np.ndarray, group: int, offset: int = 0) -> None:
        """Group `group`'s tokens from `offset` on (a restart resumes inside the group)."""
        while offset < len(tokens_T):
            if self.file is None:
                index = len(self.shards)
                name = manifest.shard_name(self.options.name, index, self.options.val_shards)
                self.file = shards.ShardFile(os.path.join(self.out_dir, name))
            take = tokens_T[offset : offset + self.options.shard_size - self.file.n_tokens]
            self.file.write(take)
            offset += len(take)
            if self.file.n_tokens == self.options.shard_size:
                self._commit(next_at=[group, offset])

    def finish(self) -> None:
        if self.file is not None and self.file.n_tokens:
            self._commit(next_at=None)

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()
            self.file = None

    def _commit(self, next_at: list[int] | None) -> None:
        index, n_tokens = len(self.shards), self.file.n_tokens
        digest = self.file.commit()
        split = "val" if index < self.options.val_shards else "train"
        record = {"file": os.path.basename(self.file.path), "split": split, "tokens": n_tokens, "sha256": digest}
        self.shards.append({**record, "next": next_at})
        self.file = None
        manifest.write(self.out_dir, self.settings, self.shards)


class _Progress:
    """tqdm over the input's bytes (MB/s), with the tokens/s in its postfix."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool) -> None:
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not enabled, file=sys.stderr)
        self.tokens, self.start = 0, time.perf_counter()

    def advance(self, n_bytes: int, n_tokens: int) -> None:
        self.tokens += n_tokens
        if n_tokens:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate / 1e3:,.0f}k tok/s", refresh=False)
        self.bar.update(n_bytes)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
