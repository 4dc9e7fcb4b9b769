"""The cached forward every sampler runs (`model/decode.py`) against the training forward and Hugging Face.

Teacher forcing: a prompt is prefilled, then the rest of a known sequence is fed one token per step, and every
step's logits (`decode.forward` returns the last position's) are compared with the full forward's logits at that
position. `decode.forward` runs jitted as the sampler runs it: the config static, the cache donated. Covered:
float32 parity at several prompt lengths, left-padded batches (each row decodes as it does alone), bfloat16 and
float16 within their rounding, Hugging Face PyTorch at one step, one compilation per shape, and `init_cache`'s
refusals.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import hf_logits, hf_model_from_params, random_params

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError
from gpt2_jax.model import decode
from gpt2_jax.model.transformer import GPT2

CFG = GPT2Config(n_vocab=97, n_ctx=32, n_embd=48, n_head=3, n_layer=3)  # 3 heads of 16, as in test_model.py
BF16 = CFG.replace(dtype="bfloat16")
FP16 = CFG.replace(dtype="float16")  # T4 and V100 sample in float16 (gpt2_jax/precision.py)
MAX_LEN = CFG.n_ctx
L = 20  # prompt + continuation length in every test, so one full-forward compilation serves them all
PROMPT_LENGTHS = (1, 6, 13)
ATOL = 1e-5  # float32 decode vs the float32 training forward (measured: at most 4e-6)
HF_ATOL = 1e-4  # float32 vs PyTorch, as in test_model.py (measured: ~3e-6)
# bfloat16 keeps 8 significant bits, so each rounding moves a value by up to u = 2^-8 of itself. Every layer rounds
# the residual stream and the inputs of its four matmuls, the head rounds two more, and the errors accumulate over
# the layers, partly cancelling in the sums. Measured on this model (5 seeds, prompts of 1, 6 and 13 tokens), in
# units of u * max|logit|: the bf16 decode against the bf16 training forward (the same values rounded at the same
# places; only the summation order differs) at most 2.5, against float32 at most 3.6 (the bf16 training forward
# itself is up to 4.3 from float32). The bounds are about 1.6x those maxima. A real bug (a wrong position, mask or
# scale) moves logits by order 1: about 40 u here.
# float16 keeps 11 significant bits (u = 2^-11) but rounds at the same places; on this CPU its attention logits and
# head run in float32 (ops.float32_accumulating_dtype: XLA:CPU has no float16 dot accumulating in float32), on a GPU
# in float16 with float32 accumulation. Measured the same way (5 seeds), in units of 2^-11 * max|logit|: the float16
# decode against the float16 training forward at most 2.0, against float32 at most 3.4 (the float16 training forward
# itself up to 3.3 from float32). The bounds are again about 1.6x those; a real bug moves logits by about 300 u.
BOUND_U = {"bfloat16": {"bfloat16": 4.0, "float32": 6.0}, "float16": {"float16": 3.5, "float32": 5.5}}
SIGNIFICANT_BITS = {"bfloat16": 8, "float16": 11}

TRACES: collections.Counter = collections.Counter()  # (config, tokens shape) -> times forward_jit traced it


def _counted_forward(weights: Any, config: GPT2Config, tokens_BT: Any, mask_BT: Any, cache: Any) -> Any:
    TRACES[config, tokens_BT.shape] += 1
    return decode.forward(weights, config, tokens_BT, mask_BT, cache)


forward_jit = jax.jit(_counted_forward, static_argnums=1, donate_argnums=4)


@functools.partial(jax.jit, static_argnums=0)
def full_forward(config: GPT2Config, params: Any, tokens_BT: Any) -> jax.Array:
    return GPT2(config).apply({"params": params}, tokens_BT)


@pytest.fixture(scope="module")
def params() -> Any:
    return random_params(CFG, seed=4)


@pytest.fixture(scope="module")
def weights(params: Any) -> decode.DecodeWeights:
    return decode.decode_weights(params, CFG)


def sequences(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, CFG.n_vocab, (batch, L)).astype(np.int32)


def max_abs_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def left_pad(rows: np.ndarray, lengths: tuple[int, ...], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first `lengths[i]` tokens, left-padded with `pad_id` to the longest, and the mask (True = real)."""
    T = max(lengths)
    tokens_BT = np.full((len(lengths), T), pad_id, np.int32)
    mask_BT = np.zeros((len(lengths), T), bool)
    for i, n in enumerate(lengths):
        tokens_BT[i, T - n :], mask_BT[i, T - n :] = rows[i, :n], True
    return tokens_BT, mask_BT


