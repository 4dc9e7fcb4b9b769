"""The decode loop as accelerators run it, against the code it replaced, on the CPU.

- `decode_chunk` in blocks of a static number of steps (early stop checked between blocks, later steps masked)
  against `reference_chunk`, the step-by-step `while_loop` it replaced (kept here as the reference): the same
  tokens, step count and final state, array for array, for greedy and sampled draws, rows ending early, every row
  ending inside a block, host-stopped rows, a step count that is not a multiple of the block, a full cache.
- attention windows: the forward over the first W cache slots against the forward over all of them, a masked step
  (`write` False) leaving the cache as it was, the windows the host picks (`next_chunk`), and a 1,000-token
  generation through generate.py's host loop in those growing windows against one call over the whole cache.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from reference import random_params
from tolerance import ulps

from gpt2_jax.config import GPT2Config
from gpt2_jax.model import decode
from gpt2_jax.sampling import generate
from gpt2_jax.sampling.generate import Request, generate_tokens, left_pad, next_chunk
from gpt2_jax.sampling.loop import DecodeState, decode_chunk, prefill_and_sample
from gpt2_jax.sampling.processors import SamplingConfig, next_token

CFG = GPT2Config(n_vocab=97, n_ctx=64, n_embd=48, n_head=3, n_layer=2)
PROMPTS = [[5, 9], [1, 2, 3, 4, 5, 6, 7], [40, 41, 42, 43, 44]]  # left-padded to 8
GREEDY = SamplingConfig(temperature=0)
SAMPLED = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.3)  # every processor
NO_EOT = -1


# --- the reference: decode_chunk as it was, one step per while_loop iteration -----------------------------------
def _ref_step_keys(row_keys_B: jax.Array, step: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys_B, step)


def _ref_mark_seen(seen_BV: jax.Array | None, tokens_BT: jax.Array) -> jax.Array | None:
    if seen_BV is None:
        return None
    rows_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[0])[:, None], tokens_BT.shape)
    return seen_BV.at[rows_BT, tokens_BT].max(True)


@functools.partial(jax.jit, static_argnames=("config", "sampling"), donate_argnames=("state",))
def reference_chunk(weights, state, max_steps, stop_B, eot_id, *, config, sampling):
    B, max_len = state.cache["valid"].shape
    state = DecodeState(**{**vars(state), "done_B": state.done_B | stop_B})
    new_mask_B1 = jnp.ones((B, 1), bool)

    def running(carry):
        state, _, i = carry
        return (i < max_steps) & ~jnp.all(state.done_B) & (state.cache["index"] < max_len)

    def step(carry):
        state, out_BS, i = carry
        logits_BV, cache = decode.forward(weights, config, state.token_B[:, None], new_mask_B1, state.cache)
        token_B = next_token(logits_BV, _ref_step_keys(state.row_keys_B, state.step), state.seen_BV, sampling)
        token_B = jnp.where(state.done_B, eot_id, token_B)
        out_BS = jax.lax.dynamic_update_slice(out_BS, token_B[:, None], (0, i))
        seen_BV = _ref_mark_seen(state.seen_BV, token_B[:, None])
        done_B = state.done_B | (token_B == eot_id)
        return DecodeState(cache, token_B, done_B, seen_BV, state.row_keys_B, state.step + 1), out_BS, i + 1

    out_BS = jnp.full((B, max_len), eot_id, jnp.int32)
    return jax.lax.while_loop(running, step, (state, out_BS, jnp.zeros((), jnp.int32)))


# --- helpers ------------------------------------------------------------------------------------------------------
def lively_weights(config: GPT2Config, seed: int) -> decode.DecodeWeights:
    """`random_params` with every matrix 3x larger: a tiny model's greedy decoding then keeps changing token."""
    params = random_params(config, seed)
    params = jax.tree_util.tree_map_with_path(lambda path, x: 3 * x if path[-1].key == "w" else x, params)
    return decode.decode_weights(params, config)


@pytest.fixture(scope="module")
def weights() -> decode.DecodeWeights:
    return lively_weights(CFG, seed=3)


def prefilled(weights, sampling, eot: int, max_len: int, prompts=PROMPTS, config=CFG, seed=7) -> DecodeState:
    tokens_BT, mask_BT = left_pad(prompts, max(8, max(map(len, prompts))), 0)
    B = len(prompts)
    args = (tokens_BT, mask_BT, np.arange(B, dtype=np.int32), np.zeros(B, bool), np.int32(0), np.uint32(seed))
    return prefill_and_sample(weights, *args, np.int32(eot), config=config, sampling=sampling, max_len=max_len)[0]


