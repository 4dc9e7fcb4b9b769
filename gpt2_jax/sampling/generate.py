"""Host side of generation: prompts to padded token rows, shape buckets, the chunk loop, stop strings, text.

`generate_tokens` turns token prompts into continuations by calling the device functions of `sampling.py`: one
prefill, then decode chunks back to back. Shapes are bucketed so that a new prompt length rarely compiles anew:
prompts are left-padded to a power of two (at least 16 tokens), and the cache gets the padded prompt plus the new
tokens rounded up to a multiple of 64 slots (not always n_ctx: every decode step attends over all slots).

Longer than the context: when prompt + length exceed n_ctx, the cache holds n_ctx slots and, once full, is
refilled with the last `window` tokens of the context (default n_ctx // 2) and decoding goes on. Step by step, the
next token is drawn from the model's output on `context[start:]`, where `start` moves to `len(context) - window`
whenever the context would outgrow n_ctx tokens (a prompt longer than n_ctx first keeps its last n_ctx tokens).
Rows needing the window run with equal-length prompts and no padding, so the window moves exactly as it would for
the row alone.

`generate_samples` and `generate_text` add text: prompts encoded, stop strings cut (the stop string and all after
it dropped), and the first row of each batch streamed to a callback as it decodes.
"""

from __future__ import annotations

import codecs
import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.model.decode import DecodeWeights, decode_weights
from gpt2_jax.sampling.loop import decode_chunk, prefill_and_sample
from gpt2_jax.sampling.processors import SamplingConfig

STOP_LENGTH, STOP_EOT, STOP_STRING = "length", "endoftext", "stop"
MIN_PROMPT_BUCKET = 16
CACHE_SLOT_MULTIPLE = 64
STREAM_CHUNK = 16  # tokens per device call while streaming or watching for stop strings

OnChunk = Callable[[dict[int, list[int]]], Iterable[int] | None]


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- shapes ------------------------------------------------------------------------------------------------------
def prompt_bucket(n_tokens: int, limit: int) -> int:
    """The padded prompt width: a power of two >= 16, but no more than `limit` (and never less than the prompt)."""
    bucket = max(MIN_PROMPT_BUCKET, 1 << (n_tokens - 1).bit_length())
    return max(n_tokens, min(bucket, limit))