def decode_teacher_forced(
    weights: Any, config: GPT2Config, tokens_BT: np.ndarray, mask_BT: np.ndarray, next_BS: np.ndarray
) -> tuple[np.ndarray, Any]:
    """Prefill `tokens_BT`, then feed `next_BS` a column per step: logits `[B, 1 + S, V]` (prefill, then steps)."""
    cache = decode.init_cache(config, tokens_BT.shape[0], MAX_LEN)
    logits_BV, cache = forward_jit(weights, config, jnp.asarray(tokens_BT), jnp.asarray(mask_BT), cache)
    steps = [np.asarray(logits_BV)]
    for s in range(next_BS.shape[1]):
        column_B1 = jnp.asarray(next_BS[:, s : s + 1])
        logits_BV, cache = forward_jit(weights, config, column_B1, jnp.ones(column_B1.shape, bool), cache)
        steps.append(np.asarray(logits_BV))
    return np.stack(steps, axis=1), cache


def decode_alone(weights: Any, config: GPT2Config, row: np.ndarray, prompt_len: int) -> np.ndarray:
    """Logits `[L - prompt_len + 1, V]` of positions prompt_len - 1 .. L - 1 of one unpadded row."""
    prompt_1T = row[None, :prompt_len]
    logits, _ = decode_teacher_forced(weights, config, prompt_1T, np.ones_like(prompt_1T, bool), row[None, prompt_len:])
    return logits[0]


@pytest.mark.parametrize("prompt_len", PROMPT_LENGTHS)
def test_prefill_then_steps_match_the_training_forward(params: Any, weights: Any, prompt_len: int) -> None:
    row = sequences(1, seed=prompt_len)[0]
    full = np.asarray(full_forward(CFG, params, row[None]))[0]
    cached = decode_alone(weights, CFG, row, prompt_len)
    assert cached.shape == (L - prompt_len + 1, CFG.n_vocab) and cached.dtype == np.float32
    assert max_abs_diff(cached, full[prompt_len - 1 :]) <= ATOL


def test_left_padded_batch_decodes_each_row_as_alone(params: Any, weights: Any) -> None:
    """Prompts of different lengths in one batch; then every row continues with its own tokens."""
    rows = sequences(len(PROMPT_LENGTHS), seed=7)
    tokens_BT, mask_BT = left_pad(rows, PROMPT_LENGTHS, pad_id=5)
    n_steps = L - max(PROMPT_LENGTHS)
    next_BS = np.stack([rows[i, n : n + n_steps] for i, n in enumerate(PROMPT_LENGTHS)])
    batched, cache = decode_teacher_forced(weights, CFG, tokens_BT, mask_BT, next_BS)
    # The cache records what was written: the shared index, real tokens per row, which slots hold them.
    T = tokens_BT.shape[1]
    assert int(cache["index"]) == T + n_steps
    assert np.asarray(cache["length"]).tolist() == [n + n_steps for n in PROMPT_LENGTHS]
    valid_BS = np.zeros((len(rows), MAX_LEN), bool)
    valid_BS[:, :T], valid_BS[:, T : T + n_steps] = mask_BT, True
    assert np.array_equal(np.asarray(cache["valid"]), valid_BS)
    for i, n in enumerate(PROMPT_LENGTHS):
        alone = decode_alone(weights, CFG, rows[i], n)[: n_steps + 1]
        full = np.asarray(full_forward(CFG, params, rows[i][None]))[0, n - 1 : n + n_steps]
        assert max_abs_diff(batched[i], alone) <= ATOL
        assert max_abs_diff(batched[i], full) <= ATOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_decode_within_its_rounding(params: Any, dtype: str) -> None:
    """Weights, activations and cache in 16 bits, logits float32: within BOUND_U roundings of each forward."""
    config = CFG.replace(dtype=dtype)
    weights = decode.decode_weights(params, config)
    rows = sequences(len(PROMPT_LENGTHS), seed=12)
    worst = {dtype: 0.0, "float32": 0.0}
    for row, n in zip(rows, PROMPT_LENGTHS):
        cached = decode_alone(weights, config, row, n)
        assert cached.dtype == np.float32
        for name, reference in ((dtype, config), ("float32", CFG)):
            full = np.asarray(full_forward(reference, params, row[None]))[0, n - 1 :]
            u_max = 2.0 ** -SIGNIFICANT_BITS[dtype] * float(np.abs(full).max())
            worst[name] = max(worst[name], max_abs_diff(cached, full) / u_max)
    assert all(0.0 < worst[name] <= BOUND_U[dtype][name] for name in worst), worst