def plain(x: jax.Array) -> np.ndarray:
    """An array as numpy; PRNG keys as their key data."""
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def both_loops(weights, sampling, *, eot=NO_EOT, max_len=CFG.n_ctx, max_steps=13, stop=(), block=8, prompts=PROMPTS):
    """Run the reference and `decode_chunk` from the same prefill, check that they agree (tokens, step count, every
    array of the state) and return the tokens drawn `[B, steps]`."""
    run = (np.int32(max_steps), np.isin(np.arange(len(prompts)), stop), np.int32(eot))
    static = dict(config=CFG, sampling=sampling)
    want, want_BS, want_n = reference_chunk(
        weights, prefilled(weights, sampling, eot, max_len, prompts), *run, **static
    )
    state = prefilled(weights, sampling, eot, max_len, prompts)
    got, got_BS, got_n = decode_chunk(weights, state, *run, **static, steps_per_block=block)
    assert int(got_n) == int(want_n)
    # Exact, floats too: both loops run the same step (decode.forward, next_token) on the same shapes and inputs, so
    # a difference is a step computed otherwise (a masked step leaking into the state, a wrong key or position).
    np.testing.assert_array_equal(np.asarray(got_BS), np.asarray(want_BS))
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(plain(g), plain(w), err_msg=jax.tree_util.keystr(path))
    return np.asarray(want_BS)[:, : int(want_n)]


def first_drawn_at(row: np.ndarray, step: int) -> int:
    """A token the row draws for the first time at `step` or later."""
    return int(next(row[i] for i in range(step, len(row)) if row[i] not in row[:i]))


# --- blocks of static length against the step-by-step loop ----------------------------------------------------
@pytest.mark.parametrize(
    "sampling,block", [(GREEDY, 8), (SAMPLED, 8), (SAMPLED, 1)], ids=["greedy", "sampled", "sampled-cpu-blocks"]
)
def test_blocks_draw_what_the_step_by_step_loop_draws(weights, sampling, block):
    free_BS = both_loops(weights, sampling, max_steps=13, block=block)  # 13 steps: 3 more are masked
    assert free_BS.shape == (3, 13) and len(np.unique(free_BS)) > 10  # a lively model, not one token repeated
    eot = first_drawn_at(free_BS[1], 4)  # rows end at <|endoftext|>, at different steps
    ended_BS = both_loops(weights, sampling, eot=eot, max_steps=13, block=block)
    ends = {list(row).index(eot) if eot in row else None for row in ended_BS.tolist()}
    assert len(ends) > 1
    both_loops(weights, sampling, stop=[0, 2], block=block)  # rows the host stopped
    alone_BS = both_loops(weights, sampling, eot=first_drawn_at(free_BS[0], 4), prompts=PROMPTS[:1], block=block)
    assert alone_BS.shape[1] < 8  # the only row ended inside the first block: the chunk stopped there
    full_BS = both_loops(weights, sampling, max_len=21, max_steps=40, block=block)
    assert full_BS.shape[1] == 21 - 8  # the cache filled up, part way through the second block


def inner_jaxprs(eqn: Any) -> list[Any]:
    return [p.jaxpr if isinstance(p, jex.core.ClosedJaxpr) else p for p in eqn.params.values() if
            isinstance(p, (jex.core.ClosedJaxpr, jex.core.Jaxpr))]  # fmt: skip


def outermost_loops(jaxpr: Any) -> list[Any]:
    """The loop equations of `jaxpr`, looking into calls but not into the loops found."""
    found = []
    for e in jaxpr.eqns:
        is_loop = e.primitive.name in ("while", "scan")
        found += [e] if is_loop else [loop for j in inner_jaxprs(e) for loop in outermost_loops(j)]
    return found


def equations(jaxpr: Any) -> list[Any]:
    """Every equation of `jaxpr`, those inside calls and loops included."""
    return [x for e in jaxpr.eqns for x in [e, *(x for j in inner_jaxprs(e) for x in equations(j))]]


def test_the_steps_of_a_block_run_in_a_loop_of_static_length(weights):
    """XLA copies a while_loop's condition to the host every iteration; a scan of static length has none."""
    state = prefilled(weights, GREEDY, NO_EOT, CFG.n_ctx)
    chunk = functools.partial(decode_chunk, weights, config=CFG, sampling=GREEDY, steps_per_block=8)
    program = jax.make_jaxpr(chunk)(state, np.int32(5), np.zeros(3, bool), np.int32(NO_EOT))
    [blocks] = outermost_loops(program.jaxpr)
    [steps] = [loop for j in inner_jaxprs(blocks) for loop in outermost_loops(j)]
    assert blocks.primitive.name == "while"  # the early stop, checked once per block
    assert steps.primitive.name == "scan" and steps.params["length"] == 8
    in_steps = {e.primitive.name for j in inner_jaxprs(steps) for e in equations(j)}
    assert "dot_general" in in_steps and "while" not in in_steps  # the model runs there, with no loop condition


# --- attention windows --------------------------------------------------------------------------------------------
forward_jit = jax.jit(decode.forward, static_argnums=1, static_argnames="window")