def cache_slots(needed: int, n_ctx: int) -> int:
    return min(n_ctx, -(-needed // CACHE_SLOT_MULTIPLE) * CACHE_SLOT_MULTIPLE)


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens_BT = np.full((len(rows), width), pad_id, np.int32)
    mask_BT = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        if row:
            tokens_BT[i, width - len(row) :] = row
            mask_BT[i, width - len(row) :] = True
    return tokens_BT, mask_BT


# --- tokens in, tokens out -------------------------------------------------------------------------------------
def generate_tokens(
    params: Any,
    config: GPT2Config,
    prompts: Sequence[Sequence[int]],
    *,
    length: int,
    sampling: SamplingConfig,
    seed: int,
    eot_id: int,
    row_ids: Sequence[int] | None = None,
    window: int | None = None,
    chunk: int | None = None,
    on_chunk: OnChunk | None = None,
) -> list[tuple[list[int], str]]:
    """Per prompt, (up to `length` new token ids, stop_reason 'endoftext' or 'length'); eot itself is dropped.

    params: the model's params, or `decoder.decode_weights(params, config)` made once by a caller that generates
        repeatedly (the conversion copies the weights).

    row_ids: each row's identity for the random draws (default 0..B-1): equal seed and row id, equal sample.
    on_chunk: called with {row: new token ids} after each device call; returns rows to stop (stop strings).
    """
    if length <= 0:
        raise UsageError(f"The number of tokens to generate must be at least 1, got {length}.")
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
    row_ids = list(range(len(rows))) if row_ids is None else list(row_ids)
    weights = params if isinstance(params, DecodeWeights) else decode_weights(params, config)
    window = max(1, min(window or config.n_ctx // 2, config.n_ctx - 1))
    results: list[Any] = [None] * len(rows)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(rows):
        sliding = len(p) + length - 1 > config.n_ctx
        groups.setdefault(len(p) if sliding else -1, []).append(i)
    for members in groups.values():
        out = _generate_batch(
            weights, config, [rows[i] for i in members], [row_ids[i] for i in members],
            length=length, sampling=sampling, seed=seed, eot_id=eot_id, window=window, chunk=chunk,
            on_chunk=None if on_chunk is None else _renumbered(on_chunk, members),
        )  # fmt: skip
        for i, result in zip(members, out):
            results[i] = result
    return results


def _renumbered(on_chunk: OnChunk, members: list[int]) -> OnChunk:
    def call(new: dict[int, list[int]]) -> list[int]:
        stops = on_chunk({members[r]: t for r, t in new.items()}) or ()
        back = {m: r for r, m in enumerate(members)}
        return [back[m] for m in stops if m in back]

    return call


def _generate_batch(
    weights: DecodeWeights,
    config: GPT2Config,
    rows: list[list[int]],
    row_ids: list[int],
    *,
    length: int,
    sampling: SamplingConfig,
    seed: int,
    eot_id: int,
    window: int,
    chunk: int | None,
    on_chunk: OnChunk | None,
) -> list[tuple[list[int], str]]:
    """One device batch. Rows that will need the window all have the same prompt length (no padding)."""
    B, longest, n_ctx = len(rows), max(map(len, rows)), config.n_ctx
    if longest + length - 1 > n_ctx:
        width, slots = longest, n_ctx
    else:
        width = prompt_bucket(longest, n_ctx - (length - 1))
        slots = cache_slots(width + length - 1, n_ctx)
    chunk = chunk or slots
    static = dict(config=config, sampling=sampling)
    ids, eot, seed_arr = np.asarray(row_ids, np.int32), np.int32(eot_id), np.uint32(seed % 2**32)
    generated: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    host_stop = np.zeros(B, bool)

    def take(new_BC: np.ndarray) -> None:
        live = ~done
        for r in range(B):  # finished rows keep growing (with eot) so every row's context has the same length
            generated[r].extend(new_BC[r].tolist())
        done[:] |= (new_BC == eot_id).any(axis=1)
        if on_chunk is not None:
            fresh = {r: generated[r][-new_BC.shape[1] :] for r in range(B) if live[r]}
            for r in on_chunk(fresh) or ():
                host_stop[r] = True
        done[:] |= host_stop

    tokens_BT, mask_BT = left_pad(rows, width, eot_id)
    state, first_B = prefill_and_sample(
        weights, tokens_BT, mask_BT, ids, done.copy(), np.int32(0), seed_arr, eot, max_len=slots, **static
    )
    take(np.asarray(first_B)[:, None])
    drawn, cache_index = 1, width
    while drawn < length and not done.all():
        if cache_index == slots:  # the window slides: refill the cache with the context's last `window` tokens
            context = [(rows[r] + generated[r])[-window:] for r in range(B)]
            state, new_B = prefill_and_sample(
                weights, np.asarray(context, np.int32), np.ones((B, window), bool), ids, done.copy(),
                np.int32(drawn), seed_arr, eot, max_len=slots, **static,
            )  # fmt: skip
            take(np.asarray(new_B)[:, None])
            drawn, cache_index = drawn + 1, window
            continue
        steps = min(chunk, length - drawn, slots - cache_index)
        state, out_BS, n_steps = decode_chunk(weights, state, np.int32(steps), host_stop.copy(), eot, **static)
        n_steps = int(n_steps)
        take(np.asarray(out_BS)[:, :n_steps])
        drawn, cache_index = drawn + n_steps, cache_index + n_steps
        if n_steps < steps:
            break  # every row finished on the device
    del state
    return [_finish(g[:length], eot_id) for g in generated]


def _finish(tokens: list[int], eot_id: int) -> tuple[list[int], str]:
    if eot_id in tokens:
        return tokens[: tokens.index(eot_id)], STOP_EOT
    return tokens, STOP_LENGTH


# --- text --------------------------------------------------------------------------------------------------------
def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt text to ids: '' means unconditional (just <|endoftext|>); a typed <|endoftext|> is the real token.

    Text that is not valid Unicode (lone surrogates from undecodable bytes in argv or a file) is repaired first.
    """
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return tokenizer.encode(text, allow_special=True) if text else [tokenizer.eot_id]


class RowText:
    """One row's text as its tokens arrive: stops at eot or at the first stop string (which is cut off)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
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


@dataclasses.dataclass
class Sample:
    prompt: str
    text: str
    tokens: list[int]  # the generated ids, prompt excluded, cut like the text
    stop_reason: str  # 'length', 'endoftext' or 'stop'
    index: int  # 0-based sample number for its prompt
    prompt_index: int = 0


def generate_samples(
    params: Any,
    config: GPT2Config,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    nsamples: int = 1,
    batch_size: int | None = None,
    length: int = 100,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    stop: Sequence[str] = (),
    on_text: Callable[[int, str], None] | None = None,
) -> Iterator[Sample]:
    """`nsamples` continuations of each prompt, yielded batch by batch (a batch may mix prompts).

    Sample j of prompt i draws with row id `i * nsamples + j`, so its text does not depend on `batch_size`.
    `on_text(j, text)` streams the first sample of each batch as it decodes. A short last batch is filled with
    spare rows (discarded) so that it reuses the compiled shapes.
    """
    weights = params if isinstance(params, DecodeWeights) else decode_weights(params, config)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    rows = [(i, j) for i in range(len(prompts)) for j in range(nsamples)]
    batch_size = min(batch_size or len(rows), len(rows))
    chunk = STREAM_CHUNK if on_text is not None or stop else None
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        batch += [batch[-1]] * (batch_size - len(batch))
        texts = [RowText(tokenizer, stop) for _ in batch]
        streamed = batch[0][1]

        def on_chunk(new: dict[int, list[int]], texts: list[RowText] = texts, streamed: int = streamed) -> list[int]:
            stopped = [r for r, ids in new.items() if texts[r].extend(ids)]
            if on_text is not None:
                on_text(streamed, texts[0].new_text())
            return stopped

        out = generate_tokens(
            weights, config, [encoded[i] for i, _ in batch], length=length, sampling=sampling, seed=seed,
            eot_id=tokenizer.eot_id, row_ids=[i * nsamples + j for i, j in batch], chunk=chunk, on_chunk=on_chunk,
        )  # fmt: skip
        if on_text is not None:
            on_text(streamed, texts[0].new_text(final=True))
        for r, (i, j) in enumerate(batch[: len(rows) - start]):
            text = texts[r]
            reason = text.stop_reason if text.stop_reason == STOP_STRING else out[r][1]
            yield Sample(prompts[i], text.text, text.tokens, reason, j, i)


def generate_text(
    params: Any,
    config: GPT2Config,
    tokenizer: Any,
    prompts: list[str],
    *,
    nsamples_per_prompt: int = 1,
    length: int = 100,
    temperature: float = 1.0,
    top_k: int = 40,
    top_p: float = 1.0,
    seed: int = 0,
    stop: list[str] | None = None,
    batch_size: int | None = None,
) -> list[list[str]]:
    """Per prompt, its `nsamples_per_prompt` generated continuations (prompt excluded); '' means unconditional."""
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    texts: list[list[str]] = [[] for _ in prompts]
    for s in generate_samples(
        params, config, tokenizer, prompts, nsamples=nsamples_per_prompt, batch_size=batch_size, length=length,
        sampling=sampling, seed=seed, stop=stop or (),
    ):  # fmt: skip
        texts[s.prompt_index].append(s.text)
    return texts
