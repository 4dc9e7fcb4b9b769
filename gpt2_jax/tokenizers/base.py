"""What every tokenizer offers (`Tokenizer`) and the helpers GPT-2's BPE and SentencePiece share."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from gpt2_jax.errors import UserError

EOT = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    n_vocab: int
    eot_id: int
    fingerprint: str  # changes whenever the vocabulary does (token caches key on it)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]: ...
    def encode_batch(
        self, texts: list[str], *, allow_special: bool = False, num_threads: int = 8
    ) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...
    def save(self, directory: str | os.PathLike) -> None: ...


def id_list(ids: Sequence[int], n_vocab: int) -> list[int]:
    """Plain Python ints (numpy/jax arrays accepted), every one checked to lie inside the vocabulary."""
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    ids = [ids] if isinstance(ids, int) else list(ids)
    if ids and (min(ids) < 0 or max(ids) >= n_vocab):
        bad = next(i for i in ids if not 0 <= i < n_vocab)
        raise UserError(f"Token id {bad} is outside this tokenizer's vocabulary of {n_vocab} ids.")
    return ids


def read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"Cannot read the {what} {path}: {e.strerror or e}.")


def model_dir(directory: str | os.PathLike) -> Path:
    """A model directory; a file inside one (a .safetensors file, tokenizer.model) stands for its folder."""
    path = Path(directory)
    if path.is_file():
        return path.parent
    if not path.is_dir():
        raise UserError(f"Model directory {path} does not exist; check the path.")
    return path
