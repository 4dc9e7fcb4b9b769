"""GPT-2's arithmetic, written once for both forwards: `transformer.py` (training and evaluation, activations
`[B, T, D]`, layers scanned) and `decode.py` (the only cached forward, feature-major activations `[D, M]`).

Each forward owns its layout (where the feature axis lies, how weights and the cache are stored) and calls these
functions with it. Precision is the same rule in both: params float32, matmuls in the compute dtype, and layer
norms, attention logits and softmax, and output logits in float32 (`float32_accumulating_dtype`); the training loss
alone keeps its logits in the compute dtype and its log-sum-exp in float32.

- both forwards: `gelu`, `layer_norm` (the feature axis as a parameter), `float32_accumulating_dtype`.
- attention: the training forward calls `jax.nn.dot_product_attention` (`attention_implementation` picks cuDNN's
  fused kernel or XLA), whose XLA path computes what `attention` here does (float32 logits, scale, mask, float32
  softmax, probabilities back in the compute dtype), with the dot precision JAX sets to keep a 16-bit backward
  pass consistent (jax issue 24047). `decode.py` runs `cached_attention`, the same arithmetic over its cache and
  the new tokens as two parts of one softmax, masked by `cache_context` (slots, per-row validity, positions); the
  training forward runs `attention` too when attention dropout is on (the fused kernels have none).
- the head: `tied_head` returns float32 logits (users, evaluation by logits, tests); `tied_head_losses` is the
  training loss, llm.c's fused classifier: the logits stay in the compute dtype, only the log-sum-exp is float32,
  and the backward pass writes `softmax - onehot` once in the compute dtype before its two matmuls, so no float32
  `[B, T, V]` tensor exists in 16-bit compute. Both pad a 16-bit vocabulary to a multiple of 128 (`_head_weights`).
  `decode.py` runs the same float32-accumulating matmul feature-major, where neither padding nor a backward pass is
  wanted.

Axis legend: B batch, T query positions, S key positions (cache slots), D n_embd, F MLP width (4 * D), N heads,
K head dim, H = B*N (one attention problem per row and head), V vocabulary.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.precision import has_fused_attention

Array = jax.Array
HEAD_VOCAB_MULTIPLE = 128  # 16-bit heads pad the vocabulary rows to this, for aligned tensor-core tiles
# The device a trace is for, where it is not the one JAX runs on: training/memory.py counts a T4's activations on a CPU.
_TRACED_FOR: contextvars.ContextVar[Any] = contextvars.ContextVar("traced_for", default=None)


def target_device() -> Any:
    """The device the forward is traced for: the first JAX device, unless `traced_for` names another."""
    return _TRACED_FOR.get() or jax.devices()[0]


@contextlib.contextmanager
def traced_for(device: Any) -> Iterator[None]:
    """Trace (never run) the forward as it would be on `device` (a `jax.Device` or a stand-in with its attributes):
    its dtypes and attention path, for counting the memory a step would take there."""
    token = _TRACED_FOR.set(device)
    try:
        yield
    finally:
        _TRACED_FOR.reset(token)


def gelu(x: Array) -> Array:
    """GPT-2's tanh-approximated GELU (Hugging Face's `gelu_new`)."""
    return jax.nn.gelu(x, approximate=True)


def float32_accumulating_dtype(dtype: Any) -> Any:
    """The dtype to feed a dot that accumulates in float32 (the attention logits, the head).

    XLA:CPU has no float16 x float16 -> float32 dot, so float16 compute (meant for GPUs) runs those in float32 on a
    CPU instead of failing; every other dtype and backend keeps the compute dtype.
    """
    if jnp.dtype(dtype) == jnp.float16 and target_device().platform == "cpu":
        return jnp.float32
    return dtype


def attention_implementation(config: GPT2Config) -> str:
    """'cudnn' (fused flash attention) on a GPU that has it (compute capability 8.0+) with a 16-bit compute dtype,
    else XLA's portable path: cuDNN's flash attention needs Ampere, so a T4 or V100 in float16 runs XLA's."""
    if config.attention != "auto":
        return config.attention
    if target_device().platform == "gpu" and config.dtype in ("bfloat16", "float16"):
        return "cudnn" if has_fused_attention(target_device()) else "xla"
    return "xla"


