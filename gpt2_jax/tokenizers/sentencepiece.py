"""SentencePiece vocabularies, for GPT-2s trained from scratch on a new language or domain.

Trained here with identity normalisation and byte fallback, a vocabulary round-trips any text exactly; its model
file (`tokenizer.model`) lives beside the model's weights. `<|endoftext|>` is a control symbol: decoded to its
literal text, and encoded back to the real token only when the caller allows special tokens.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from gpt2_jax.errors import UserError
from gpt2_jax.io import atomic_write_bytes
from gpt2_jax.tokenizers.base import EOT, id_list, read_bytes

SENTENCEPIECE_FILE = "tokenizer.model"
SP_META = "\u2581"  # SentencePiece's stand-in for a space; decode turns every one back into a space
# Loaded SentencePiece models must return this unchanged: whitespace runs, a ligature NFKC would split, rare bytes.
ROUND_TRIP_PROBE = " a  b\t\n\n c\r\n\ufb01 \u00c5 \x07 \U0001d518 \u2581 <|endoftext|> "


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
        return cls(read_bytes(path, "SentencePiece model"), source=str(path))

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
        return b"".join([self._piece_bytes[i] for i in id_list(ids, self.n_vocab)])

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
            item = read_bytes(Path(item), "training text").decode("utf-8", errors="replace")
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
