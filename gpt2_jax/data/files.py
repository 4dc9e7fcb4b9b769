"""Dataset files: which files a dataset path names, and how each format is read into document pieces.

A path is a file, a folder (read recursively in sorted path order; hidden files and folders and files of other
types are skipped) or a glob (`'data/**/*.txt'`). Formats:
  .txt .md   plain text, one document per file
  .jsonl     one document per line, from its "text" field
  .csv       one document per row, from the "text" column, else the first column (the first row is the header)
  .parquet   one document per row, from the "text" column (parquet.py); a null text is skipped and counted
  .npy       a 1-D integer array of token ids (one document)
  .bin       an llm.c shard (shards.py: header, then uint16 GPT-2 ids), else raw little-endian uint16 token ids as
             nanoGPT's prepare.py writes them (one document)
`text_column` names another field, column or parquet column for the text of .jsonl, .csv and .parquet files.

Readers yield pieces `(starts_document, text or token ids, file bytes accounted for)`. Bytes that are not valid
UTF-8 become U+FFFD and are counted (`replaced_count`, and `null_count` for parquet's null texts), as are lone
surrogates from JSON escapes (`"\\ud800"`); a UTF-8 byte-order mark at the start of a file is dropped.
Long texts are streamed and cut into pieces only where the tokenizer's output does not change (`cuts_are_exact`),
so tokenizing the pieces in parallel gives exactly the tokens of the whole document.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import glob
import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator

import numpy as np

from gpt2_jax.data import shards
from gpt2_jax.data.parquet import parquet_batches
from gpt2_jax.errors import UserError
from gpt2_jax.tokenizers.base import Tokenizer
from gpt2_jax.unicode import repair_json

TEXT_EXTENSIONS = (".txt", ".md")
TOKEN_EXTENSIONS = (".npy", ".bin")
EXTENSIONS = (*TEXT_EXTENSIONS, ".jsonl", ".csv", ".parquet", *TOKEN_EXTENSIONS)
CHUNK_CHARS = 1 << 18  # long documents are cut into pieces of about this size so threads share the work
READ_BYTES = 1 << 22
TOKEN_CHUNK = 1 << 24

# A piece of a document: (starts a new document, text or token ids, bytes of the file it accounts for).
Piece = tuple[bool, "str | np.ndarray", int]


# --- finding the files ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DatasetFiles:
    paths: list[str]  # in reading order
    root: str  # folder the key's relative paths are taken from; the cache goes here ("beside the data")
    stem: str  # the cache file name starts with this


def find_dataset_files(path: str) -> DatasetFiles:
    """The files a dataset path names, in reading order; a UserError when there are none."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        if extension(path) not in EXTENSIONS:
            raise UserError(
                f"Dataset file {path} has an extension this reader does not know; use {_ext_list()} "
                "(rename a plain-text file to .txt)."
            )
        return DatasetFiles([path], os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if os.path.isdir(path):
        files = _walk(path)
        if not files:
            raise UserError(f"Folder {path} holds no readable dataset files ({_ext_list()}); add some or pick another.")
        root = os.path.abspath(path)
        return DatasetFiles(files, root, os.path.basename(root) or "dataset")
    if glob.has_magic(path):
        matches = sorted(glob.glob(path, recursive=True))
        files = [f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m]) if _readable(f)]
        files = list(dict.fromkeys(files))
        if not files:
            found = f"matches {len(matches)} paths but" if matches else "matches nothing and so"
            raise UserError(f"Dataset pattern {path!r} {found} names no {_ext_list()} files; check the pattern.")
        root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        return DatasetFiles(files, root, "glob-" + hashlib.sha256(path.encode()).hexdigest()[:8])
    raise UserError(f"Dataset path {path} does not exist; pass a text file, a folder or a glob such as 'data/*.txt'.")


def are_shards(files: DatasetFiles, flag: str) -> bool:
    """Whether the dataset is llm.c shards, which are read end to end as they are; they cannot be mixed with other
    files, which would be joined to them as documents."""
    found = [extension(f) == ".bin" and shards.is_shard(f) for f in files.paths]
    if any(found) and not all(found):
        other = files.paths[found.index(False)]
        raise UserError(
            f"{flag} names llm.c shards and other files ({other}); name the shards alone, e.g. 'DIR/*_train_*.bin'."
        )
    return all(found)