def layer_norm(x: Array, g: Array, b: Array, eps: float, dtype: Any, axis: int = -1) -> Array:
    """GPT-2's layer norm over the feature `axis` of `x`, computed in float32, returned in `dtype`.

    `g` and `b` are `[D]`; the training forward normalises the last axis of `[B, T, D]`, `decode.py` axis 0 of `[D, M]`.
    """
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis, keepdims=True)
    along = [1] * x.ndim
    along[axis] = x.shape[axis]
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * g.reshape(along) + b.reshape(along)).astype(dtype)


def attention(
    q_HTK: Array, k_HSK: Array, v_HSK: Array, mask_HTS: Array, drop_probs: Callable[[Array], Array] | None = None
) -> Array:
    """Softmax attention of T queries over S keys where `mask_HTS` is True; logits and softmax in float32.

    `drop_probs` (training with dropout only: GPT-2's attn_pdrop, which the fused kernels do not offer) is applied
    to the probabilities before they weigh the values."""
    dtype = float32_accumulating_dtype(q_HTK.dtype)
    q_HTK, k_HSK, v_HSK = (a.astype(dtype) for a in (q_HTK, k_HSK, v_HSK))
    logits_HTS = jnp.einsum("HTK,HSK->HTS", q_HTK, k_HSK, preferred_element_type=jnp.float32)
    logits_HTS = jnp.where(mask_HTS, logits_HTS * q_HTK.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)
    probs_HTS = jax.nn.softmax(logits_HTS, axis=-1).astype(dtype)
    if drop_probs is not None:
        probs_HTS = drop_probs(probs_HTS)
    return jnp.einsum("HTS,HSK->HTK", probs_HTS, v_HSK)


def cached_attention(
    q_HTK: Array,
    k_HTK: Array,
    v_HTK: Array,
    new_mask_HTT: Array,
    cached_kv_2HSK: Array | None = None,
    cache_mask_HS: Array | None = None,
) -> Array:
    """`attention` of T new queries over their own keys (`k_HTK`, `v_HTK`, masked by `new_mask_HTT`) and over S
    cached ones (`cached_kv_2HSK`: keys then values, masked by `cache_mask_HS`, the same slots for every query), as
    one softmax: the two parts' logits share their maximum and the sum of their exponentials, and the
    probabilities weigh each part's values. Equal to `attention` over the cache with the new keys written into it
    (the same terms, summed in another order), but the new keys and values need not be in the cache yet, so a decode
    step can write every layer's at once. With no cache part (a fresh cache's prefill) it is `attention`.
    """
    if cached_kv_2HSK is None:
        return attention(q_HTK, k_HTK, v_HTK, new_mask_HTT)
    dtype = float32_accumulating_dtype(q_HTK.dtype)
    q_HTK, k_HTK, v_HTK, kv_2HSK = (a.astype(dtype) for a in (q_HTK, k_HTK, v_HTK, cached_kv_2HSK))
    scale, low = q_HTK.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min
    new_HTT = jnp.einsum("HTK,HUK->HTU", q_HTK, k_HTK, preferred_element_type=jnp.float32)
    new_HTT = jnp.where(new_mask_HTT, new_HTT * scale, low)
    old_HTS = jnp.einsum("HTK,HSK->HTS", q_HTK, kv_2HSK[0], preferred_element_type=jnp.float32)
    old_HTS = jnp.where(cache_mask_HS[:, None, :], old_HTS * scale, low)
    # Every query sees itself, so the maximum is finite and a part with nothing to see contributes exact zeros.
    max_HT1 = jnp.maximum(new_HTT.max(-1, keepdims=True), old_HTS.max(-1, keepdims=True))
    new_HTT, old_HTS = jnp.exp(new_HTT - max_HT1), jnp.exp(old_HTS - max_HT1)
    sum_HT1 = new_HTT.sum(-1, keepdims=True) + old_HTS.sum(-1, keepdims=True)
    new_HTT, old_HTS = (new_HTT / sum_HT1).astype(dtype), (old_HTS / sum_HT1).astype(dtype)
    return jnp.einsum("HTU,HUK->HTK", new_HTT, v_HTK) + jnp.einsum("HTS,HSK->HTK", old_HTS, kv_2HSK[1])


