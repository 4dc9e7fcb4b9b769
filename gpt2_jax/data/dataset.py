"""Datasets: find the files, read them, tokenize once, keep the tokens as a memory-mapped array.

`read_token_stream(path, tokenizer)` is a whole dataset as one token stream (what `evaluate` scores);
`load_dataset(path, tokenizer)` is that stream split for training and validation. A path is a file, a folder
(read recursively, in sorted path order, skipping hidden files and files of other types) or a glob
(`'data/**/*.txt'`) of .txt/.md text, .jsonl (a "text" field per line), .csv (a "text" column, else the first),
.parquet (a "text" column; `text_column` names another for these three) and pre-tokenized .npy/.bin token files;
`files.py` reads them.

Documents are joined by the tokenizer's real end-of-text token (id 50256 for GPT-2), added between documents
(not where a pre-tokenized file already ends with it). A literal "<|endoftext|>" typed inside the text is NOT a
boundary: it is encoded as the ordinary text it is (7 tokens with GPT-2's BPE), so text cannot forge the token.
Bytes that are not valid UTF-8 are replaced by U+FFFD and counted (`n_replaced_bytes`), never fatal; a UTF-8
byte-order mark at the start of a file is dropped.

Tokenizing runs once, in parallel threads, with a progress bar on stderr; the tokens go to a uint16 (vocabularies
up to 65,536 ids) or uint32 cache file (see `cache.py`) beside the data: next to a file, inside a folder, in
the glob's common folder, or in `cache_dir` (also the fallback, ~/.cache/gpt2_jax, when that place is read-only).
The cache key hashes the files' paths and contents and the tokenizer's vocabulary, so a second run starts at once
and an edited file is re-tokenized. A single pre-tokenized file already in the right dtype is mapped directly, and
so are llm.c shards (`shards.py`): however many a glob names, they are read end to end, in sorted order, as one
stream (`TokenShards`), never copied; their ids are GPT-2's, so another tokenizer is refused.

Validation: by default the last `val_fraction` of the token stream is held out, one contiguous block the training
batches never touch (windows sampled from the training data would let a model memorise its data unnoticed);
`val_path` reads a separate dataset instead (then all of `path` trains).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from gpt2_jax.data import cache as token_cache
from gpt2_jax.data import files as data_files
from gpt2_jax.data import shards
from gpt2_jax.data.files import TOKEN_EXTENSIONS, DatasetFiles, Piece, find_dataset_files
from gpt2_jax.data.joining import Joiner, encode_group
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.tokenizers.base import Tokenizer

READER_VERSION = "data-v1"  # bump when reading or joining changes, so old caches are not reused
GROUP_CHARS: int | None = None  # text per encode_batch call (one progress update); None: two pieces per thread


@dataclasses.dataclass
class TokenStream:
    """One dataset path read whole: every document's tokens, joined by end-of-text, nothing held out."""

    tokens: np.ndarray | shards.TokenShards  # 1-D uint16 (n_vocab <= 65536) or uint32 ids, usually memory-mapped
    n_documents: int  # files, jsonl lines, csv and parquet rows
    n_replaced_bytes: int  # invalid UTF-8 bytes replaced by U+FFFD
    source: str  # what was read, in words
    cache_path: str | None = None  # the token cache, when one was used
    n_null_texts: int = 0  # parquet rows whose text was null, skipped


@dataclasses.dataclass
class TokenDataset:
    train: np.ndarray | shards.TokenShards  # 1-D uint16 (n_vocab <= 65536) or uint32 ids, usually memory-mapped
    val: np.ndarray | shards.TokenShards | None  # held-out tokens; None when val_fraction == 0 and no val_path
    n_documents: int  # documents read (train and val together): files, jsonl lines, csv and parquet rows
    n_replaced_bytes: int  # invalid UTF-8 bytes replaced by U+FFFD
    source: str  # what was read, in words
    cache_path: str | None = None  # the token cache of `path`, when one was used
    n_null_texts: int = 0  # parquet rows whose text was null, skipped (train and val together)


