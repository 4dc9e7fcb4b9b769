"""Batches of token windows: random ones for training, consecutive ones for validation.

Every window holds seq_len + 1 tokens: inputs are `batch[:, :-1]`, targets `batch[:, 1:]`.

Training batches are drawn from `np.random.default_rng([seed, step])`, so batch `step` depends on the seed and the
step alone: the sampler's whole state is those two integers, a resumed run draws exactly the batches an
uninterrupted one would, and every process of a multi-host run can build the same global batch and keep its rows.

The tokens are one array (usually a memmap) or several llm.c shards read as one stream (`shards.TokenShards`); either
way a batch reads only its own windows, and a window may run from one shard into the next.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np

from gpt2_jax.data.shards import TokenShards
from gpt2_jax.errors import UsageError, UserError


def _gather(tokens: np.ndarray | TokenShards, starts_B: np.ndarray, length: int) -> np.ndarray:
    """int32 `[B, length]`: row i is tokens[starts_B[i] : starts_B[i] + length] (reads only those tokens)."""
    if isinstance(tokens, TokenShards):
        return tokens.windows(starts_B, length).astype(np.int32)
    # A strided view of every window (no copy; works on a memmap), indexed by the starts: one vectorised gather.
    return np.lib.stride_tricks.sliding_window_view(tokens, length)[starts_B].astype(np.int32)


def _check_sizes(tokens: np.ndarray | TokenShards, batch_size: int, seq_len: int, what: str) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {batch_size}.")
    if seq_len < 1:
        raise UsageError(f"--seq_len must be at least 1, got {seq_len}.")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if len(tokens) < seq_len + 1:
        raise UserError(
            f"The {what} tokens number {len(tokens):,}, fewer than one window of seq_len + 1 = {seq_len + 1:,}; "
            "lower --seq_len or add more text."
        )


class BatchSampler:
    """Random windows of seq_len + 1 tokens, `batch_size` per batch, reproducible from (seed, step)."""

    def __init__(self, tokens: np.ndarray | TokenShards, batch_size: int, seq_len: int, seed: int) -> None:
        _check_sizes(tokens, batch_size, seq_len, "training")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UsageError(f"--seed must be a non-negative integer, got {seed!r}.")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.step = int(seed), 0
        self.n_starts = len(tokens) - seq_len  # windows of seq_len + 1 tokens that fit

    def starts(self, step: int) -> np.ndarray:
        """The first token index of each window of batch `step`."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.n_starts, size=self.batch_size)

    def next_batch(self, rows: slice | None = None) -> np.ndarray:
        """int32 `[batch_size, seq_len + 1]`, or only its `rows` (one process's share); the gather reads only the
        chosen windows of a memmap."""
        starts = self.starts(self.step)
        batch = _gather(self.tokens, starts if rows is None else starts[rows], self.seq_len + 1)
        self.step += 1
        return batch

    def state(self) -> dict:
        """A small JSON-able dict for checkpoints; the sizes let `restore` warn when the data changed."""
        return {
            "seed": self.seed,
            "step": self.step,
            "n_tokens": len(self.tokens),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }

    def restore(self, state: dict) -> None:
        """Continue exactly where `state` was taken (the seed in it wins over this sampler's)."""
        self.seed, self.step = int(state["seed"]), int(state["step"])
        now = {"n_tokens": len(self.tokens), "batch_size": self.batch_size, "seq_len": self.seq_len}
        changed = [f"{k} {state[k]} -> {v}" for k, v in now.items() if k in state and state[k] != v]
        if changed:
            warnings.warn(
                f"Resuming with different data or batch shape ({', '.join(changed)}): the batches from here on "
                "differ from those an uninterrupted run would have drawn.",
                stacklevel=2,
            )


def eval_windows(tokens: np.ndarray | TokenShards, batch_size: int, seq_len: int) -> Iterator[np.ndarray]:
    """Consecutive windows for validation loss, in batches of int32 `[<= batch_size, seq_len + 1]`.

    Window i covers tokens[i*seq_len : i*seq_len + seq_len + 1], so neighbours share one token and every token after
    the first is a target exactly once; the tail shorter than a window is left out. The last batch holds the
    remaining windows and may be smaller than `batch_size` (pad it, or weight its mean by its row count).
    """
    _check_sizes(tokens, batch_size, seq_len, "validation")
    n_windows = (len(tokens) - 1) // seq_len
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
        yield _gather(tokens, starts, seq_len + 1)
