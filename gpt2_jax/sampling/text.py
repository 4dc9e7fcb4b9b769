"""Text around the token loop: prompts encoded, each row's text as its tokens arrive, stop strings, streaming.

`RowText` decodes a row's ids as they come from the device, stops it at `<|endoftext|>` or at the first stop
string (the stop string and all after it dropped, the tokens cut to match), and hands out the text that is safe to
show while streaming: never half a UTF-8 character, never what might still turn out to begin a stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

from gpt2_jax.sampling.generate import STOP_EOT, STOP_STRING
from gpt2_jax.tokenizers.base import Tokenizer
from gpt2_jax.unicode import repair_decoded


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Prompt text to ids: '' means unconditional (just <|endoftext|>); a typed <|endoftext|> is the real token.

    Text that is not valid Unicode (undecodable bytes from argv or a file, lone surrogates) is repaired first; the
    commands count and report what they repair before it gets here.
    """
    text, _ = repair_decoded(text)
    return tokenizer.encode(text, allow_special=True) if text else [tokenizer.eot_id]


class RowText:
    """One row's text as its tokens arrive: stops at eot or at the first stop string (which is cut off)."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.tokens: list[int] = []
        self.stop_reason: str | None = None
        self.text = ""
        self._emitted = 0

    def extend(self, ids: Iterable[int]) -> bool:
        """Add new ids; True once the row has stopped (eot or a stop string)."""
        if self.stop_reason is None:
            for i in ids:
                if i == self.tokenizer.eot_id:
                    self.stop_reason = STOP_EOT
                    break
                self.tokens.append(i)
            self.text = self.tokenizer.decode(self.tokens)
            cut = min((j for j in (self.text.find(s) for s in self.stops) if j >= 0), default=-1)
            if cut >= 0:
                self.text, self.stop_reason = self.text[:cut], STOP_STRING
                self.tokens = self.tokens[: self._tokens_covering(cut)]
        return self.stop_reason is not None

    def _tokens_covering(self, n_chars: int) -> int:
        """The fewest leading tokens whose text reaches `n_chars` characters (the stop string starts there)."""
        lo, hi = 0, len(self.tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(self.tokens[:mid])) >= n_chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def new_text(self, final: bool = False) -> str:
        """Text not yet handed out that is safe to show: no half UTF-8 character, no possible stop-string start."""
        if final or self.stop_reason is not None:
            safe = len(self.text)
        else:
            raw = self.tokenizer.decode_bytes(self.tokens)
            safe = len(codecs.getincrementaldecoder("utf-8")("replace").decode(raw, final=False))
            safe -= max((len(s) - 1 for s in self.stops), default=0)
        piece = self.text[self._emitted : max(safe, self._emitted)]
        self._emitted += len(piece)
        return piece
