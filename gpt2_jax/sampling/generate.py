"""Host side of generation, in tokens: prompts to padded rows, shape buckets, the chunk loop, the sliding window.

`generate_tokens` turns token prompts into continuations by calling the device functions of `loop.py`: one
prefill, then decode chunks back to back. What every row of a call shares (length, sampling, seed, eot, window,
chunk) travels as one `Request`. Shapes are bucketed so that a new prompt length rarely compiles anew: prompts are
left-padded to a power of two (at least 16 tokens), and the cache gets the padded prompt plus the new tokens
rounded up to a multiple of 64 slots.

Attention windows: a decode chunk attends over the cache's first slots only (its attention window), a static
count that covers the slots filled by the chunk's end: 128, doubled as the cache fills, capped at the cache size.
A chunk never crosses a window's edge (`next_chunk`), so a long generation runs as several chunks and the early
ones read few slots; each window size compiles once per batch shape: at most 4 for GPT-2's 1024-token context.
Doubling rather than steps of 128: half the compilations at 1024 slots, and the same windows (128, then the whole
cache) for caches of up to 256 slots, such as 16 + 128 tokens. On a CPU the window is the whole cache: XLA:CPU
runs the attention as a library matmul that takes its operands whole, so a window would first copy the slots it
reads (and, in the compiled step, the whole cache as well): more work than it saves. On a GPU the one-token
attention matmuls become fused reductions, which read the window in place.

Longer than the context: when prompt + length exceed n_ctx, the cache holds n_ctx slots and, once full, is
refilled with the last `window` tokens of the context (default n_ctx // 2) and decoding goes on. Step by step, the
next token is drawn from the model's output on `context[start:]`, where `start` moves to `len(context) - window`
whenever the context would outgrow n_ctx tokens (a prompt longer than n_ctx first keeps its last n_ctx tokens).
Rows needing the window run with equal-length prompts and no padding, so the window moves exactly as it would for
the row alone.

Text (prompts encoded, stop strings, streaming) is `text.py`'s and `sampler.py`'s business; this module sees ids.
Axis legend: B batch rows, T prompt positions, C new tokens of one device call, W window.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

from gpt2_jax.config import GPT2Config
from gpt2_jax.console import warn
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.model.decode import DecodeWeights
from gpt2_jax.sampling.loop import DecodeState, decode_chunk, prefill_and_sample
from gpt2_jax.sampling.processors import SamplingConfig

STOP_LENGTH, STOP_EOT, STOP_STRING = "length", "endoftext", "stop"
MIN_PROMPT_BUCKET = 16
CACHE_SLOT_MULTIPLE = 64
MIN_ATTENTION_WINDOW = 128

OnChunk = Callable[[dict[int, list[int]]], Iterable[int] | None]


@dataclasses.dataclass(frozen=True)
class Request:
    """What every row of one `generate_tokens` call shares."""

    length: int  # new tokens per row, at most
    sampling: SamplingConfig
    seed: int
    eot_id: int  # <|endoftext|>: ends a row; also the padding id
    window: int | None = None  # tokens kept when the context slides (default n_ctx // 2)
    chunk: int | None = None  # decode steps per device call at most (default: up to the attention window's edge)

    def __post_init__(self) -> None:
        if self.length <= 0:
            raise UsageError(f"The number of tokens to generate must be at least 1, got {self.length}.")


# --- shapes ------------------------------------------------------------------------------------------------------
def prompt_bucket(n_tokens: int, limit: int) -> int:
    """The padded prompt width: a power of two >= 16, but no more than `limit` (and never less than the prompt)."""
    bucket = max(MIN_PROMPT_BUCKET, 1 << (n_tokens - 1).bit_length())
    return max(n_tokens, min(bucket, limit))


def cache_slots(needed: int, n_ctx: int) -> int:
    return min(n_ctx, -(-needed // CACHE_SLOT_MULTIPLE) * CACHE_SLOT_MULTIPLE)


def attention_window(filled: int, slots: int, backend: str | None = None) -> int:
    """The cache slots a decode chunk attends over when `filled` of them are filled at its end, on `backend`
    (default JAX's; see the module doc)."""
    if (backend or jax.default_backend()) == "cpu":
        return slots
    window = MIN_ATTENTION_WINDOW
    while window < filled:
        window *= 2
    return min(window, slots)


def next_chunk(
    index: int, remaining: int, slots: int, chunk: int | None = None, backend: str | None = None
) -> tuple[int, int]:
    """(steps, window) of the next `decode_chunk` call from cache slot `index` (< slots): at most `chunk` steps
    (default: no limit) and `remaining`, up to the edge of the attention window the chunk starts in."""
    window = attention_window(index + 1, slots, backend)
    return min(chunk or slots, remaining, window - index), window


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens_BT = np.full((len(rows), width), pad_id, np.int32)
    mask_BT = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        if row:
            tokens_BT[i, width - len(row) :] = row
            mask_BT[i, width - len(row) :] = True
    return tokens_BT, mask_BT


def batch_shape(longest: int, length: int, n_ctx: int) -> tuple[int, int]:
    """(padded prompt width, cache slots) for a batch: unpadded in a full cache when the window will slide."""
    if longest + length - 1 > n_ctx:
        return longest, n_ctx
    width = prompt_bucket(longest, n_ctx - (length - 1))
    return width, cache_slots(width + length - 1, n_ctx)


# --- tokens in, tokens out -------------------------------------------------------------------------------------
def generate_tokens(
    weights: DecodeWeights,
    config: GPT2Config,
    prompts: Sequence[Sequence[int]],
    request: Request,
    *,
    row_ids: Sequence[int] | None = None,
    on_chunk: OnChunk | None = None,
) -> list[tuple[list[int], str]]:
    """Per prompt, (up to `request.length` new token ids, stop_reason 'endoftext' or 'length'); eot is dropped.

    weights: `model.decode.decode_weights(params, config)`, made once by the caller (`Sampler` does).
    row_ids: each row's identity for the random draws (default 0..B-1): equal seed and row id, equal sample.
    on_chunk: called with {row: new token ids} after each device call; returns rows to stop (stop strings).
    """
    rows = _checked_rows(prompts, config, request.eot_id)
    row_ids = list(range(len(rows))) if row_ids is None else list(row_ids)
    window = max(1, min(request.window or config.n_ctx // 2, config.n_ctx - 1))
    request = dataclasses.replace(request, window=window)
    results: dict[int, tuple[list[int], str]] = {}
    for members in _batches(rows, request.length, config.n_ctx):
        batch_rows, batch_ids = [rows[i] for i in members], [row_ids[i] for i in members]
        renumbered = None if on_chunk is None else _renumbered(on_chunk, members)
        results.update(zip(members, _Batch(weights, config, request, batch_rows, batch_ids, renumbered).run()))
    return [results[i] for i in range(len(rows))]


def _checked_rows(prompts: Sequence[Sequence[int]], config: GPT2Config, eot_id: int) -> list[list[int]]:
    """The prompts as lists, '' as eot alone, every id checked, each cut to the context's last n_ctx tokens."""
    rows = [list(p) or [eot_id] for p in prompts]
    bad = [t for p in rows for t in p if not 0 <= t < config.n_vocab]
    if bad:
        raise UserError(
            f"Token id {bad[0]} is outside this model's vocabulary of {config.n_vocab}; "
            "the tokenizer does not match the model (use the tokenizer saved with it)."
        )
    if any(len(p) > config.n_ctx for p in rows):
        warn(f"a prompt is longer than the model's context; only its last {config.n_ctx} tokens are used.")
        rows = [p[-config.n_ctx :] for p in rows]
    return rows


def _batches(rows: list[list[int]], length: int, n_ctx: int) -> Iterable[list[int]]:
    """Row indices per device batch: rows that fit the context together, those that will slide by prompt length."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(rows):
        sliding = len(p) + length - 1 > n_ctx
        groups.setdefault(len(p) if sliding else -1, []).append(i)
    return groups.values()


def _renumbered(on_chunk: OnChunk, members: list[int]) -> OnChunk:
    def call(new: dict[int, list[int]]) -> list[int]:
        stops = on_chunk({members[r]: t for r, t in new.items()}) or ()
        back = {m: r for r, m in enumerate(members)}
        return [back[m] for m in stops if m in back]

    return call


class _Batch:
    """One device batch, host side: the rows' tokens so far, which rows are done, which the host stopped."""

    def __init__(
        self,
        weights: DecodeWeights,
        config: GPT2Config,
        request: Request,
        rows: list[list[int]],
        row_ids: list[int],
        on_chunk: OnChunk | None,
    ) -> None:
        self.request, self.rows, self.on_chunk = request, rows, on_chunk
        self.width, self.slots = batch_shape(max(map(len, rows)), request.length, config.n_ctx)
        static = dict(config=config, sampling=request.sampling)  # compiled in
        self.prefill_fn = functools.partial(prefill_and_sample, weights, max_len=self.slots, **static)
        self.decode_fn = functools.partial(decode_chunk, weights, **static)
        self.ids_B, self.eot = np.asarray(row_ids, np.int32), np.int32(request.eot_id)
        self.seed = np.uint32(request.seed % 2**32)
        self.generated: list[list[int]] = [[] for _ in rows]
        self.done_B = np.zeros(len(rows), bool)
        self.stop_B = np.zeros(len(rows), bool)  # rows the host stopped (a stop string)
        self.drawn = 0  # tokens drawn so far, the same for every row

    def run(self) -> list[tuple[list[int], str]]:
        """Prefill, then chunks until every row is done or has `length` tokens; the window slides when full."""
        length, window = self.request.length, self.request.window
        state = self._prefill(*left_pad(self.rows, self.width, self.request.eot_id))
        cache_index = self.width
        while self.drawn < length and not self.done_B.all():
            if cache_index == self.slots:  # the window slides: refill the cache with the context's last tokens
                context_BW = np.asarray([(p + g)[-window:] for p, g in zip(self.rows, self.generated)], np.int32)
                state = self._prefill(context_BW, np.ones(context_BW.shape, bool))
                cache_index = window
                continue
            steps, attended = next_chunk(cache_index, length - self.drawn, self.slots, self.request.chunk)
            state, n_steps = self._decode(state, steps, attended)
            cache_index += n_steps
            if n_steps < steps:
                break  # every row finished on the device
        return [_finish(g[:length], self.request.eot_id) for g in self.generated]

    def _prefill(self, tokens_BT: np.ndarray, mask_BT: np.ndarray) -> DecodeState:
        """A fresh cache filled with `tokens_BT`, and the next token drawn."""
        step = np.int32(self.drawn)
        state, new_B = self.prefill_fn(tokens_BT, mask_BT, self.ids_B, self.done_B.copy(), step, self.seed, self.eot)
        self._take(np.asarray(new_B)[:, None])
        return state

    def _decode(self, state: DecodeState, steps: int, attended: int) -> tuple[DecodeState, int]:
        """Up to `steps` decode steps in one device call, attending over the first `attended` cache slots; returns
        the state and how many ran."""
        stop_B = self.stop_B.copy()
        state, out_BS, n_steps = self.decode_fn(state, np.int32(steps), stop_B, self.eot, window=attended)
        n_steps = int(n_steps)
        self._take(np.asarray(out_BS)[:, :n_steps])
        return state, n_steps

    def _take(self, new_BC: np.ndarray) -> None:
        live_B = ~self.done_B
        for r, new in enumerate(new_BC.tolist()):  # finished rows keep growing (with eot): contexts stay aligned
            self.generated[r].extend(new)
        self.drawn += new_BC.shape[1]
        self.done_B |= (new_BC == self.request.eot_id).any(axis=1)
        if self.on_chunk is not None:
            fresh = {r: g[-new_BC.shape[1] :] for r, g in enumerate(self.generated) if live_B[r]}
            for r in self.on_chunk(fresh) or ():
                self.stop_B[r] = True
        self.done_B |= self.stop_B


def _finish(tokens: list[int], eot_id: int) -> tuple[list[int], str]:
    if eot_id in tokens:
        return tokens[: tokens.index(eot_id)], STOP_EOT
    return tokens, STOP_LENGTH