def cache_context(mask_BT: Array, valid_BS: Array, index: Array, length_B: Array) -> dict[str, Array]:
    """Where T new tokens (False in `mask_BT` on padding) go in a cache of S slots, and what each may see.

    The tokens are written at the shared slot `index` (a scalar), or at each row's own slot where `index` is `[B]` (a
    serving batch whose rows joined at different times: `decode.init_cache(per_row=True)`); `valid_BS` marks the slots
    holding real tokens and `length_B` counts each row's real tokens so far. Returns the attention masks: `mask_BTS`,
    the real slots at or before each token's own, for attention over the cache with the tokens written in; for
    `cached_attention`, `cache_mask_BS`, the real slots written before these tokens (the same for each of them), and
    `new_mask_BTT`, the real new tokens at or before each one. Then the wpe rows `positions_BT` (counted over real
    tokens only, so left padding changes nothing), and the cache's `valid_BS` and `length_B` after the write.
    """
    B, T = mask_BT.shape
    if index.ndim:  # per-row write slots (a server's rows, each at its own position): index_B
        valid_BS = jax.vmap(lambda v_S, m_T, i: jax.lax.dynamic_update_slice(v_S, m_T, (i,)))(valid_BS, mask_BT, index)
    else:
        valid_BS = jax.lax.dynamic_update_slice(valid_BS, mask_BT, (0, index))
    # From the slots after the write, which below it are as they were: reading the cache's mask before its update
    # would make XLA copy it to update it.
    write_B1 = index[:, None] if index.ndim else jnp.broadcast_to(index, (B, 1))
    cache_mask_BS = valid_BS & (jnp.arange(valid_BS.shape[1]) < write_B1)
    # A padded query sees at least itself, so its (unused) softmax stays finite.
    earlier_TT = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
    new_mask_BTT = (earlier_TT[None] & mask_BT[:, None, :]) | jnp.eye(T, dtype=bool)[None]
    # The same over the whole cache, the new tokens at their slots: for attention over a cache they are written in.
    slot_S, query_slot_BT1 = jnp.arange(valid_BS.shape[1]), (write_B1 + jnp.arange(T))[:, :, None]
    mask_BTS = ((slot_S <= query_slot_BT1) & valid_BS[:, None, :]) | (slot_S == query_slot_BT1)
    return {
        "mask_BTS": mask_BTS,
        "cache_mask_BS": cache_mask_BS,
        "new_mask_BTT": new_mask_BTT,
        "positions_BT": length_B[:, None] + jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0),
        "valid_BS": valid_BS,
        "length_B": length_B + mask_BT.sum(axis=1).astype(length_B.dtype),
    }


def tied_head(x_BTD: Array, wte: Array, dtype: Any) -> Array:
    """Logits through the head tied to `wte`, accumulated and returned in float32 whatever the compute dtype.

    In 16-bit compute the padded vocabulary (`_head_weights`) is sliced off again, and the backward pass runs in the
    compute dtype (`_head_16bit`). Padded logits never leave this function.
    """
    dtype = float32_accumulating_dtype(dtype)
    wte_VD = _head_weights(wte, dtype)
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum("BTD,VD->BTV", x_BTD.astype(dtype), wte_VD, preferred_element_type=jnp.float32)
    return _head_16bit(x_BTD.astype(dtype), wte_VD)[..., : wte.shape[0]]


def _head_weights(wte: Array, dtype: Any) -> Array:
    """`wte` as the head multiplies it: in `dtype`, and in 16 bits padded with zero rows to a multiple of 128.

    50257 is odd, and an odd leading dimension forces the GPU onto unaligned, slow matmul kernels. Float32 compute
    (this CPU's) has no tensor-core tiles to align and keeps the vocabulary as it is.
    """
    wte_VD = wte.astype(dtype)
    if jnp.dtype(dtype) == jnp.float32:
        return wte_VD
    return jnp.pad(wte_VD, ((0, head_rows(wte.shape[0], dtype) - wte.shape[0]), (0, 0)))


def head_rows(n_vocab: int, dtype: Any) -> int:
    """The vocabulary rows the head multiplies in `dtype`: padded to a multiple of 128 in 16 bits."""
    return n_vocab if jnp.dtype(dtype) == jnp.float32 else n_vocab + -n_vocab % HEAD_VOCAB_MULTIPLE


@jax.custom_vjp
def _head_16bit(x_BTD: Array, wte_VD: Array) -> Array:
    return jnp.einsum("BTD,VD->BTV", x_BTD, wte_VD, preferred_element_type=jnp.float32)


def _head_16bit_fwd(x_BTD: Array, wte_VD: Array) -> tuple[Array, tuple[Array, Array]]:
    return _head_16bit(x_BTD, wte_VD), (x_BTD, wte_VD)


