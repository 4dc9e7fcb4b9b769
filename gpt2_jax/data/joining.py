"""Documents into one token stream: the pieces the readers yield (files.py), grouped for parallel encoding, with the
end-of-text token between documents.

`Joiner.groups(pieces)` cuts the stream into groups of about `group_chars` characters: each holds, in stream order,
the texts to encode and token arrays (pre-tokenized pieces, and the end-of-text separators). A separator goes before
every document but the first, unless the stream so far already ends with end-of-text (a pre-tokenized file that
ends with it). `encode_group` turns one group into its tokens. The token cache encodes groups with threads
(dataset.py) and `prepare` with processes (shard_corpus.py); both join here, so both give the same stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

from gpt2_jax.data.files import Piece
from gpt2_jax.tokenizers.base import Tokenizer

MAX_GROUP_ITEMS = 4096  # many tiny documents (short jsonl lines) still make groups of a useful but bounded size


@dataclasses.dataclass
class Group:
    items: list[str | np.ndarray]  # texts to encode and token ids, in stream order
    n_bytes: int  # input bytes read for this group (progress)


class Joiner:
    """Groups a stream of pieces; counts the documents it has seen so far (`n_documents`)."""

    def __init__(self, eot_id: int, dtype: np.dtype, group_chars: int) -> None:
        self.eot = np.array([eot_id], dtype)
        self.group_chars = group_chars
        self.n_documents = 0

    def groups(self, pieces: Iterable[Piece]) -> Iterator[Group]:
        """Groups in stream order; the last one may be empty (it carries the last bytes read)."""
        items: list[str | np.ndarray] = []
        chars = n_bytes = 0
        ends_with_eot = True  # nothing comes before the first document, so it gets no separator
        pending_start = False
        for starts_document, payload, size in pieces:
            pending_start |= starts_document
            n_bytes += size
            if len(payload):
                if pending_start:
                    self.n_documents += 1
                    if not ends_with_eot:
                        items.append(self.eot)
                    pending_start = False
                items.append(payload)
                chars += len(payload)
                ends_with_eot = not isinstance(payload, str) and int(payload[-1]) == int(self.eot[0])
            if chars >= self.group_chars or len(items) >= MAX_GROUP_ITEMS:
                yield Group(items, n_bytes)
                items, chars, n_bytes = [], 0, 0
        yield Group(items, n_bytes)


def encode_group(group: Group, tokenizer: Tokenizer, dtype: np.dtype, threads: int) -> np.ndarray:
    """The group's tokens, 1-D in `dtype`: its texts encoded (by `threads` threads) between its token arrays."""
    texts = [p for p in group.items if isinstance(p, str)]
    encoded = iter(tokenizer.encode_batch(texts, num_threads=threads) if texts else [])
    arrays = [np.asarray(next(encoded) if isinstance(p, str) else p, dtype) for p in group.items]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype)
