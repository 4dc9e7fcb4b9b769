"""GPT-2's byte-level BPE (tiktoken, offline), and `load_tokenizer`, which finds the tokenizer saved beside a
model: this one, or a SentencePiece model (sentencepiece.py). Both implement `base.Tokenizer`.

GPT-2's BPE is built from the release's own `encoder.json` + `vocab.bpe` (the package ships a copy; a model
directory's copies win), so nothing is downloaded and ids equal OpenAI's encoder. tiktoken ranks tokens by id, which
is GPT-2's merge order; the files are checked to agree before use.

Both tokenizers decode `<|endoftext|>` to its literal text and encode the literal back to the real token only when
the caller allows special tokens; otherwise the literal is ordinary text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import tiktoken

from gpt2_jax.errors import UserError
from gpt2_jax.io import atomic_write_bytes
from gpt2_jax.tokenizers.base import EOT, Tokenizer, id_list, model_dir, read_bytes
from gpt2_jax.tokenizers.sentencepiece import SENTENCEPIECE_FILE, SentencePieceTokenizer

# OpenAI's encoder.py pattern, as released (tiktoken writes the contractions as one group; same matches).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PACKAGED_GPT2_DIR = Path(__file__).resolve().parent / "vocab" / "gpt2"
# The OpenAI names first; Hugging Face calls the same two files vocab.json + merges.txt.
GPT2_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


# --- GPT-2 byte-level BPE ----------------------------------------------------------------------------------------
@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the alphabet of encoder.json and vocab.bpe)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # control bytes and spaces map to unused code points from 256 up
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _parse_gpt2_files(encoder_path: Path, merges_path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """(mergeable_ranks, special_tokens) for tiktoken, after checking that the two files describe one BPE."""
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    try:
        encoder = json.loads(read_bytes(encoder_path, "GPT-2 vocabulary"))
        if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
            raise ValueError("not a JSON object of token ids")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{encoder_path} is not a GPT-2 encoder.json ({e}); replace it with the model's own copy.")
    lines = read_bytes(merges_path, "GPT-2 merges file").decode("utf-8", errors="replace").splitlines()
    merges = [line.split() for line in lines if line and not line.startswith("#version")]

    def bad(reason: str) -> UserError:
        return UserError(f"GPT-2 vocabulary {encoder_path} + {merges_path} is corrupt: {reason}.")

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(byte_decoder[c] for c in token)
        except KeyError:
            raise bad(f"token {token!r} uses a character outside GPT-2's byte alphabet")

    ranks = {bytes([b]): encoder.get(c) for b, c in bytes_to_unicode().items()}
    if None in ranks.values():
        raise bad("encoder.json lacks some of the 256 single-byte tokens")
    mergeable = set(bytes_to_unicode().values())
    last_id = -1
    for number, merge in enumerate(merges, start=2):
        if len(merge) != 2:
            raise bad(f"line {number} of the merges file is not two tokens")
        token = merge[0] + merge[1]
        # tiktoken merges by id, so ids must follow the merge order (as GPT-2's files do).
        if token not in encoder or encoder[token] <= last_id or to_bytes(token) in ranks:
            raise bad(f"merge {number - 1} ({token!r}) is missing from encoder.json, repeated or out of order")
        last_id = encoder[token]
        ranks[to_bytes(token)] = last_id
        mergeable.add(token)
    specials = {token: i for token, i in encoder.items() if token not in mergeable}
    if any(not (t.startswith("<|") and t.endswith("|>")) for t in specials):
        raise bad(f"{len(specials)} tokens in encoder.json come from no merge in the merges file")
    if EOT not in specials:
        raise bad(f"encoder.json has no {EOT} token")
    if len({*ranks.values(), *specials.values()}) != len(ranks) + len(specials):
        raise bad("two tokens share one id")
    return ranks, specials


def _file_stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _cached_encoding(encoder_stamp: tuple, merges_stamp: tuple) -> tuple[tiktoken.Encoding, str]:
    """Build the tiktoken Encoding once per file pair (keyed by real path, mtime and size: edits rebuild it)."""
    encoder_path, merges_path = Path(encoder_stamp[0]), Path(merges_stamp[0])
    ranks, specials = _parse_gpt2_files(encoder_path, merges_path)
    encoding = tiktoken.Encoding("gpt2-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    digest = hashlib.sha256(encoder_path.read_bytes() + b"\0" + merges_path.read_bytes()).hexdigest()
    return encoding, f"gpt2-bpe-{digest[:16]}"


class GPT2Tokenizer:
    """GPT-2's byte-level BPE from an encoder.json + vocab.bpe pair; ids identical to OpenAI's encoder."""

    name = "gpt2-bpe"

    def __init__(self, encoder_path: str | os.PathLike, merges_path: str | os.PathLike) -> None:
        self.encoder_path, self.merges_path = Path(encoder_path), Path(merges_path)
        for path in (self.encoder_path, self.merges_path):
            if not path.is_file():
                raise UserError(f"GPT-2 vocabulary file {path} is missing; copy encoder.json and vocab.bpe there.")
        self.encoding, self.fingerprint = _cached_encoding(
            _file_stamp(self.encoder_path), _file_stamp(self.merges_path)
        )
        self.n_vocab: int = self.encoding.n_vocab
        self.eot_id: int = self.encoding.eot_token

    def __reduce__(self):  # workers rebuild from the files (cached there too) instead of pickling 50k ranks
        return GPT2Tokenizer, (self.encoder_path, self.merges_path)

    def __repr__(self) -> str:
        return f"GPT2Tokenizer({str(self.encoder_path.parent)!r}, n_vocab={self.n_vocab})"

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], *, allow_special: bool = False, num_threads: int = 8) -> list[list[int]]:
        if allow_special:
            return self.encoding.encode_batch(list(texts), num_threads=num_threads, allowed_special="all")
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            return self.encoding.decode_bytes(id_list(ids, self.n_vocab))
        except KeyError as e:  # an id inside the range that this vocabulary leaves unassigned
            raise UserError(f"Token id {e.args[0] if e.args else '?'} is not in this GPT-2 vocabulary.")

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Write encoder.json + vocab.bpe into `directory` (OpenAI's names), beside a model."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for source, name in ((self.encoder_path, "encoder.json"), (self.merges_path, "vocab.bpe")):
            target = directory / name
            if not (target.exists() and os.path.samefile(source, target)):
                atomic_write_bytes(target, read_bytes(source, "GPT-2 vocabulary file"))


def _gpt2_files(directory: Path) -> tuple[Path, Path] | None:
    for encoder_name, merges_name in GPT2_FILE_PAIRS:
        encoder_path, merges_path = directory / encoder_name, directory / merges_name
        if encoder_path.is_file() and merges_path.is_file():
            return encoder_path, merges_path
        if encoder_path.is_file() != merges_path.is_file():
            present, absent = (encoder_name, merges_name) if encoder_path.is_file() else (merges_name, encoder_name)
            raise UserError(f"{directory} has {present} but no {absent}; put both GPT-2 vocabulary files there.")
    return None


def gpt2_tokenizer(directory: str | os.PathLike | None = None) -> GPT2Tokenizer:
    """GPT-2's BPE: a model directory's own encoder.json + vocab.bpe when it has both, else the packaged copy."""
    files = _gpt2_files(model_dir(directory)) if directory is not None else None
    return GPT2Tokenizer(*(files or (PACKAGED_GPT2_DIR / "encoder.json", PACKAGED_GPT2_DIR / "vocab.bpe")))


def load_tokenizer(directory: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer saved beside a model: tokenizer.model -> SentencePiece, else GPT-2's BPE (its own or packaged)."""
    if directory is None:
        return gpt2_tokenizer()
    path = model_dir(directory)
    if (path / SENTENCEPIECE_FILE).is_file():
        return SentencePieceTokenizer.load(path / SENTENCEPIECE_FILE)
    return gpt2_tokenizer(path)