def _head_16bit_bwd(residuals: tuple[Array, Array], g_BTV: Array) -> tuple[Array, Array]:
    # Without this rule JAX differentiates the float32-output matmul with a float32 cotangent, which runs both
    # gradient matmuls (the largest in the model) in float32. Casting the cotangent down first is what mixed
    # precision means everywhere else in the model; both matmuls still accumulate in float32.
    x_BTD, wte_VD = residuals
    g_BTV = g_BTV.astype(x_BTD.dtype)
    dx_BTD = jnp.einsum("BTV,VD->BTD", g_BTV, wte_VD, preferred_element_type=jnp.float32).astype(x_BTD.dtype)
    dwte_VD = jnp.einsum("BTV,BTD->VD", g_BTV, x_BTD, preferred_element_type=jnp.float32).astype(wte_VD.dtype)
    return dx_BTD, dwte_VD


_head_16bit.defvjp(_head_16bit_fwd, _head_16bit_bwd)


def tied_head_losses(x_BTD: Array, wte: Array, targets_BT: Array, dtype: Any) -> Array:
    """Cross-entropy `[B, T]` (float32) of `targets_BT` under `tied_head`'s logits, without float32 logits.

    The logits are computed, saved for the backward pass and read in the compute dtype (as
    `float32_accumulating_dtype` maps it); the log-sum-exp and the loss are float32. In float32 this equals the plain
    loss on `tied_head`'s logits; in 16 bits the logits are rounded to 16 bits, as in PyTorch autocast and llm.c.
    """
    return _head_losses(x_BTD.astype(float32_accumulating_dtype(dtype)), wte, targets_BT)


def _real_columns(logits_BTV: Array, n_vocab: int) -> Array:
    """The logits with padded vocabulary columns at -inf, so that they never take part in the softmax."""
    if logits_BTV.shape[-1] == n_vocab:
        return logits_BTV
    return jnp.where(jnp.arange(logits_BTV.shape[-1]) < n_vocab, logits_BTV, -jnp.inf)


@jax.custom_vjp
def _head_losses(x_BTD: Array, wte: Array, targets_BT: Array) -> Array:
    return _head_losses_fwd(x_BTD, wte, targets_BT)[0]


def _head_losses_fwd(x_BTD: Array, wte: Array, targets_BT: Array) -> tuple[Array, tuple[Array, ...]]:
    # The matmul writes its float32 accumulator out in the compute dtype: this is the one [B, T, V] write forward.
    logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD, _head_weights(wte, x_BTD.dtype))
    lse_BT = jax.nn.logsumexp(_real_columns(logits_BTV.astype(jnp.float32), wte.shape[0]), axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0].astype(jnp.float32)
    # wte is the float32 param itself (no copy); its compute-dtype copy is cheaper to redo than to keep.
    return lse_BT - target_BT, (x_BTD, wte, logits_BTV, lse_BT, targets_BT)


def _head_losses_bwd(residuals: tuple[Array, ...], g_BT: Array) -> tuple[Array, Array, None]:
    x_BTD, wte, logits_BTV, lse_BT, targets_BT = residuals
    # d loss / d logits = (softmax - onehot) * g, in one elementwise pass written once in the compute dtype. The
    # padded columns are masked here too: exp(0 - lse) would overflow to inf when every real logit is very negative,
    # and inf times their zero wte rows is NaN.
    probs_BTV = jnp.exp(_real_columns(logits_BTV.astype(jnp.float32), wte.shape[0]) - lse_BT[..., None])
    onehot_BTV = jnp.arange(logits_BTV.shape[-1]) == targets_BT[..., None]
    d_BTV = ((probs_BTV - onehot_BTV) * g_BT[..., None]).astype(x_BTD.dtype)
    wte_VD = _head_weights(wte, x_BTD.dtype)
    dx_BTD = jnp.einsum("BTV,VD->BTD", d_BTV, wte_VD, preferred_element_type=jnp.float32).astype(x_BTD.dtype)
    # wte's gradient stays float32 (no 16-bit rounding before the embedding's share is added to it). Contracting as
    # x^T d leaves the transpose to the small x: XLA:CPU copies the [B, T, V] operand of d^T x to a transposed layout.
    dwte_DV = jnp.einsum("BTD,BTV->DV", x_BTD, d_BTV, preferred_element_type=jnp.float32)
    return dx_BTD, dwte_DV[:, : wte.shape[0]].T, None


_head_losses.defvjp(_head_losses_fwd, _head_losses_bwd)
