"""The only cached forward: GPT-2 laid out for decoding a few rows at a time, used by every sampler.

A decode step multiplies every weight by a handful of activation columns, so it is bound by reading the weights.
The training forward's layout (`transformer.py`: layers stacked for a scan, matrices stored [in, out] in float32)
costs a decode step dearly on XLA:CPU: the scan slices each layer's weights out of the stack (a copy before every
matmul), and the matmul kernels are much slower for [M, in] @ [in, out] with small M than for [out, in] @ [in, M].
Measured on the 2-core CPU (124M, float32, a greedy loop of 64 steps, the same tokens from both): a KV cache
inside the Flax module took 40.6 ms/step at batch 1 and 101 ms/step at batch 8; this forward takes 14.7 and 33.3
(2.8x and 3.0x faster), so it is the one kept. It runs on `DecodeWeights`: per-layer matrices stored [out, in] in
the compute dtype (also half the bytes in bfloat16), activations kept feature-major `[D, M]` (M = B * T columns),
and one KV cache array per layer, `[B*N, S, K]`: the attention reads it without a transpose, and with no size-1
axis at batch 1 XLA does not copy it every step. The math is `ops.py`'s, shared with the training forward;
tests/test_decoding.py compares this forward's logits with it and with Hugging Face's.

The cache (`init_cache`): slots written at a shared `index`, a per-row `valid` mask and real-token `length` (the next
position), so left-padded prompts decode exactly as unpadded ones. With `per_row`, each row has its own write index
instead (a server's rows join and leave at different times, so a row's slots are its positions). Slots fill from the
front, so a call that knows how far they will be filled attends over that many leading slots only (`window`, static: one
compilation per window size), not over the empty rest of the cache. A step with `write` False (a decode loop's masked
step) leaves the cache bit for bit as it was.
Axis legend: B batch, T new positions, M = B*T, S cache slots, W attended slots (the first W of S), D n_embd,
F MLP width (4D), N heads, H = B*N, K head dim, V vocabulary, I and O a linear layer's input and output features.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError
from gpt2_jax.model import ops
from gpt2_jax.model.params import LINEARS

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    wte: Array  # [V, D] float32, for the embedding lookup
    wpe: Array  # [n_ctx, D] float32
    ln_f: dict[str, Array]
    head_VD: Array  # the tied head in the dtype its matmul takes
    h: list[dict[str, Any]]  # per layer: ln_1, ln_2 {g, b}; attn/c_attn, attn/c_proj, mlp/c_fc, mlp/c_proj {w_OI, b}


def decode_weights(params: Any, config: GPT2Config) -> DecodeWeights:
    """`params` (`transformer.py`'s pytree) re-laid for `forward`: a list of layers, matrices [out, in] in the
    compute dtype.

    Layer norms stay float32; `wte` stays as it is for the embedding lookup, and the head gets its own copy in the
    compute dtype (the same array when that is float32). Run it once per model, not per call: it copies the weights.
    """
    dtype = jnp.dtype(config.dtype)
    h = params["h"]
    layers = []
    for i in range(config.n_layer):
        layer = {
            name: {"g": jnp.asarray(h[name]["g"][i]), "b": jnp.asarray(h[name]["b"][i])} for name in ("ln_1", "ln_2")
        }
        for block, name in LINEARS:
            w, b = h[block][name]["w"][i], h[block][name]["b"][i]
            layer[f"{block}/{name}"] = {"w_OI": jnp.asarray(w).T.astype(dtype), "b": jnp.asarray(b).astype(dtype)}
        layers.append(layer)
    wte = jnp.asarray(params["wte"])
    ln_f = {k: jnp.asarray(v) for k, v in params["ln_f"].items()}
    head_dtype = ops.float32_accumulating_dtype(dtype)
    return DecodeWeights(wte, jnp.asarray(params["wpe"]), ln_f, wte.astype(head_dtype), layers)


def init_cache(config: GPT2Config, batch: int, max_len: int, *, per_row: bool = False) -> dict[str, Any]:
    """An empty cache of `max_len` slots for `batch` rows, as `forward` takes it:

    k, v    per layer [B*N, S, K]  keys and values (row b*N + n: head n of batch row b), compute dtype
    valid   [B, S] bool            which slots hold a real token (padding and unwritten slots are False)
    index   []     int32           the next slot to write, shared by the batch (so prompts are left-padded)
            [B]    int32           with `per_row`: each row's own next slot (a server's rows join at any time)
    length  [B]    int32           real tokens seen per row: the position (wpe row) of the row's next token
    """
    if not 1 <= max_len <= config.n_ctx:
        raise UserError(
            f"A decoding cache of max_len={max_len} tokens does not fit the model's context; "
            f"choose 1 to n_ctx={config.n_ctx} (prompt plus new tokens)."
        )
    if batch < 1:
        raise UserError(f"A decoding cache needs a batch of at least 1 row, got {batch}.")
    kv_shape = (batch * config.n_head, max_len, config.head_dim)
    k, v = ([jnp.zeros(kv_shape, config.dtype) for _ in range(config.n_layer)] for _ in range(2))
    valid = jnp.zeros((batch, max_len), bool)
    index = jnp.zeros((batch,) if per_row else (), jnp.int32)
    return {"k": k, "v": v, "valid": valid, "index": index, "length": jnp.zeros((batch,), jnp.int32)}


def linear(x_IM: Array, p: dict[str, Array]) -> Array:
    return jnp.dot(p["w_OI"], x_IM) + p["b"][:, None]


def layer_norm(x_DM: Array, p: dict[str, Array], eps: float, dtype: Any) -> Array:
    return ops.layer_norm(x_DM, p["g"], p["b"], eps, dtype, axis=0)


def block(
    x_DM: Array,
    p: dict[str, Any],
    k_HSK: Array,
    v_HSK: Array,
    mask_HTW: Array,
    index: Array,
    write: Array | bool,
    config: GPT2Config,
) -> tuple[Array, Array, Array]:
    """One transformer block on feature-major activations: writes this chunk's keys/values at `index` (unless
    `write` is False), attends over the first W slots (W = `mask_HTW`'s width)."""
    dtype, eps = jnp.dtype(config.dtype), config.layer_norm_epsilon
    N, K = config.n_head, config.head_dim
    B, T, W = mask_HTW.shape[0] // N, mask_HTW.shape[1], mask_HTW.shape[2]
    qkv_3NKBT = linear(layer_norm(x_DM, p["ln_1"], eps, dtype), p["attn/c_attn"]).reshape(3, N, K, B, T)
    q_HTK, k_HTK, v_HTK = qkv_3NKBT.transpose(0, 3, 1, 4, 2).reshape(3, B * N, T, K)
    k_HSK, v_HSK = (_written(cache, new, index, write) for cache, new in ((k_HSK, k_HTK), (v_HSK, v_HTK)))
    a_BNTK = ops.attention(q_HTK, k_HSK[:, :W], v_HSK[:, :W], mask_HTW).astype(dtype).reshape(B, N, T, K)
    x_DM = x_DM + linear(a_BNTK.transpose(1, 3, 0, 2).reshape(N * K, B * T), p["attn/c_proj"])
    h_FM = ops.gelu(linear(layer_norm(x_DM, p["ln_2"], eps, dtype), p["mlp/c_fc"]))
    return x_DM + linear(h_FM, p["mlp/c_proj"]), k_HSK, v_HSK


def _written(cache_HSK: Array, new_HTK: Array, index: Array, write: Array | bool) -> Array:
    new_HTK = new_HTK.astype(cache_HSK.dtype)
    if index.ndim:  # per-row slots: one in-place write per attention problem (a scatter into the donated cache)
        index_H = jnp.repeat(index, cache_HSK.shape[0] // index.shape[0])
        write_one = lambda c_SK, n_TK, i: jax.lax.dynamic_update_slice(c_SK, n_TK, (i, 0))
        return jax.vmap(write_one)(cache_HSK, new_HTK, index_H)
    if write is not True:  # a masked step puts back what the slots held (the write index is clamped at the end)
        new_HTK = jnp.where(write, new_HTK, jax.lax.dynamic_slice(cache_HSK, (0, index, 0), new_HTK.shape))
    return jax.lax.dynamic_update_slice(cache_HSK, new_HTK, (0, index, 0))


def forward(
    weights: DecodeWeights,
    config: GPT2Config,
    tokens_BT: Array,
    mask_BT: Array,
    cache: dict[str, Any],
    *,
    window: int | None = None,
    write: Array | bool = True,
) -> tuple[Array, dict[str, Any]]:
    """Run `tokens_BT` (False in `mask_BT` on padding) through the model on top of `cache`.

    A prefill passes the (left-padded) prompts, a decode step one token per row (T = 1); jit it with `config`
    (and `window`) static and the cache donated. cache: `init_cache`'s dict; keeping `index + T <= max_len` is the
    caller's job (the index is traced, and a write past the end would be clamped). Returns float32 logits `[B, V]`
    for each row's last position (left padding puts every row's newest token there) and the updated cache.

    window: attend over the first `window` slots only (default all): the keys and values are still written at
    their slot, only the attention's reads shrink. It must cover every slot written so far and these tokens'
    (`index + T <= window`), which the caller knows and the traced index cannot check. write: False (traced) makes
    this a masked step, computed but leaving the cache exactly as it was, so a loop of static trip count can run
    steps past its end.
    """
    if cache["index"].ndim and write is not True:
        raise ValueError("a cache with per-row indices takes write=True only")
    dtype = jnp.dtype(config.dtype)
    B, T = tokens_BT.shape
    N, S = config.n_head, cache["valid"].shape[1]
    W = S if window is None else window
    ctx = ops.cache_context(mask_BT.astype(bool), cache["valid"], cache["index"], cache["length"])
    mask_HTW = jnp.broadcast_to(ctx["mask_BTS"][:, None, :, :W], (B, N, T, W)).reshape(B * N, T, W)
    x_BTD = jnp.take(weights.wte, tokens_BT, axis=0) + jnp.take(weights.wpe, ctx["positions_BT"], axis=0)
    x_DM = x_BTD.reshape(B * T, -1).T.astype(dtype)
    ks, vs = [], []
    for p, k_HSK, v_HSK in zip(weights.h, cache["k"], cache["v"]):
        x_DM, k_HSK, v_HSK = block(x_DM, p, k_HSK, v_HSK, mask_HTW, cache["index"], write, config)
        ks.append(k_HSK)
        vs.append(v_HSK)
    last_DB = x_DM.reshape(-1, B, T)[:, :, -1]
    last_DB = layer_norm(last_DB, weights.ln_f, config.layer_norm_epsilon, weights.head_VD.dtype)
    logits_VB = jnp.einsum("VD,DB->VB", weights.head_VD, last_DB, preferred_element_type=jnp.float32)
    logits_BV = jax.lax.optimization_barrier(logits_VB).T
    new = {"valid": ctx["valid_BS"], "index": cache["index"] + T, "length": ctx["length_B"]}
    if write is not True:
        new = {name: jnp.where(write, value, cache[name]) for name, value in new.items()}
    return logits_BV, {"k": ks, "v": vs, **new}