def load_dataset(
    path: str,
    tokenizer: Tokenizer,
    *,
    val_fraction: float = 0.05,
    val_path: str | None = None,
    cache_dir: str | None = None,
    seq_len: int | None = None,
    progress: bool = True,
    text_column: str | None = None,
) -> TokenDataset:
    """Tokens for training (and validation) from `path`; see the module docstring for formats, joining and caching.

    With `seq_len`, each split must hold at least one window of seq_len + 1 tokens, else a UserError says how many
    tokens were found and what to change.
    """
    if not 0 <= val_fraction < 1:
        raise UsageError(f"--val_fraction must be at least 0 and below 1, got {val_fraction}.")
    if seq_len is not None and seq_len < 1:
        raise UsageError(f"--seq_len must be a positive number of tokens, got {seq_len}.")
    read = dict(cache_dir=cache_dir, progress=progress, text_column=text_column)
    stream = read_token_stream(path, tokenizer, **read)
    tokens, n_docs, n_replaced, source = stream.tokens, stream.n_documents, stream.n_replaced_bytes, stream.source
    n_null = stream.n_null_texts
    if val_path is not None:
        train = tokens
        held = read_token_stream(val_path, tokenizer, **read, flag="--val_dataset")
        val, n_docs, n_replaced = held.tokens, n_docs + held.n_documents, n_replaced + held.n_replaced_bytes
        n_null += held.n_null_texts
        source = f"{source}; validation: {held.source}"
    elif val_fraction > 0:
        n_val = max(1, round(len(tokens) * val_fraction))
        train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    else:
        train, val = tokens, None
    if seq_len is not None:
        _check_long_enough(train, val, seq_len, path, val_path, val_fraction)
    if progress:
        held = f", {len(val):,} held out for validation" if val is not None else ""
        fixed = f", {n_replaced:,} invalid UTF-8 bytes replaced" if n_replaced else ""
        nulls = f", {n_null:,} null texts skipped" if n_null else ""
        print(f"dataset: {source}: {len(train):,} training tokens{held}{fixed}{nulls}", file=sys.stderr)
    return TokenDataset(train, val, n_docs, n_replaced, source, stream.cache_path, n_null)


def _check_long_enough(train, val, seq_len, path, val_path, val_fraction) -> None:
    window = seq_len + 1
    if len(train) < window:
        fix = " or --val_fraction" if val_fraction > 0 and val_path is None else ""
        raise UserError(
            f"The training split of {path} has {len(train):,} tokens, fewer than one window of seq_len + 1 = "
            f"{window:,}; lower --seq_len{fix} or add more text."
        )
    if val is not None and len(val) < window:
        what = f"Validation dataset {val_path}" if val_path is not None else f"The validation split of {path}"
        fix = "add more text to it" if val_path is not None else "raise --val_fraction, pass --val_dataset"
        raise UserError(
            f"{what} has {len(val):,} tokens, fewer than one window of seq_len + 1 = {window:,}; "
            f"lower --seq_len or {fix}."
        )


