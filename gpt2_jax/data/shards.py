"""llm.c's token shards: the format, written and checked, and many shards read as one stream without a copy.

A shard (llm.c `dev/data/data_common.py` `write_datafile`, read by `llmc/dataloader.h`) is a header of 256
little-endian int32 (magic 20240520, version 1, the token count, zeros), then the count's uint16 token ids, GPT-2's:
the file holds exactly 1024 + 2 x count bytes. llm.c, modded-nanogpt and FineWeb's prepared sets ship this format.

Telling a shard from nanoGPT's raw uint16 `.bin`: a `.bin` whose first int32 looks like one of llm.c's date-stamped
magics (20240101 to 20250623; llm.c has 20240520 for GPT-2 tokens, 20240522 for evaluation examples, 20240801 for
Llama 3 tokens) is an llm.c file. Read as uint16, such a value begins with an id of at least 55,013, which no GPT-2
token file holds, so a raw GPT-2 file is never mistaken for one. Everything else the header says (magic 20240520,
version 1, count = size) must then agree, or the file is refused in one sentence naming it: never read as raw
tokens from a broken header.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence

import numpy as np

from gpt2_jax.errors import UserError
from gpt2_jax.io import StreamedFile
from gpt2_jax.tokenizers.base import Tokenizer

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKENS = 2**31 - 1  # the header's count is an int32
LLAMA3_MAGIC = 20240801  # llm.c's uint32 shards of Llama 3 tokens: recognised only to be refused in one sentence
EVAL_MAGIC = 20240522  # llm.c's HellaSwag/MMLU evaluation files
# Their low 16 bits, the first uint16 of the file, are >= 55,013 (past 20250623 they wrap round to small ids).
LLMC_MAGICS = range(20240101, 20250624)


# --- one shard ---------------------------------------------------------------------------------------------------
def is_shard(path: str) -> bool:
    """Whether `path` begins with an llm.c magic (then it must be a valid shard: see `shard_tokens`)."""
    try:
        with open(path, "rb") as f:
            first = f.read(4)
    except OSError as e:
        raise UserError(f"Cannot read dataset file {path}: {e.strerror or e}.")
    return len(first) == 4 and int(np.frombuffer(first, "<i4")[0]) in LLMC_MAGICS


def shard_tokens(path: str) -> int:
    """The token count of the llm.c shard at `path`, after llm.c's own checks (magic, version 1, size)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES).ljust(HEADER_BYTES, b"\0"), "<i4")
    magic, version, count = (int(x) for x in header[:3])
    if magic == LLAMA3_MAGIC:
        raise UserError(
            f"{path} is an llm.c shard of Llama 3 tokens (magic {LLAMA3_MAGIC}); only GPT-2's shards (magic {MAGIC}) "
            "can be read here."
        )
    if magic != MAGIC:
        what = "llm.c's evaluation-file magic" if magic == EVAL_MAGIC else "an unknown llm.c magic"
        raise UserError(
            f"{path} begins with {what} {magic}, not {MAGIC}, the magic of GPT-2 token shards; pass token shards."
        )
    if version != VERSION:
        raise UserError(f"{path} is an llm.c shard of version {version}; only version {VERSION} can be read.")
    if size < HEADER_BYTES or count < 0 or size != HEADER_BYTES + 2 * count:
        raise UserError(
            f"llm.c shard {path} is truncated or damaged: its header counts {count:,} tokens, which take "
            f"{HEADER_BYTES + 2 * max(count, 0):,} bytes, but the file has {size:,}; prepare it again."
        )
    if count == 0:
        raise UserError(f"llm.c shard {path} holds no tokens (llm.c's loader refuses it too); delete it.")
    return count


def open_shard(path: str) -> np.ndarray:
    """The tokens of a checked llm.c shard, memory-mapped: uint16 `[count]`."""
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(shard_tokens(path),))


def header_bytes(count: int) -> bytes:
    """The 1024-byte header of a shard of `count` tokens, as `write_datafile` writes it."""
    if not 0 < count <= MAX_TOKENS:
        raise ValueError(f"an llm.c shard holds 1 to {MAX_TOKENS} tokens, not {count}")
    header = np.zeros(HEADER_INTS, "<i4")
    header[:3] = MAGIC, VERSION, count
    return header.tobytes()