def test_windowed_attention_equals_attention_over_the_whole_cache(weights):
    tokens_BT, mask_BT = left_pad(PROMPTS, 8, 0)
    caches = {}
    for window in (None, 24):
        cache = decode.init_cache(CFG, 3, CFG.n_ctx)
        _, cache = forward_jit(weights, CFG, tokens_BT, mask_BT, cache, window=8)
        steps = []
        for t in range(16):  # slots 8 .. 23: all inside the window
            column_B1 = jnp.full((3, 1), (7 * t) % CFG.n_vocab, jnp.int32)
            logits_BV, cache = forward_jit(weights, CFG, column_B1, jnp.ones((3, 1), bool), cache, window=window)
            steps.append(np.asarray(logits_BV))
        caches[window] = (np.stack(steps), cache)
    (full, full_cache), (windowed, windowed_cache) = caches[None], caches[24]
    # Equal in real arithmetic: the attention sums 24 slots here and all 64 there, but the other 40 are masked to
    # exact zeros, so only the 24 real terms round, in other orders and blockings (measured: 0 ulps apart).
    assert np.max(np.abs(windowed - full)) <= ulps(full, 24)
    for a, b in zip(jax.tree.leaves(full_cache), jax.tree.leaves(windowed_cache)):  # written as without the window
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=ulps(a, 24))
    # The attention's matmuls take 24 slots, not the cache's 64.
    step = functools.partial(decode.forward, weights, CFG, column_B1, jnp.ones((3, 1), bool), window=24)
    program = jax.make_jaxpr(step)(windowed_cache)
    dots = [e for e in equations(program.jaxpr) if e.primitive.name == "dot_general"]
    slots = {v.aval.shape[1] for e in dots for v in e.invars if v.aval.ndim == 3}
    assert slots == {1, 24}  # [H, T, K] queries, [H, W, K] keys and [H, T, W] probabilities against [H, W, K] values


@pytest.mark.parametrize("max_len", [8, 20])  # a full cache (the write would be clamped onto its last slot), and not
def test_a_masked_step_leaves_the_cache_as_it_was(weights, max_len):
    tokens_BT, mask_BT = left_pad(PROMPTS, 8, 0)
    _, cache = forward_jit(weights, CFG, tokens_BT, mask_BT, decode.init_cache(CFG, 3, max_len))
    column_B1, new_B1 = jnp.full((3, 1), 11, jnp.int32), jnp.ones((3, 1), bool)
    _, kept = forward_jit(weights, CFG, column_B1, new_B1, cache, write=jnp.bool_(False))
    _, written = forward_jit(weights, CFG, column_B1, new_B1, cache, write=jnp.bool_(True))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(written))]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(kept)))
    assert sum(changed) >= 2 * CFG.n_layer  # a real step does write (so the check above is not empty)


def chunks(index: int, steps: int, slots: int, chunk: int | None = None, backend: str = "gpu") -> list[tuple]:
    """The (steps, window) of every decode call a generation of `steps` more tokens from slot `index` makes."""
    plan = []
    while steps:
        plan.append(next_chunk(index, steps, slots, chunk, backend))
        index, steps = index + plan[-1][0], steps - plan[-1][0]
    return plan


def test_chunks_end_at_window_edges_that_double():
    assert chunks(16, 127, 192) == [(112, 128), (15, 192)]  # the benchmark's 16 + 128 tokens
    assert chunks(16, 127, 192, backend="cpu") == [(127, 192)]  # a CPU attends over the whole cache, in one call
    assert chunks(16, 999, 1024) == [(112, 128), (128, 256), (256, 512), (503, 1024)]
    # Streaming, 16 tokens a call: a call that would cross an edge stops at it.
    assert chunks(120, 40, 256, chunk=16) == [(8, 128), (16, 256), (16, 256)]


def test_a_long_generation_runs_in_growing_windows_and_draws_what_the_whole_cache_draws(monkeypatch):
    """generate.py's host loop, once as on a CPU (one call over the whole cache), once choosing windows as on a GPU."""
    config = GPT2Config(n_vocab=97, n_ctx=1024, n_embd=32, n_head=2, n_layer=1)
    weights = lively_weights(config, seed=5)
    prompts, request = [list(range(10, 26)), list(range(50, 66))], Request(1000, SamplingConfig(top_k=40), 3, NO_EOT)
    windows = []

    def recorded(*args, window, **kwargs):
        windows.append(window)
        return decode_chunk(*args, window=window, **kwargs)

    monkeypatch.setattr(generate, "decode_chunk", recorded)
    whole = generate_tokens(weights, config, prompts, request)
    assert windows == [1024]
    monkeypatch.setattr(generate, "next_chunk", functools.partial(next_chunk, backend="gpu"))
    windows.clear()
    windowed = generate_tokens(weights, config, prompts, request)
    assert windows == [128, 256, 512, 1024]
    assert [len(tokens) for tokens, _ in whole] == [1000, 1000] and len(set(whole[0][0])) > 50
    assert windowed == whole
