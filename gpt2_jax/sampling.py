"""Sampling from GPT-2 on the device: logit processors, a prefill, and a jitted decode loop over a KV cache.

Processors are small pure functions of `[B, V]` logits, applied in this order (OpenAI's sample.py and Hugging Face
agree on it): repetition penalty, banned ids, then either greedy argmax (temperature 0) or temperature, top-k,
top-p (nucleus) and a draw. Top-k uses `lax.top_k`, so the nucleus is computed over the k survivors only and no
per-token sort of the vocabulary happens unless top-k is off.

The loop (on `decoder.py`'s decode-time layout of the model): `prefill_and_sample` runs the (left-padded) prompt
through the model in one pass and draws the first token; `decode_chunk` then runs up to a given number of
single-token steps in one `lax.while_loop`, with the loop state donated, returning the chunk's tokens. A row stops
at `<|endoftext|>`; the loop ends early once every row has.
The host (`generate.py`) calls chunks back to back, so it can stream text and check stop strings between them
without a round trip per token. Randomness is keyed per row and step (`fold_in(fold_in(seed, row_id), step)`), so a
sample depends on its seed and row id, not on the batch it ran in.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.decoder import DecodeWeights, forward, init_kv
from gpt2_jax.errors import UsageError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. Frozen and hashable: a static jit argument (a new setting compiles anew).

    temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off; repetition_penalty > 1 makes tokens
    already in the context less likely (CTRL's rule: positive logits divided, negative ones multiplied).
    """

    temperature: float = 1.0
    top_k: int = 40
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    banned_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"--top_k must be a whole number >= 0 (0 turns it off), got {self.top_k}.")
        if not (0 < self.top_p <= 1):
            raise UsageError(f"--top_p must lie in (0, 1] (1 turns it off), got {self.top_p}.")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UsageError(f"--repetition_penalty must be positive (1 turns it off), got {self.repetition_penalty}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# --- logit processors: pure functions of [B, V] (or candidate [B, K]) logits -------------------------------------
def apply_repetition_penalty(logits_BV: Array, seen_BV: Array, penalty: float) -> Array:
    penalised_BV = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalised_BV, logits_BV)


def ban_ids(logits_BV: Array, banned_ids: tuple[int, ...]) -> Array:
    return logits_BV.at[:, jnp.asarray(banned_ids, jnp.int32)].set(-jnp.inf)


def apply_temperature(logits: Array, temperature: float) -> Array:
    return logits / temperature


def top_k_candidates(logits_BV: Array, k: int) -> tuple[Array, Array]:
    """The k largest logits per row, sorted descending, and their token ids (ties: lower id first)."""
    return jax.lax.top_k(logits_BV, min(k, logits_BV.shape[-1]))


def top_p_filter(sorted_logits_BK: Array, top_p: float) -> Array:
    """Keep the smallest prefix of the (descending) candidates whose probability reaches top_p; -inf the rest.

    The nucleus of Holtzman et al.: a candidate stays if the mass before it is below top_p, so the most likely
    one always stays and the one that crosses top_p is included.
    """
    probs_BK = jax.nn.softmax(sorted_logits_BK, axis=-1)
    mass_before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK
    return jnp.where(mass_before_BK < top_p, sorted_logits_BK, -jnp.inf)


def draw(keys_B: Array, logits_BK: Array) -> Array:
    """One index per row, drawn from softmax(logits) with that row's own key."""
    return jax.vmap(jax.random.categorical)(keys_B, logits_BK)


def next_token(logits_BV: Array, keys_B: Array, seen_BV: Array | None, sampling: SamplingConfig) -> Array:
    """The next token id per row `[B]` (int32) from float32 logits, after every processor in order."""
    if sampling.repetition_penalty != 1:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, sampling.repetition_penalty)
    if sampling.banned_ids:
        logits_BV = ban_ids(logits_BV, sampling.banned_ids)
    if sampling.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    ids_BK = None
    if sampling.top_k:
        logits_BV, ids_BK = top_k_candidates(logits_BV, sampling.top_k)
    elif sampling.top_p < 1:  # nucleus over the whole vocabulary needs it sorted
        logits_BV, ids_BK = top_k_candidates(logits_BV, logits_BV.shape[-1])
    # Temperature after top-k is the same as before it (a positive scale keeps the order) and touches k values only.
    logits_BV = apply_temperature(logits_BV, sampling.temperature)
    if sampling.top_p < 1:
        logits_BV = top_p_filter(logits_BV, sampling.top_p)
    choice_B = draw(keys_B, logits_BV)
    if ids_BK is not None:
        choice_B = jnp.take_along_axis(ids_BK, choice_B[:, None], axis=-1)[:, 0]
    return choice_B.astype(jnp.int32)