# --- tokens for one dataset path: cached, or mapped directly -----------------------------------------------------
def read_token_stream(
    path: str,
    tokenizer: Tokenizer,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
    flag: str = "--dataset",
    text_column: str | None = None,
) -> TokenStream:
    """The whole dataset at `path` as one token stream (see the module docstring for formats, joining, caching).

    `progress` shows the tokenizing bar on stderr; `flag` is the command-line flag that named `path`, for the
    error sentences; `text_column` the field or column of .jsonl, .csv and .parquet files that holds the text.
    """
    files = find_dataset_files(path)
    source = path if len(files.paths) == 1 else f"{path} ({len(files.paths)} files)"
    dtype = np.dtype(np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32)
    if data_files.are_shards(files, flag):
        return TokenStream(_mapped_shards(files.paths, tokenizer), len(files.paths), 0, source)
    if len(files.paths) == 1 and data_files.extension(files.paths[0]) in TOKEN_EXTENSIONS:
        tokens = data_files.open_token_file(files.paths[0], tokenizer.n_vocab)
        if tokens.dtype == dtype:  # already what training reads: map it, no copy
            data_files.check_ids(tokens, files.paths[0], tokenizer.n_vocab)
            if not len(tokens):
                raise UserError(f"Dataset file {path} holds no tokens; point {flag} at a non-empty file.")
            return TokenStream(tokens, 1, 0, source)
    tag = token_cache.tokenizer_tag(tokenizer)
    salt = f"{READER_VERSION}|{dtype.name}|{token_cache.tokenizer_fingerprint(tokenizer)}"
    if text_column is not None:  # only then: caches made before the flag existed stay valid
        salt += f"|column={text_column}"
    key = token_cache.content_key(files.paths, files.root, salt)
    places = _cache_places(files, tag, key, cache_dir)
    for cache_path in places:
        cached = token_cache.read_cache(cache_path, key)
        if cached is not None:
            tokens, header = cached
            n_null = header.get("n_null_texts", 0)
            return TokenStream(tokens, header["n_documents"], header["n_replaced_bytes"], source, cache_path, n_null)
    for cache_path in places:
        try:
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            writer = token_cache.CacheWriter(cache_path, key, dtype)
        except OSError:
            continue  # read-only data folder: try the next place
        with writer:
            try:
                n_docs, n_replaced, n_null = _tokenize_into(writer, files, tokenizer, progress, text_column)
                if writer.n_tokens == 0:
                    raise UserError(
                        f"Dataset {path} holds no text: {len(files.paths)} file(s) read, 0 tokens; "
                        f"add text or point {flag} elsewhere."
                    )
                tokens = writer.commit(n_documents=n_docs, n_replaced_bytes=n_replaced, n_null_texts=n_null)
            except OSError as e:  # reading errors are UserErrors already: this is the cache's disk
                raise UserError(f"Cannot write the token cache {cache_path}: {e.strerror or e}; free space there.")
        return TokenStream(tokens, n_docs, n_replaced, source, cache_path, n_null)
    raise UserError(f"No writable folder for the token cache of {path} (tried {', '.join(places)}); pass cache_dir.")


def _cache_places(files: DatasetFiles, tag: str, key: str, cache_dir: str | None) -> list[str]:
    """Where the cache may live, best first: beside the data, else the user's cache folder."""
    elsewhere = cache_dir or token_cache.default_cache_dir()
    # Away from the data, several datasets share one folder: the stem gets a hash of where the data lies.
    far_stem = f"{files.stem}-{hashlib.sha256(files.root.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    far = os.path.join(os.path.expanduser(elsewhere), token_cache.cache_name(far_stem, tag, key))
    return [far] if cache_dir else [os.path.join(files.root, token_cache.cache_name(files.stem, tag, key)), far]


def _mapped_shards(shard_files: list[str], tokenizer: Tokenizer) -> np.ndarray | shards.TokenShards:
    """llm.c shards, memory-mapped and read end to end (no cache: they are tokens already, and may be many GB)."""
    shards.require_gpt2(tokenizer, shard_files[0])
    parts = [shards.open_shard(f) for f in shard_files]  # every header checked before training starts
    return parts[0] if len(parts) == 1 else shards.TokenShards(parts)


def _tokenize_into(
    writer: token_cache.CacheWriter, files: DatasetFiles, tokenizer: Tokenizer, progress: bool, text_column: str | None
) -> tuple[int, int, int]:
    """Read every file, tokenize in parallel, append to `writer`; returns (documents, replaced bytes, null texts)."""
    can_cut = data_files.cuts_are_exact(tokenizer)
    total = sum(os.path.getsize(f) for f in files.paths)
    desc = f"tokenizing {files.stem}"
    data_files.reset_replaced_count()
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr) as bar:
        pieces = (p for f in files.paths for p in data_files.read_file(f, tokenizer.n_vocab, can_cut, text_column))
        n_docs = _encode_pieces(pieces, tokenizer, writer, bar)
    return n_docs, data_files.replaced_count(), data_files.null_count()


def _encode_pieces(pieces: Iterator[Piece], tokenizer: Tokenizer, writer: token_cache.CacheWriter, bar: tqdm) -> int:
    """Encode text pieces in parallel batches, in order, with the end-of-text id between documents."""
    threads = min(32, os.cpu_count() or 1)
    joiner = Joiner(tokenizer.eot_id, writer.dtype, GROUP_CHARS or 2 * threads * data_files.CHUNK_CHARS)
    for group in joiner.groups(pieces):
        writer.write(encode_group(group, tokenizer, writer.dtype, threads))
        bar.update(group.n_bytes)
    return joiner.n_documents
