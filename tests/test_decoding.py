"""The decoding hooks: prefill + one-token steps over the KV cache equal one full forward pass.

Every test feeds known continuations (teacher forcing) so logits can be compared position by position with the
uncached model, which test_model.py ties to the PyTorch reference. All functions run jitted as the sampler runs
them: the config static, the cache donated.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import random_params

from gpt2_jax.config import GPT2Config
from gpt2_jax.decoding import decode_step, init_cache, prefill
from gpt2_jax.errors import UserError
from gpt2_jax.model.transformer import GPT2

CFG = GPT2Config(n_vocab=97, n_ctx=32, n_embd=48, n_head=3, n_layer=3)  # 3 heads of 16, as in test_model.py
MAX_LEN = CFG.n_ctx
L = 20  # prompt + continuation length in every test, so one full-forward compilation serves them all
PROMPT_LENGTHS = (1, 6, 13)
ATOL = 1e-5

DECODE_TRACES: collections.Counter = collections.Counter()  # (config, batch) -> times decode_jit traced it


def _counted_decode_step(params: Any, config: GPT2Config, token_B: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    DECODE_TRACES[config, token_B.shape[0]] += 1
    return decode_step(params, config, token_B, cache)


prefill_jit = jax.jit(prefill, static_argnums=1)
decode_jit = jax.jit(_counted_decode_step, static_argnums=1, donate_argnums=3)


@functools.partial(jax.jit, static_argnums=0)
def full_forward(config: GPT2Config, params: Any, tokens_BT: Any) -> jax.Array:
    return GPT2(config).apply({"params": params}, tokens_BT)


@pytest.fixture(scope="module")
def params() -> Any:
    return random_params(CFG, seed=4)


def sequences(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, CFG.n_vocab, (batch, L)).astype(np.int32)


def max_abs_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def decode_teacher_forced(params: Any, cache: Any, next_tokens_BS: np.ndarray) -> tuple[np.ndarray, Any]:
    """Feed each column of `next_tokens_BS` through decode_step; logits `[B, S, V]` of every step."""
    steps = []
    for s in range(next_tokens_BS.shape[1]):
        logits_BV, cache = decode_jit(params, CFG, jnp.asarray(next_tokens_BS[:, s]), cache)
        steps.append(np.asarray(logits_BV))
    return np.stack(steps, axis=1), cache


def decode_alone(params: Any, row: np.ndarray, prompt_len: int) -> np.ndarray:
    """Logits `[L, V]` of one unpadded row: its prompt prefilled, the rest of it decoded a token at a time."""
    cache = init_cache(CFG, 1, MAX_LEN)
    prompt_logits, cache = prefill_jit(params, CFG, jnp.asarray(row[None, :prompt_len]), cache)
    step_logits, _ = decode_teacher_forced(params, cache, row[None, prompt_len:])
    return np.concatenate([np.asarray(prompt_logits), step_logits], axis=1)[0]


@pytest.mark.parametrize("prompt_len", PROMPT_LENGTHS)
def test_prefill_then_decode_equals_full_forward(params: Any, prompt_len: int) -> None:
    row = sequences(1, seed=prompt_len)[0]
    full = np.asarray(full_forward(CFG, params, row[None]))[0]
    cached = decode_alone(params, row, prompt_len)
    assert cached.shape == full.shape == (L, CFG.n_vocab)
    assert max_abs_diff(cached, full) <= ATOL


def pad_prompts(rows: np.ndarray, lengths: tuple[int, ...], side: str) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first `lengths[i]` tokens, padded to the longest on `side` (pad id 0), and the mask."""
    T = max(lengths)
    tokens_BT = np.zeros((len(lengths), T), np.int32)
    mask_BT = np.zeros((len(lengths), T), bool)
    for i, n in enumerate(lengths):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        tokens_BT[i, sl], mask_BT[i, sl] = rows[i, :n], True
    return tokens_BT, mask_BT


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_decodes_as_each_prompt_alone(params: Any, side: str) -> None:
    """Prompts of different lengths in one batch; then every row continues with its own tokens."""
    rows = sequences(len(PROMPT_LENGTHS), seed=7)
    tokens_BT, mask_BT = pad_prompts(rows, PROMPT_LENGTHS, side)
    cache = init_cache(CFG, len(rows), MAX_LEN)
    prompt_logits, cache = prefill_jit(params, CFG, jnp.asarray(tokens_BT), cache, jnp.asarray(mask_BT))
    # The cache records what prefill wrote: the shared index, real tokens per row, which slots hold them.
    T = tokens_BT.shape[1]
    assert int(cache["index"]) == T
    assert np.asarray(cache["length"]).tolist() == list(PROMPT_LENGTHS)
    assert np.array_equal(np.asarray(cache["valid"]), np.pad(mask_BT, ((0, 0), (0, MAX_LEN - T))))
    assert not np.asarray(cache["k"])[:, :, T:].any() and np.asarray(cache["k"])[:, :, :T].any()
    # Row i's next real token after its prompt; all rows step together from here on.
    n_steps = L - max(PROMPT_LENGTHS)
    next_BS = np.stack([rows[i, n : n + n_steps] for i, n in enumerate(PROMPT_LENGTHS)])
    step_logits, cache = decode_teacher_forced(params, cache, next_BS)
    assert int(cache["index"]) == T + n_steps
    assert np.asarray(cache["length"]).tolist() == [n + n_steps for n in PROMPT_LENGTHS]
    for i, n in enumerate(PROMPT_LENGTHS):
        alone = decode_alone(params, rows[i], n)
        assert max_abs_diff(np.asarray(prompt_logits)[i][mask_BT[i]], alone[:n]) <= ATOL
        assert max_abs_diff(step_logits[i], alone[n : n + n_steps]) <= ATOL