def _walk(folder: str) -> list[str]:
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, n) for n in names if _readable(n)]
    return sorted(found, key=lambda f: os.path.relpath(f, folder).replace(os.sep, "/"))


def _readable(name: str) -> bool:
    return not os.path.basename(name).startswith(".") and extension(name) in EXTENSIONS


def extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _ext_list() -> str:
    return ", ".join(EXTENSIONS)


# --- reading files ------------------------------------------------------------------------------------------
_replaced = threading.local()  # invalid UTF-8 bytes replaced and null texts skipped while reading, per thread


def reset_replaced_count() -> None:
    _replaced.count = _replaced.nulls = 0


def replaced_count() -> int:
    """Invalid UTF-8 bytes this thread replaced since `reset_replaced_count()`."""
    return getattr(_replaced, "count", 0)


def null_count() -> int:
    """Null texts (parquet) this thread skipped since `reset_replaced_count()`."""
    return getattr(_replaced, "nulls", 0)


def _count_and_replace(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    _replaced.count = getattr(_replaced, "count", 0) + (error.end - error.start)
    return "\ufffd", error.end


codecs.register_error("gpt2_jax_count_replace", _count_and_replace)
_DECODE_ERRORS = "gpt2_jax_count_replace"


def read_file(path: str, n_vocab: int, can_cut: bool, text_column: str | None = None) -> Iterator[Piece]:
    ext = extension(path)
    try:
        if ext in TEXT_EXTENSIONS:
            yield from _read_text(path, can_cut)
        elif ext == ".jsonl":
            yield from _read_jsonl(path, can_cut, text_column or "text")
        elif ext == ".csv":
            yield from _read_csv(path, can_cut, text_column)
        elif ext == ".parquet":
            yield from _read_parquet(path, can_cut, text_column)
        else:
            yield from _read_tokens(path, n_vocab)
    except OSError as e:
        raise UserError(f"Cannot read dataset file {path}: {e.strerror or e}.")


def _read_tokens(path: str, n_vocab: int) -> Iterator[Piece]:
    """A token file in chunks of TOKEN_CHUNK ids, each read and checked in turn. Read, not memory-mapped: the pages
    of a mapping stay in this process's resident memory until the whole file is done, and a file can be many GB."""
    tokens = open_token_file(path, n_vocab)  # the memmap gives the dtype, offset and length; no page is read
    n, size = len(tokens), os.path.getsize(path)
    # llm.c shards cut documents anywhere and carry their own end-of-text tokens: a shard continues the stream of
    # the one before it, so no separator may go between them.
    document = not (extension(path) == ".bin" and shards.is_shard(path))
    with open(path, "rb") as f:
        f.seek(getattr(tokens, "offset", 0))
        for start in range(0, n, TOKEN_CHUNK):
            chunk = np.fromfile(f, tokens.dtype, count=min(TOKEN_CHUNK, n - start))
            check_ids(chunk, path, n_vocab)
            yield document and start == 0, chunk, chunk.nbytes * size // max(1, tokens.nbytes)


def _read_text(path: str, can_cut: bool) -> Iterator[Piece]:
    """One document, streamed in blocks and cut where tokenization allows (see `_cuts_are_exact`)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors=_DECODE_ERRORS)
    carry, starts = "", True
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            carry += decoder.decode(block, final=not block)
            while can_cut and len(carry) > CHUNK_CHARS and (cut := _last_cut(carry, CHUNK_CHARS)):
                yield starts, carry[:cut], 0
                carry, starts = carry[cut:], False
            if not block:
                break
            yield False, "", len(block)  # progress only: the block's text waits in `carry`
    yield starts, carry, 0


def _read_jsonl(path: str, can_cut: bool, field: str) -> Iterator[Piece]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8", errors=_DECODE_ERRORS)
            if not line.strip():
                yield False, "", len(raw)
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"Line {number} of {path} is not valid JSON; fix or delete it.")
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise UserError(
                    f"Line {number} of {path} has no {json.dumps(field)} string; write each line as "
                    f'{{{json.dumps(field)}: "..."}} or name the text field with --text_column.'
                )
            # A "\ud800" escape is valid JSON but no Unicode: each lone surrogate counts as one replaced byte.
            text, surrogates = repair_json(record[field])
            _replaced.count = getattr(_replaced, "count", 0) + surrogates
            yield from _cut_document(text, can_cut, len(raw))


def _read_csv(path: str, can_cut: bool, column_name: str | None) -> Iterator[Piece]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents can be long; csv's default cap is 128 KB
    with open(path, encoding="utf-8-sig", errors=_DECODE_ERRORS, newline="") as f:
        try:
            rows = csv.reader(f)
            header = next(rows, [])
            names = [h.strip().lower() for h in header]
            column = names.index("text") if "text" in names else 0
            if column_name is not None:
                if column_name.strip().lower() not in names:
                    raise UserError(
                        f"CSV file {path} has no column {column_name!r} (its header: {', '.join(header[:12])}); "
                        "check --text_column."
                    )
                column = names.index(column_name.strip().lower())
            done = 0
            for row in rows:
                position = f.buffer.tell()
                yield from _cut_document(row[column] if len(row) > column else "", can_cut, position - done)
                done = position
        except csv.Error as e:
            raise UserError(f"{path} is not a readable CSV file ({e}); fix it or save it again as CSV.")


def _read_parquet(path: str, can_cut: bool, column: str | None) -> Iterator[Piece]:
    for texts, size in parquet_batches(path, column):
        for raw in texts:
            if raw is None:
                _replaced.nulls = null_count() + 1
            else:
                yield from _cut_document(raw.decode("utf-8", errors=_DECODE_ERRORS), can_cut, 0)
        yield False, "", size  # progress only


def _cut_document(text: str, can_cut: bool, size: int) -> Iterator[Piece]:
    starts = True
    while can_cut and len(text) > CHUNK_CHARS and (cut := _last_cut(text, CHUNK_CHARS)):
        yield starts, text[:cut], 0
        text, starts = text[cut:], False
    yield starts, text, size


# A space, tab or line break right after a non-space: always a boundary of GPT-2's pre-tokenizer, because no piece
# of it joins a non-space to the whitespace after it. (Python's \S also excludes U+001C-U+001F, which GPT-2's
# regex counts as punctuation: never cutting there is safe; cutting before them would not be.)
_CUT = re.compile(r"(?<=\S)[ \t\n\r]")


def _last_cut(text: str, limit: int) -> int:
    """Where `text` may be cut without changing its tokens: the last such place up to `limit`, else the first one
    after it; 0 when there is none (text without whitespace stays whole)."""
    for start in (max(0, limit - 4096), 0):
        last = 0
        for match in _CUT.finditer(text, start, limit + 1):
            last = match.start()
        if last:
            return last
    match = _CUT.search(text, limit)
    return match.start() if match else 0


_CUT_PROBES = ("Hello world.", "two  spaces", "line one.\nLine two", "tab\there", "x \n\n y 12 34", "don't 's go")


def cuts_are_exact(tokenizer: Tokenizer) -> bool:
    """Whether cutting text at `_CUT` boundaries leaves its tokens unchanged (always for GPT-2's BPE, whose
    pre-tokenizer never joins a non-space to the whitespace after it); other tokenizers are probed."""
    for text in _CUT_PROBES:
        whole = tokenizer.encode(text)
        for match in _CUT.finditer(text):
            if tokenizer.encode(text[: match.start()]) + tokenizer.encode(text[match.start() :]) != whole:
                return False
    return True


def open_token_file(path: str, n_vocab: int) -> np.ndarray:
    """A pre-tokenized file as a read-only memmap: .npy (1-D integers), .bin (an llm.c shard, else raw uint16)."""
    if extension(path) == ".bin":
        if shards.is_shard(path):
            return shards.open_shard(path)
        size = os.path.getsize(path)
        if size % 2:
            raise UserError(f"{path} has an odd number of bytes; a .bin dataset is raw uint16 token ids (nanoGPT).")
        return np.memmap(path, dtype="<u2", mode="r") if size else np.zeros(0, np.uint16)
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable .npy array ({e}); save token ids with numpy.save.")
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise UserError(
            f"{path} holds a {tokens.dtype} array of shape {tokens.shape}; a .npy dataset is a 1-D array of token ids."
        )
    return tokens


def check_ids(tokens: np.ndarray, path: str, n_vocab: int) -> None:
    for start in range(0, len(tokens), TOKEN_CHUNK):
        chunk = tokens[start : start + TOKEN_CHUNK]
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0 or high >= n_vocab:
            raise UserError(
                f"{path} holds token id {low if low < 0 else high}, outside this tokenizer's {n_vocab:,} ids; "
                "was it made with another tokenizer?"
            )