def test_cached_logits_match_hugging_face_at_one_step(params: Any, weights: Any) -> None:
    """A left-padded prefill and one step against PyTorch GPT-2 on the padded sequence with its mask."""
    rows = sequences(2, seed=13)
    tokens_BT, mask_BT = left_pad(rows, (4, 9), pad_id=3)
    next_B1 = np.stack([rows[0, 4:5], rows[1, 9:10]])
    cached, _ = decode_teacher_forced(weights, CFG, tokens_BT, mask_BT, next_B1)
    hf = hf_logits(
        hf_model_from_params(params, CFG),
        np.concatenate([tokens_BT, next_B1], axis=1),
        np.concatenate([mask_BT, np.ones_like(next_B1, bool)], axis=1),
    )
    assert max_abs_diff(cached, hf[:, -2:]) <= HF_ATOL


def test_jitted_steps_donate_the_cache_and_compile_once(weights: Any) -> None:
    row = sequences(1, seed=11)[0]
    prompt_1T = jnp.asarray(row[None, :6])
    _, cache = forward_jit(weights, CFG, prompt_1T, jnp.ones((1, 6), bool), decode.init_cache(CFG, 1, MAX_LEN))
    for t in range(6, L):
        old = cache
        _, cache = forward_jit(weights, CFG, jnp.asarray(row[None, t : t + 1]), jnp.ones((1, 1), bool), cache)
        assert old["k"][0].is_deleted() and old["v"][-1].is_deleted()  # updated in place, not copied
    # Every shape traced once, here and in every test before: the fixed-shape cache lets one compilation serve all.
    assert TRACES[CFG, (1, 1)] == 1 and set(TRACES.values()) == {1}, TRACES


def test_init_cache_layout_survives_prefill_and_steps(weights: Any) -> None:
    cache = decode.init_cache(CFG, 2, 16)
    kv = (2 * CFG.n_head, 16, CFG.head_dim)
    spec = jax.tree.map(lambda a: (a.shape, a.dtype), cache)
    assert spec == {
        "k": [(kv, jnp.float32)] * CFG.n_layer,
        "v": [(kv, jnp.float32)] * CFG.n_layer,
        "valid": ((2, 16), jnp.bool_),
        "index": ((), jnp.int32),
        "length": ((2,), jnp.int32),
    }
    assert not np.asarray(cache["valid"]).any() and int(cache["index"]) == 0
    for T in (3, 1):  # a prefill, then a step: every shape and dtype stays (one compilation per token shape)
        tokens_BT, mask_BT = jnp.zeros((2, T), jnp.int32), jnp.ones((2, T), bool)
        logits, after = jax.eval_shape(functools.partial(decode.forward, weights, CFG, tokens_BT, mask_BT), cache)
        assert (logits.shape, logits.dtype) == ((2, CFG.n_vocab), jnp.float32)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), after) == spec
    assert decode.init_cache(BF16, 1, 4)["v"][0].dtype == jnp.bfloat16
    assert decode.init_cache(FP16, 1, 4)["k"][0].dtype == jnp.float16


@pytest.mark.parametrize("max_len", [CFG.n_ctx + 1, 0, -3])
def test_init_cache_refuses_lengths_outside_the_context(max_len: int) -> None:
    with pytest.raises(UserError, match=rf"max_len={max_len} .*choose 1 to n_ctx=32"):
        decode.init_cache(CFG, 1, max_len)


def test_init_cache_refuses_an_empty_batch() -> None:
    with pytest.raises(UserError, match="at least 1 row"):
        decode.init_cache(CFG, 0, 8)