def test_cache_shapes_and_dtypes(params: Any) -> None:
    cache = init_cache(CFG, 2, 16)
    kv = (CFG.n_layer, 2, 16, CFG.n_head, CFG.head_dim)
    spec = {k: (v.shape, v.dtype) for k, v in cache.items()}
    assert spec == {
        "k": (kv, jnp.float32),
        "v": (kv, jnp.float32),
        "valid": ((2, 16), jnp.bool_),
        "index": ((), jnp.int32),
        "length": ((2,), jnp.int32),
    }
    assert not np.asarray(cache["valid"]).any() and int(cache["index"]) == 0
    # Prefill and decode keep every shape and dtype (a fixed-shape cache is what lets one compilation serve all).
    mask_BT = jnp.asarray([[False, True, True], [True, True, True]])
    prompt_BT = jnp.zeros((2, 3), jnp.int32)
    logits, after_prefill = jax.eval_shape(lambda c: prefill(params, CFG, prompt_BT, c, mask_BT), cache)
    assert logits.shape == (2, 3, CFG.n_vocab) and logits.dtype == jnp.float32
    assert {k: (v.shape, v.dtype) for k, v in after_prefill.items()} == spec
    logits, after_step = jax.eval_shape(lambda c: decode_step(params, CFG, jnp.zeros((2,), jnp.int32), c), cache)
    assert logits.shape == (2, CFG.n_vocab) and logits.dtype == jnp.float32
    assert {k: (v.shape, v.dtype) for k, v in after_step.items()} == spec


def test_cache_dtype_follows_compute_dtype_unless_given() -> None:
    bf16 = CFG.replace(dtype="bfloat16")
    assert init_cache(bf16, 1, 4)["k"].dtype == jnp.bfloat16
    assert init_cache(bf16, 1, 4, dtype=jnp.float32)["v"].dtype == jnp.float32
    assert init_cache(CFG, 1, 4, dtype="bfloat16")["k"].dtype == jnp.bfloat16


@pytest.mark.parametrize("max_len", [CFG.n_ctx + 1, 0, -3])
def test_init_cache_refuses_lengths_outside_the_context(max_len: int) -> None:
    with pytest.raises(UserError, match=rf"max_len={max_len} .*choose 1 to n_ctx=32"):
        init_cache(CFG, 1, max_len)


def test_init_cache_refuses_an_empty_batch() -> None:
    with pytest.raises(UserError, match="at least 1 row"):
        init_cache(CFG, 0, 8)


def test_prefill_refuses_a_prompt_longer_than_the_cache(params: Any) -> None:
    with pytest.raises(UserError, match="A prompt of 9 tokens does not fit a decoding cache of 8 slots"):
        prefill(params, CFG, jnp.zeros((1, 9), jnp.int32), init_cache(CFG, 1, 8))


def test_jitted_decode_step_donates_its_cache_and_compiles_once(params: Any) -> None:
    row = sequences(1, seed=11)[0]
    _, cache = prefill_jit(params, CFG, jnp.asarray(row[None, :6]), init_cache(CFG, 1, MAX_LEN))
    full = np.asarray(full_forward(CFG, params, row[None]))[0]
    for t in range(6, L):
        old = cache
        logits, cache = decode_jit(params, CFG, jnp.asarray(row[None, t]), cache)
        assert old["k"].is_deleted() and old["v"].is_deleted()  # updated in place, not copied
        assert max_abs_diff(logits[0], full[t]) <= ATOL
    assert DECODE_TRACES[CFG, 1] == 1  # every step (and every other test's batch-1 steps) reused one compilation


def test_bfloat16_cache_decodes_close_to_float32(params: Any) -> None:
    """The bf16 path (cache and compute in bf16): within bf16 rounding of the fp32 model, logits still fp32."""
    bf16 = CFG.replace(dtype="bfloat16")
    row = sequences(1, seed=12)[0]
    cache = init_cache(bf16, 1, MAX_LEN)
    _, cache = jax.jit(prefill, static_argnums=1)(params, bf16, jnp.asarray(row[None, :6]), cache)
    step = jax.jit(decode_step, static_argnums=1, donate_argnums=3)
    full = np.asarray(full_forward(CFG, params, row[None]))[0]
    for t in range(6, 10):
        logits, cache = step(params, bf16, jnp.asarray(row[None, t]), cache)
        assert logits.dtype == jnp.float32 and cache["k"].dtype == jnp.bfloat16
        assert max_abs_diff(logits[0], full[t]) <= 2e-2 * float(np.abs(full[t]).max())
