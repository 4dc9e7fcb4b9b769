"""One completion choice on the host: its tokens as they arrive, its text, stop strings, and what may be sent.

`ChoiceText` wraps `sampling.text.RowText` (eot, stop strings cut off, streaming that never shows half a UTF-8
character or the start of a possible stop string) and keeps each token's log-probability beside it. A token is
handed out (with its log-probability) once all its text has been: so the tokens of a stream's chunks, joined, are
the tokens of the whole completion, and a stop string's tokens are never sent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gpt2_jax.sampling.text import RowText
from gpt2_jax.tokenizers.base import Tokenizer

STOP, LENGTH = "stop", "length"  # OpenAI's finish reasons: eot or a stop string; max_tokens


@dataclasses.dataclass
class Piece:
    """What one device chunk added to a choice: new text, the tokens it completes, and the end if it ended."""

    text: str
    tokens: list[str]  # each token's own text
    logprobs: list[float]
    offsets: list[int]  # where each token's text starts in the completion
    finish_reason: str | None = None
    completion_tokens: int = 0  # tokens the model drew for this choice (eot included), when finished


class ChoiceText:
    """A choice's text as its tokens arrive; `add` returns the next `Piece`."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], max_tokens: int) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.row = RowText(tokenizer, stops)
        self.logprobs: list[float] = []  # aligned with self.row.tokens (a prefix of what was drawn)
        self.drawn = 0
        self.emitted = 0  # characters handed out
        self.released = 0  # tokens handed out

    def add(self, ids: Sequence[int], logprobs: Sequence[float]) -> Piece:
        self.drawn += len(ids)
        self.logprobs.extend(logprobs)
        reason = STOP if self.row.extend(ids) else (LENGTH if self.drawn >= self.max_tokens else None)
        text = self.row.new_text(final=reason is not None)
        self.emitted += len(text)
        tokens = self.row.tokens
        start, done = self.released, len(tokens) if reason else self.released
        while done < len(tokens) and len(self.tokenizer.decode(tokens[: done + 1])) <= self.emitted:
            done += 1
        self.released = done
        offsets = [len(self.tokenizer.decode(tokens[:i])) for i in range(start, done)]
        piece = Piece(
            text, [self.tokenizer.decode([t]) for t in tokens[start:done]], self.logprobs[start:done], offsets
        )
        if reason is not None:
            piece.finish_reason, piece.completion_tokens = reason, self.drawn
        return piece
