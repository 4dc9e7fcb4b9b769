"""The jitted decode loop on the device, over `model/decode.py`'s forward and KV cache.

`prefill_and_sample` runs the (left-padded) prompt through the model in one pass and draws the first token;
`decode_chunk` then runs up to a given number of single-token steps, with the loop state donated, returning the
chunk's tokens. A row stops at `<|endoftext|>`; the chunk ends early once every row has. The host (`generate.py`)
calls chunks back to back, so it can stream text and check stop strings between them without a round trip per
token. Randomness is keyed per row and step (`fold_in(fold_in(seed, row_id), step)`), so a sample depends on its
seed and row id, not on the batch it ran in.

Early stop without a stall: a `while_loop` whose condition depends on the data makes XLA on a GPU copy the
condition to the host and wait for it, every iteration. So the steps run in blocks of a static count (a `fori_loop`
inside the `while_loop`) and the early stop is checked between blocks. Steps of the last block past the chunk's
end, the cache's end or the moment every row is done are masked: computed, but they change nothing (cache, tokens,
RNG step), so a chunk draws exactly what a step-by-step loop draws. On a CPU the condition is a read of host memory:
blocks there are one step long, with no masked work.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.model.decode import DecodeWeights, forward, init_cache
from gpt2_jax.sampling.processors import SamplingConfig, next_token

Array = jax.Array
STEPS_PER_BLOCK = 8  # on accelerators; see default_steps_per_block


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything one decode step needs; lives on the device and is donated from chunk to chunk."""

    cache: dict[str, Any]  # model.decode.forward's cache (model/kv_cache.py): k/v or kv, valid, index, length
    token_B: Array  # int32: the newest drawn token, not yet fed to the model
    done_B: Array  # bool: the row drew <|endoftext|> (or the host stopped it); it now only repeats eot
    seen_BV: Array | None  # bool: tokens in the context (only with a repetition penalty)
    row_keys_B: Array  # one PRNG key per row, from the seed and the row id
    step: Array  # int32 []: tokens drawn so far (the same for every row); keys fold it in


def default_steps_per_block() -> int:
    """Decode steps between early-stop checks: 1 on a CPU, where the check is a read of host memory, else 8."""
    return 1 if jax.default_backend() == "cpu" else STEPS_PER_BLOCK


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
    """Fill a fresh `max_len`-slot cache with left-padded prompts (`model.decode.decode_weights` weights) and draw each
    row's next token. Rows already `done_B` draw eot. Returns the loop state and the drawn tokens `[B]` (a separate
    buffer, so the host can read them after the state has been donated)."""
    B = tokens_BT.shape[0]
    cache = init_cache(config, B, max_len)
    logits_BV, cache = forward(weights, config, tokens_BT, mask_BT, cache, window=0)  # nothing cached to attend
    row_keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), row_ids_B)
    seen_BV = None
    if sampling.repetition_penalty != 1:
        seen_BV = _mark_seen(jnp.zeros((B, config.n_vocab), bool), tokens_BT, mask_BT)
    token_B = next_token(logits_BV, _step_keys(row_keys_B, step), seen_BV, sampling)
    token_B = jnp.where(done_B, eot_id, token_B)
    seen_BV = _mark_seen(seen_BV, token_B[:, None])
    state = DecodeState(cache, token_B, done_B | (token_B == eot_id), seen_BV, row_keys_B, step + 1)
    return state, token_B.copy()


@functools.partial(
    jax.jit, static_argnames=("config", "sampling", "window", "steps_per_block"), donate_argnames=("state",)
)
def decode_chunk(
    weights: DecodeWeights,
    state: DecodeState,
    max_steps: Array,
    stop_B: Array,
    eot_id: Array,
    *,
    config: GPT2Config,
    sampling: SamplingConfig,
    window: int | None = None,
    steps_per_block: int | None = None,
) -> tuple[DecodeState, Array, Array]:
    """Up to `max_steps` decode steps; fewer if every row is done or the cache is full.

    stop_B: rows the host wants stopped (a stop string was seen). window: attend over the first `window` cache
    slots (default all); it must cover the slots filled by the chunk's end (`attention_window` in generate.py).
    steps_per_block: steps between early-stop checks (default `default_steps_per_block()`). Returns the state, the drawn
    tokens `[B, S]` (column i is step i; eot for finished rows; S the cache size, so no chunk length is compiled
    in) and how many steps ran.
    """
    B, max_len = state.cache["valid"].shape
    block = steps_per_block or default_steps_per_block()
    state = dataclasses.replace(state, done_B=state.done_B | stop_B)
    n_run = jnp.minimum(max_steps, max_len - state.cache["index"])  # steps past it are masked
    first_step = state.step

    def step(i: Array, carry: tuple[DecodeState, Array]) -> tuple[DecodeState, Array]:
        state, out_BS = carry
        # With one step per block the loop condition has checked this already.
        on = True if block == 1 else (i < n_run) & ~jnp.all(state.done_B)
        token_B, cache = _draw(weights, state, eot_id, on, config, sampling, window)
        if on is not True:
            token_B = jnp.where(on, token_B, state.token_B)
        # A masked step writes eot where eot stands: past the chunk's steps (a column past the end is clamped to
        # the last one, which no step reaches, since the prefill took at least one slot).
        out_BS = jax.lax.dynamic_update_slice(out_BS, jnp.where(on, token_B, eot_id)[:, None], (0, i))
        state = DecodeState(
            cache,
            token_B,
            state.done_B | (token_B == eot_id),
            _mark_seen(state.seen_BV, token_B[:, None], jnp.full((B, 1), on)),
            state.row_keys_B,
            state.step + jnp.int32(on),
        )
        return state, out_BS

    def run_block(carry: tuple[DecodeState, Array, Array]) -> tuple[DecodeState, Array, Array]:
        state, out_BS, i = carry
        # A static trip count: XLA runs it without reading a loop condition back to the host each step.
        state, out_BS = jax.lax.fori_loop(0, block, lambda j, c: step(i + j, c), (state, out_BS))
        return state, out_BS, i + block

    def running(carry: tuple[DecodeState, Array, Array]) -> Array:
        state, _, i = carry
        return (i < n_run) & ~jnp.all(state.done_B)

    out_BS = jnp.full((B, max_len), eot_id, jnp.int32)
    state, out_BS, _ = jax.lax.while_loop(running, run_block, (state, out_BS, jnp.zeros((), jnp.int32)))
    return state, out_BS, state.step - first_step


def _draw(
    weights: DecodeWeights,
    state: DecodeState,
    eot_id: Array,
    on: Array | bool,
    config: GPT2Config,
    sampling: SamplingConfig,
    window: int | None,
) -> tuple[Array, dict[str, Any]]:
    """One decode step: each row's next token (eot for done rows) and the cache with this step written (if `on`)."""
    new_mask_B1 = jnp.ones((state.token_B.shape[0], 1), bool)
    logits_BV, cache = forward(
        weights, config, state.token_B[:, None], new_mask_B1, state.cache, window=window, write=on
    )
    token_B = next_token(logits_BV, _step_keys(state.row_keys_B, state.step), state.seen_BV, sampling)
    return jnp.where(state.done_B, eot_id, token_B), cache
