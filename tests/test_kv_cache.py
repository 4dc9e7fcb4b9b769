"""The decoding cache's one-buffer layout (model/kv_cache.py, the accelerators' default), run here on the CPU against
the per-layer layout the CPU keeps, and the attention that takes the new tokens apart from the cache.

- one write of every layer's keys and values leaves the buffer as per-layer writes leave per-layer arrays, bit for
  bit: at a shared index, at per-row indices, masked (it puts back what was there), clamped at the cache's end;
- `ops.cached_attention` against `ops.attention` over the cache with the new keys written in, within stated ulps;
- the forward over one buffer against the forward over per-layer arrays: a left-padded prefill, steps, a window, a
  masked step; and the whole one-buffer forward neither copies its buffer nor writes it more than once per step;
- the sampler over one buffer: greedy decoding equals Hugging Face `generate`, and the blocked loop of accelerators
  (masked steps) draws exactly what the step-by-step loop draws; the server's rows over one buffer decode as over
  per-layer arrays, and a request draws the same tokens alone or beside another.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import hf_model_from_params
from test_decode_loop import CFG as LOOP_CFG
from test_decode_loop import GREEDY, SAMPLED, both_loops, lively_weights, prefilled
from test_sampling import LENGTH, PROMPTS, hf_greedy, lively_params
from tolerance import ulps

from benchmarks import kernels
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import decode, kv_cache, ops
from gpt2_jax.model.decode import decode_weights
from gpt2_jax.sampling.generate import Request, generate_tokens, left_pad
from gpt2_jax.sampling.loop import decode_chunk
from gpt2_jax.sampling.processors import SamplingConfig
from gpt2_jax.serving import rows as device
from gpt2_jax.serving.rows import Settings

CFG = GPT2Config(n_vocab=97, n_ctx=64, n_embd=48, n_head=3, n_layer=3)
L, N, K = CFG.n_layer, CFG.n_head, CFG.head_dim


@pytest.fixture
def one_buffer(monkeypatch):
    """Caches made by default (the sampler's, the server's) in one buffer, as on an accelerator. A jitted function
    that makes its cache inside (the prefill) keeps the layout it was traced with: the caches are cleared around."""
    jax.clear_caches()
    monkeypatch.setattr(kv_cache, "one_buffer_default", lambda backend=None: True)
    yield
    jax.clear_caches()


def random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


# --- the write ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "index,write", [(5, True), (5, False), (62, True), (64, False), ([3, 40], True)],
    ids=["shared", "masked", "last-slots", "masked-past-the-end", "per-row"],
)  # fmt: skip
def test_one_write_leaves_what_per_layer_writes_leave(index, write):
    B, S, T = 2, 64, 2
    buffer_L2HSK, new_L2HTK = random((L, 2, B * N, S, K), 0), random((L, 2, B * N, T, K), 1)
    index, write = jnp.asarray(index, jnp.int32), write if write is True else jnp.bool_(write)
    one = jax.jit(kv_cache.write)(buffer_L2HSK, new_L2HTK, index, write)
    for layer in range(L):
        for kind in range(2):
            per_layer = kv_cache.write(buffer_L2HSK[layer, kind], new_L2HTK[layer, kind], index, write)
            np.testing.assert_array_equal(np.asarray(one[layer, kind]), np.asarray(per_layer))
    changed = np.asarray(one != buffer_L2HSK).any(axis=(0, 1, 4))  # [H, S]: the slots written
    if write is True:
        starts = np.repeat(np.broadcast_to(np.minimum(np.asarray(index), S - T), (B,)), N)
        assert [set(np.flatnonzero(row)) for row in changed] == [{s, s + 1} for s in starts]
    else:
        assert not changed.any()  # a masked write, even one clamped at the end, puts back what was there


# --- the attention --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 4])
def test_attention_of_new_tokens_apart_equals_attention_over_the_cache_with_them_written(T):
    B, S, index = 2, 24, 9
    q_HTK, new_2HTK, cache_2HSK = random((B * N, T, K), 2), random((2, B * N, T, K), 3), random((2, B * N, S, K), 4)
    valid_BS = np.zeros((B, S), bool)
    valid_BS[0, 2:index], valid_BS[1, 7:index] = True, True  # left padding: row 1's prompt is shorter
    mask_BT = np.ones((B, T), bool)
    mask_BT[1, 0] = False  # and a padded new token
    ctx = ops.cache_context(jnp.asarray(mask_BT), jnp.asarray(valid_BS), jnp.int32(index), jnp.zeros(B, jnp.int32))
    per_head = functools.partial(jnp.repeat, repeats=N, axis=0)
    apart = ops.cached_attention(
        q_HTK, *new_2HTK, per_head(ctx["new_mask_BTT"]), cache_2HSK, per_head(ctx["cache_mask_BS"])
    )
    written_2HSK = jax.lax.dynamic_update_slice(cache_2HSK, new_2HTK, (0, 0, index, 0))
    whole = ops.attention(q_HTK, *written_2HSK, per_head(ctx["mask_BTS"]))
    # The same exponentials, their sum and the weighted sum of values split in two parts: each sum of up to S + T
    # positive terms rounds to within S + T ulps of its result, which moves the output by about as many ulps of the
    # largest value (measured: at most 1 ulp).
    assert float(jnp.max(jnp.abs(apart - whole))) <= ulps(written_2HSK[1], S + T)
    # Nothing cached to see (a fresh prefill): the new tokens' attention alone.
    alone = ops.cached_attention(q_HTK, *new_2HTK, per_head(ctx["new_mask_BTT"]))
    np.testing.assert_array_equal(alone, ops.attention(q_HTK, *new_2HTK, per_head(ctx["new_mask_BTT"])))


# --- the forward ----------------------------------------------------------------------------------------------------
forward_jit = jax.jit(decode.forward, static_argnums=1, static_argnames="window", donate_argnums=4)


def run_forward(weights, one_buffer: bool, window: int | None, steps: int = 6):
    """A left-padded prefill (into a fresh cache: window 0), `steps` steps, then a masked step: every call's logits
    `[1 + steps, B, V]`, the cache before the masked step and the one after it."""
    tokens_BT, mask_BT = left_pad([[5, 9], [1, 2, 3, 4, 5, 6, 7], [40, 41, 42]], 8, 0)
    cache = decode.init_cache(CFG, 3, 32, one_buffer=one_buffer)
    logits_BV, cache = forward_jit(weights, CFG, tokens_BT, mask_BT, cache, window=0)
    logits = [logits_BV]
    for t in range(steps):
        column_B1 = jnp.full((3, 1), (11 * t + 3) % CFG.n_vocab, jnp.int32)
        logits_BV, cache = forward_jit(weights, CFG, column_B1, jnp.ones((3, 1), bool), cache, window=window)
        logits.append(logits_BV)
    before = jax.tree.map(np.asarray, cache)
    _, after = forward_jit(weights, CFG, column_B1, jnp.ones((3, 1), bool), cache, window=window, write=jnp.bool_(0))
    return np.stack(logits), before, jax.tree.map(np.asarray, after)


@pytest.mark.parametrize("window", [None, 16])
def test_the_forward_over_one_buffer_equals_the_forward_over_per_layer_arrays(window):
    weights = lively_weights(CFG, seed=3)
    per_layer, per_layer_cache, _ = run_forward(weights, False, window)
    one, one_cache, after_masked = run_forward(weights, True, window)
    # The attention's sums split in two (cache, new tokens) and added up in another order, then carried through 3
    # layers: a few ulps of the logits per layer (measured: 6 ulps of the largest logit, 3.3 of the largest key).
    assert np.max(np.abs(one - per_layer)) <= ulps(per_layer, 16 * L)
    for name in ("valid", "index", "length"):
        np.testing.assert_array_equal(one_cache[name], per_layer_cache[name])
    stacked_L2HSK = np.stack([np.stack([k, v]) for k, v in zip(per_layer_cache["k"], per_layer_cache["v"])])
    # Layer 0's keys and values come from the embeddings alone: equal bit for bit; later layers' within rounding.
    np.testing.assert_array_equal(one_cache["kv"][0], stacked_L2HSK[0])
    np.testing.assert_allclose(one_cache["kv"], stacked_L2HSK, rtol=0, atol=ulps(stacked_L2HSK, 16 * L))
    assert not np.array_equal(one_cache["kv"][:, :, :, 8 + 5], np.zeros_like(one_cache["kv"][:, :, :, 0]))
    for a, b in zip(jax.tree.leaves(one_cache), jax.tree.leaves(after_masked)):  # the masked step changed nothing
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("steps_per_block", [1, 8])  # the CPU's loop, and the accelerators' blocks of masked steps
def test_a_one_buffer_step_updates_its_buffer_in_place_once(one_buffer, steps_per_block):
    """The compiled decode loop (XLA:CPU here; XLA:GPU places copies with the same pass): one in-place update of the
    buffer per step and no copy of it (a write that did not wait for the layers' reads would need two)."""
    weights = lively_weights(CFG, seed=3)
    state = prefilled(weights, GREEDY, -1, CFG.n_ctx, config=CFG)
    static = dict(config=CFG, sampling=GREEDY, steps_per_block=steps_per_block)
    chunk = decode_chunk.lower(weights, state, np.int32(5), np.zeros(3, bool), np.int32(-1), **static)
    text = chunk.compile().as_text()
    computations, entry = kernels.parse_hlo(text)
    buffer = f"= f32[{L},2,{3 * N},{CFG.n_ctx},{K}]"  # what an instruction makes: the whole buffer
    made = kernels.launches(computations, entry, matching=buffer)  # over one block of steps (loops run once)
    assert list(made.elements()) == ["fusion:kLoop"] * steps_per_block  # the write (the stacking fused in), no copy


# --- the sampler and the server -------------------------------------------------------------------------------------
def test_greedy_decoding_over_one_buffer_equals_hugging_face(one_buffer):
    config = GPT2Config(n_vocab=97, n_ctx=64, n_embd=48, n_head=3, n_layer=2)  # test_sampling.py's `small` model
    params = lively_params(config, 1)
    request = Request(LENGTH, SamplingConfig(temperature=0), 0, -1)
    out = generate_tokens(decode_weights(params, config), config, PROMPTS, request)
    assert [tokens for tokens, _ in out] == hf_greedy(hf_model_from_params(params, config), PROMPTS, LENGTH)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_blocks_over_one_buffer_draw_what_the_step_by_step_loop_draws(one_buffer, sampling):
    """test_decode_loop.py's check of the accelerators' blocked loop (masked steps, early stops, a full cache), with
    the accelerators' cache: the same tokens, step count and state, array for array."""
    weights = lively_weights(LOOP_CFG, seed=3)
    free_BS = both_loops(weights, sampling, max_steps=13, block=8)
    assert free_BS.shape == (3, 13) and len(np.unique(free_BS)) > 10
    both_loops(weights, sampling, eot=int(free_BS[1, 6]), max_steps=13, block=8)  # rows ending at other steps
    both_loops(weights, sampling, max_len=21, max_steps=40, block=8)  # the cache fills up inside a block


def serve(weights, config, prompts: list[list[int]], settings: list[Settings], steps: int, one_buffer: bool):
    """Admit `prompts` into rows 0, 1, ... of a 3-row server (one buffer or per-layer arrays), then decode `steps`:
    each row's first token and log-probability, and its tokens and log-probabilities of the steps `[B, C]`."""
    rows = device.init_rows(config, 3, 64, one_buffer=one_buffer)
    static = dict(config=config, max_top_k=40)
    first = []
    for row, (prompt, s) in enumerate(zip(prompts, settings)):
        padded = np.asarray(left_pad([prompt], 16, 0)[0])
        args = (np.int32(row), padded, np.int32(len(prompt)), device.settings_arrays(s), np.int32(-1))
        rows, token, logprob = device.admit(weights, rows, *args, **static)
        first.append((int(token[0]), float(logprob[0])))
    keep = np.arange(3) < len(prompts)
    rows, tokens_BC, logprobs_BC = device.decode_rows(weights, rows, keep, np.int32(-1), steps=steps, **static)
    return first, np.asarray(tokens_BC)[: len(prompts)], np.asarray(logprobs_BC)[: len(prompts)]


def test_server_rows_over_one_buffer_decode_as_over_per_layer_arrays_and_alone_as_together():
    config = GPT2Config(n_vocab=97, n_ctx=64, n_embd=48, n_head=3, n_layer=2)
    weights = decode_weights(lively_params(config, 2), config)
    prompts = [[11, 12, 13, 14, 15], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    settings = [Settings(9, 0.0, 40, 1.0, 0, 0), Settings(9, 0.9, 20, 0.95, 4, 1)]  # greedy, and sampled
    per_layer = serve(weights, config, prompts, settings, 8, one_buffer=False)
    one = serve(weights, config, prompts, settings, 8, one_buffer=True)
    np.testing.assert_array_equal(one[1], per_layer[1])
    assert [token for token, _ in one[0]] == [token for token, _ in per_layer[0]]
    # Log-probabilities of the same tokens from logits a few ulps apart (the attention's sums split in two).
    np.testing.assert_allclose(one[2], per_layer[2], rtol=0, atol=1e-5)
    # The second request alone in row 0: bit for bit what it drew in row 1 beside the first.
    alone = serve(weights, config, prompts[1:], settings[1:], 8, one_buffer=True)
    assert alone[0] == one[0][1:]
    np.testing.assert_array_equal(alone[1], one[1][1:])
    np.testing.assert_array_equal(alone[2], one[2][1:])
    assert len(set(one[1][1].tolist())) > 3  # a lively model: not one token repeated