# --- the device loop -------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything one decode step needs; lives on the device and is donated from chunk to chunk."""

    cache: dict[str, Any]  # decoder.forward's cache: per-layer k/v lists, valid, index, length
    token_B: Array  # int32: the newest drawn token, not yet fed to the model
    done_B: Array  # bool: the row drew <|endoftext|> (or the host stopped it); it now only repeats eot
    seen_BV: Array | None  # bool: tokens in the context (only with a repetition penalty)
    row_keys_B: Array  # one PRNG key per row, from the seed and the row id
    step: Array  # int32 []: tokens drawn so far (the same for every row); keys fold it in


def _step_keys(row_keys_B: Array, step: Array) -> Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys_B, step)


def _mark_seen(seen_BV: Array | None, tokens_BT: Array, mask_BT: Array | None = None) -> Array | None:
    if seen_BV is None:
        return None
    rows_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[0])[:, None], tokens_BT.shape)
    values = True if mask_BT is None else mask_BT
    return seen_BV.at[rows_BT, tokens_BT].max(values)


@functools.partial(jax.jit, static_argnames=("config", "sampling", "max_len"))
def prefill_and_sample(
    weights: DecodeWeights,
    tokens_BT: Array,
    mask_BT: Array,
    row_ids_B: Array,
    done_B: Array,
    step: Array,
    seed: Array,
    eot_id: Array,
    *,
    config: GPT2Config,
    sampling: SamplingConfig,
    max_len: int,
) -> tuple[DecodeState, Array]:
    """Fill a fresh `max_len`-slot cache with left-padded prompts (`decoder.decode_weights` weights) and draw each
    row's next token. Rows already `done_B` draw eot. Returns the loop state and the drawn tokens `[B]` (a separate
    buffer, so the host can read them after the state has been donated)."""
    B = tokens_BT.shape[0]
    k, v = init_kv(config, B, max_len)
    cache = {"k": k, "v": v, "valid": jnp.zeros((B, max_len), bool), "index": jnp.zeros((), jnp.int32)}
    logits_BV, cache = forward(weights, config, tokens_BT, mask_BT, dict(cache, length=jnp.zeros((B,), jnp.int32)))
    row_keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), row_ids_B)
    seen_BV = None
    if sampling.repetition_penalty != 1:
        seen_BV = _mark_seen(jnp.zeros((B, config.n_vocab), bool), tokens_BT, mask_BT)
    token_B = next_token(logits_BV, _step_keys(row_keys_B, step), seen_BV, sampling)
    token_B = jnp.where(done_B, eot_id, token_B)
    seen_BV = _mark_seen(seen_BV, token_B[:, None])
    state = DecodeState(cache, token_B, done_B | (token_B == eot_id), seen_BV, row_keys_B, step + 1)
    return state, token_B.copy()


@functools.partial(jax.jit, static_argnames=("config", "sampling"), donate_argnames=("state",))
def decode_chunk(
    weights: DecodeWeights,
    state: DecodeState,
    max_steps: Array,
    stop_B: Array,
    eot_id: Array,
    *,
    config: GPT2Config,
    sampling: SamplingConfig,
) -> tuple[DecodeState, Array, Array]:
    """Up to `max_steps` decode steps in one while_loop; fewer if every row is done or the cache is full.

    stop_B: rows the host wants stopped (a stop string was seen). Returns the state, the drawn tokens `[B, S]`
    (column i is step i; eot for finished rows; S the cache size, so no chunk length is compiled in) and how many
    steps ran.
    """
    B, max_len = state.cache["valid"].shape
    state = dataclasses.replace(state, done_B=state.done_B | stop_B)
    new_mask_B1 = jnp.ones((B, 1), bool)

    def running(carry: tuple[DecodeState, Array, Array]) -> Array:
        state, _, i = carry
        return (i < max_steps) & ~jnp.all(state.done_B) & (state.cache["index"] < max_len)

    def step(carry: tuple[DecodeState, Array, Array]) -> tuple[DecodeState, Array, Array]:
        state, out_BS, i = carry
        logits_BV, cache = forward(weights, config, state.token_B[:, None], new_mask_B1, state.cache)
        token_B = next_token(logits_BV, _step_keys(state.row_keys_B, state.step), state.seen_BV, sampling)
        token_B = jnp.where(state.done_B, eot_id, token_B)
        out_BS = jax.lax.dynamic_update_slice(out_BS, token_B[:, None], (0, i))
        state = DecodeState(
            cache,
            token_B,
            state.done_B | (token_B == eot_id),
            _mark_seen(state.seen_BV, token_B[:, None]),
            state.row_keys_B,
            state.step + 1,
        )
        return state, out_BS, i + 1

    out_BS = jnp.full((B, max_len), eot_id, jnp.int32)
    state, out_BS, n_steps = jax.lax.while_loop(running, step, (state, out_BS, jnp.zeros((), jnp.int32)))
    return state, out_BS, n_steps


def __getattr__(name: str) -> Any:
    # generate_text lives with the host side (generate.py imports this module); keep `sampling.generate_text` working.
    if name == "generate_text":
        from gpt2_jax.generate import generate_text

        return generate_text
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