class ShardFile:
    """One shard written under `<path>.tmp` as tokens arrive; `commit()` writes the header and renames it to `path`,
    so a shard under its real name is always complete, and returns the sha256 of the whole file."""

    def __init__(self, path: str) -> None:
        self.path, self.n_tokens = path, 0
        self._file = StreamedFile(path, path + ".tmp", HEADER_BYTES)  # the count is known only at the end

    def write(self, tokens: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(tokens, "<u2").tobytes())
        self.n_tokens += len(tokens)

    def commit(self) -> str:
        self._file.commit(header_bytes(self.n_tokens))
        return file_sha256(self.path)

    def abort(self) -> None:
        self._file.abort()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# --- the tokenizer the ids belong to -------------------------------------------------------------------------------
_PROBE = "Shards hold GPT-2's ids: naïve café, 東京, 1234 5678,\n\n\ttabs and 'quotes' <|endoftext|>."


@functools.cache
def _gpt2_reference() -> tuple[int, int, tuple[int, ...], bytes]:
    from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer

    return _identity(gpt2_tokenizer())


def _identity(tokenizer: Tokenizer) -> tuple[int, int, tuple[int, ...], bytes]:
    """What GPT-2's vocabulary fixes: its size, end-of-text id, a probe's ids and a spread of ids decoded (so the
    same BPE read from Hugging Face's vocab.json + merges.txt counts as GPT-2's too)."""
    spread = list(range(0, tokenizer.n_vocab, 97))
    return tokenizer.n_vocab, tokenizer.eot_id, tuple(tokenizer.encode(_PROBE)), tokenizer.decode_bytes(spread)


def require_gpt2(tokenizer: Tokenizer, path: str) -> None:
    """Shards hold GPT-2's ids: with another vocabulary they would be read as the wrong tokens, silently."""
    try:
        same = _identity(tokenizer) == _gpt2_reference()
    except (UserError, KeyError, ValueError):  # an id of GPT-2's range that this vocabulary does not have
        same = False
    if not same:
        raise UserError(
            f"{path} is an llm.c shard of GPT-2 token ids, but this model's tokenizer is {tokenizer.name} with "
            f"{tokenizer.n_vocab:,} ids; use a model with GPT-2's vocabulary (e.g. --init scratch:tiny)."
        )


# --- many shards as one stream -------------------------------------------------------------------------------------
class TokenShards:
    """Token arrays (memory-mapped shards) read end to end as one 1-D stream, without copying them into one file.

    Supports what training and evaluation do with a token stream: `len`, slicing with step 1 (a view),
    `windows(starts, length)` (the rows of a batch, each a contiguous run that may cross from one shard into the
    next), `max()` and `np.asarray` (a copy: evaluation only).
    """

    ndim = 1

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.dtype = np.result_type(*parts) if parts else np.dtype(np.uint16)
        self.ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)
        self.begins = self.ends - [len(p) for p in self.parts]

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def size(self) -> int:
        return len(self)

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: slice) -> TokenShards:
        if not isinstance(key, slice):
            raise TypeError("TokenShards supports slices only (read rows with windows())")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("TokenShards slices take step 1")
        parts = []
        for part, begin in zip(self.parts, self.begins):
            low, high = max(start - begin, 0), min(stop - begin, len(part))
            if low < high:
                parts.append(part[low:high])
        return TokenShards(parts)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), copied out of the one or more shards that hold them."""
        first = int(np.searchsorted(self.ends, start, side="right"))
        pieces, need = [], length
        for part, begin in zip(self.parts[first:], self.begins[first:]):
            piece = part[max(start - begin, 0) : max(start - begin, 0) + need]
            pieces.append(piece)
            need -= len(piece)
            if not need:
                break
        if need:
            raise IndexError(f"tokens [{start}, {start + length}) run past the end of {len(self)}")
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """`[len(starts), length]` in the shards' dtype: row i is tokens [starts[i], starts[i] + length)."""
        out = np.empty((len(starts), length), self.dtype)
        for row, start in enumerate(np.asarray(starts).tolist()):
            out[row] = self.read(start, length)
        return out

    def max(self) -> int:
        return max(int(p.max()) for p in self.parts)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        return whole if dtype is None else whole.astype(dtype)
