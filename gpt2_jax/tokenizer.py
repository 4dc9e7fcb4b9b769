"""Tokenizers behind one small interface: GPT-2's byte-level BPE (tiktoken, offline) and SentencePiece.

GPT-2's BPE is built from the release's own `encoder.json` + `vocab.bpe` (the package ships a copy; a model
directory's copies win), so nothing is downloaded and ids equal OpenAI's encoder. tiktoken ranks tokens by id, which
is GPT-2's merge order; the files are checked to agree before use. SentencePiece serves models trained from scratch
on a new language or domain: trained here with identity normalisation and byte fallback, it round-trips any text.

Both decode `<|endoftext|>` to its literal text and encode the literal back to the real token only when the caller
allows special tokens; otherwise the literal is ordinary text.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm
import tiktoken

from gpt2_jax.errors import UserError

EOT = "<|endoftext|>"
# OpenAI's encoder.py pattern, as released (tiktoken writes the contractions as one group; same matches).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PACKAGED_GPT2_DIR = Path(__file__).resolve().parent / "vocab" / "gpt2"
# The OpenAI names first; Hugging Face calls the same two files vocab.json + merges.txt.
GPT2_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
SENTENCEPIECE_FILE = "tokenizer.model"
SP_META = "\u2581"  # SentencePiece's stand-in for a space; decode turns every one back into a space
# Loaded SentencePiece models must return this unchanged: whitespace runs, a ligature NFKC would split, rare bytes.
ROUND_TRIP_PROBE = " a  b\t\n\n c\r\nﬁ Å \x07 \U0001d518 \u2581 <|endoftext|> "


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


# --- shared helpers --------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, so `path` is never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _id_list(ids: Sequence[int], n_vocab: int) -> list[int]:
    """Plain Python ints (numpy/jax arrays accepted), every one checked to lie inside the vocabulary."""
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    ids = [ids] if isinstance(ids, int) else list(ids)
    if ids and (min(ids) < 0 or max(ids) >= n_vocab):
        bad = next(i for i in ids if not 0 <= i < n_vocab)
        raise UserError(f"Token id {bad} is outside this tokenizer's vocabulary of {n_vocab} ids.")
    return ids


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"Cannot read the {what} {path}: {e.strerror or e}.")


def _model_dir(directory: str | os.PathLike) -> Path:
    """A model directory; a file inside one (a .safetensors file, tokenizer.model) stands for its folder."""
    path = Path(directory)
    if path.is_file():
        return path.parent
    if not path.is_dir():
        raise UserError(f"Model directory {path} does not exist; check the path.")
    return path


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
        encoder = json.loads(_read_bytes(encoder_path, "GPT-2 vocabulary"))
        if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
            raise ValueError("not a JSON object of token ids")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{encoder_path} is not a GPT-2 encoder.json ({e}); replace it with the model's own copy.")
    lines = _read_bytes(merges_path, "GPT-2 merges file").decode("utf-8", errors="replace").splitlines()
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
            return self.encoding.decode_bytes(_id_list(ids, self.n_vocab))
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
                atomic_write_bytes(target, _read_bytes(source, "GPT-2 vocabulary file"))


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
    files = _gpt2_files(_model_dir(directory)) if directory is not None else None
    return GPT2Tokenizer(*(files or (PACKAGED_GPT2_DIR / "encoder.json", PACKAGED_GPT2_DIR / "vocab.bpe")))


# --- SentencePiece -------------------------------------------------------------------------------------------------
class SentencePieceTokenizer:
    """A SentencePiece model whose vocabulary holds `<|endoftext|>` as a control or user-defined symbol."""

    name = "sentencepiece"

    def __init__(self, model_proto: bytes, *, source: str = "a SentencePiece model") -> None:
        self.model_proto = bytes(model_proto)
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(self.model_proto)
        except (RuntimeError, OSError, TypeError):
            raise UserError(f"{source} is not a valid SentencePiece model; retrain it or copy it again.")
        sp = self.processor
        self.n_vocab: int = sp.get_piece_size()
        self.eot_id: int = sp.piece_to_id(EOT)
        if sp.id_to_piece(self.eot_id) != EOT:
            raise UserError(f"{source} has no {EOT} symbol; train a vocabulary with train_sentencepiece.")
        self.fingerprint = f"sentencepiece-{hashlib.sha256(self.model_proto).hexdigest()[:16]}"
        # A literal U+2581 in the text would decode as a space: send it through its byte pieces instead.
        meta_pieces = [sp.piece_to_id(f"<0x{b:02X}>") for b in SP_META.encode()]
        self._meta_ids = meta_pieces if all(sp.is_byte(i) for i in meta_pieces) else None
        # A control symbol never matches text; a user-defined one does, so the literal is then encoded in halves.
        self._eot_matches_text = self.eot_id in sp.encode(EOT)
        self._piece_bytes = [self._bytes_of(i) for i in range(self.n_vocab)]
        # Long texts encode ~4x faster in newline-ended chunks, with the same ids when no piece spans a newline.
        self._chunk_chars = None if any(b"\n" in b for b in self._piece_bytes if len(b) > 1) else 16_384
        if self.decode(self.encode(ROUND_TRIP_PROBE)) != ROUND_TRIP_PROBE:
            raise UserError(
                f"{source} does not give text back exactly (it normalises text, adds a dummy prefix or lacks byte "
                "fallback); train a vocabulary with train_sentencepiece."
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        path = Path(path)
        return cls(_read_bytes(path, "SentencePiece model"), source=str(path))

    def __reduce__(self):
        return SentencePieceTokenizer, (self.model_proto,)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(n_vocab={self.n_vocab}, fingerprint={self.fingerprint!r})"

    def _bytes_of(self, i: int) -> bytes:
        sp, piece = self.processor, self.processor.id_to_piece(i)
        if sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])  # "<0x0A>"
        if i == self.eot_id:
            return EOT.encode()
        if sp.is_control(i) or sp.is_unused(i):
            return b""
        if sp.is_unknown(i):
            return " \u2047 ".encode()  # what SentencePiece itself prints for <unk>
        return piece.replace(SP_META, " ").encode()

    def _chunks(self, text: str) -> list[str]:
        if self._chunk_chars is None or len(text) <= self._chunk_chars:
            return [text]
        chunks, start = [], 0
        while start < len(text):
            end = text.find("\n", start + self._chunk_chars) + 1 or len(text)
            chunks.append(text[start:end])
            start = end
        return chunks

    def _segments(self, text: str, allow_special: bool) -> list[str | list[int]]:
        """Text pieces to hand to SentencePiece, and id runs it must not see (special token, literal U+2581)."""
        split_meta = self._meta_ids is not None and SP_META in text
        split_eot = EOT in text and (allow_special or self._eot_matches_text)
        if not (split_meta or split_eot):
            return self._chunks(text)
        out: list[str | list[int]] = []
        for part in re.split(f"({re.escape(SP_META)}|{re.escape(EOT)})", text):
            if part == SP_META and self._meta_ids is not None:
                out.append(self._meta_ids)
            elif part == EOT and allow_special:
                out.append([self.eot_id])
            elif part == EOT and self._eot_matches_text:
                out += [EOT[:-2], EOT[-2:]]  # halves, so the user-defined symbol cannot match
            elif part:
                out += self._chunks(part)
        return out

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        return self.encode_batch([text], allow_special=allow_special, num_threads=1)[0]

    def encode_batch(self, texts: list[str], *, allow_special: bool = False, num_threads: int = 8) -> list[list[int]]:
        segmented = [self._segments(text, allow_special) for text in texts]
        pieces = [s for segments in segmented for s in segments if isinstance(s, str)]
        encoded = iter(self.processor.encode(pieces, num_threads=num_threads) if pieces else [])
        out = []
        for segments in segmented:
            ids: list[int] = []
            for s in segments:
                ids += next(encoded) if isinstance(s, str) else s
            out.append(ids)
        return out

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join([self._piece_bytes[i] for i in _id_list(ids, self.n_vocab)])

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.model into `directory`, beside a model."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / SENTENCEPIECE_FILE, self.model_proto)


def _training_sentences(texts: Iterable[str | os.PathLike], max_chars: int) -> Iterator[str]:
    """Lines of the corpus (SentencePiece trains on sentences); newlines themselves fall back to byte pieces."""
    for item in [texts] if isinstance(texts, (str, os.PathLike)) else texts:
        if isinstance(item, os.PathLike):
            item = _read_bytes(Path(item), "training text").decode("utf-8", errors="replace")
        for line in item.replace(SP_META, " ").split("\n"):
            for start in range(0, len(line), max_chars):
                yield line[start : start + max_chars]


def train_sentencepiece(
    texts: Iterable[str | os.PathLike] | str | os.PathLike,
    vocab_size: int,
    directory: str | os.PathLike,
    *,
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    num_threads: int = 1,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Train a BPE SentencePiece vocabulary with exact round trips and write `directory/tokenizer.model`.

    `texts` holds texts (str) and files (pathlib.Path / os.PathLike, read as UTF-8); a lone str or path is one item.
    Whitespace is kept as written (identity normalisation, no dummy prefix, whitespace-only pieces), characters
    outside the vocabulary fall back to their UTF-8 bytes, and `<|endoftext|>` is a control symbol. The same corpus,
    seed and num_threads give the same vocabulary (more threads train faster but may order equal-count merges
    differently); corpora over `max_sentences` lines are sampled.
    """
    max_chars = 8192
    sentences = (s for s in _training_sentences(texts, max_chars) if s.strip())
    first = next(sentences, None)
    if first is None:
        raise UserError("The SentencePiece training corpus has no text; point it at a non-empty text file.")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([first, *sentences]),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            character_coverage=character_coverage,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            control_symbols=[EOT],
            max_sentence_length=4 * max_chars,  # bytes; a UTF-8 char takes at most 4
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(f"SentencePiece could not train a {vocab_size}-piece vocabulary on this corpus: {e}.")
    tokenizer = SentencePieceTokenizer(model.getvalue())
    tokenizer.save(directory)
    return tokenizer


def load_tokenizer(directory: str | os.PathLike | None = None) -> GPT2Tokenizer | SentencePieceTokenizer:
    """The tokenizer saved beside a model: tokenizer.model -> SentencePiece, else GPT-2's BPE (its own or packaged)."""
    if directory is None:
        return gpt2_tokenizer()
    path = _model_dir(directory)
    if (path / SENTENCEPIECE_FILE).is_file():
        return SentencePieceTokenizer.load(path / SENTENCEPIECE_FILE)
    return gpt2_tokenizer(path)
