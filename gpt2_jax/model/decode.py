"""GPT-2's forward pass laid out for decoding: the same model as `model.py`, arranged for a few rows at a time.

A decode step multiplies every weight by a handful of activation columns, so it is bound by reading the weights.
`model.py`'s layout (layers stacked for a scan, matrices stored [in, out] in float32) costs a decode step dearly
on XLA:CPU: the scan slices each layer's weights out of the stack (a copy before every matmul), and the matmul
kernels are much slower for [M, in] @ [in, out] with small M than for [out, in] @ [in, M]. So the sampler runs
this forward instead, on `DecodeWeights`: per-layer matrices stored [out, in] in the compute dtype (also half the
bytes in bfloat16), activations kept feature-major `[D, M]` (M = B * T columns), and one KV cache array per layer,
`[B*N, S, K]`: the attention reads it without a transpose, and with no size-1 axis at batch 1 XLA does not copy
it every step. Tests compare its greedy output with Hugging Face's; benchmarks/decode.py measures it.

Cache semantics are `decoding.py`'s: slots written at a shared `index`, a per-row `valid` mask and real-token
`length` (the next position), so left-padded rows decode exactly as unpadded ones.
Axis legend: B batch, T new positions, M = B*T, S cache slots, D n_embd, N heads, H = B*N, K head dim,
V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.model.transformer import float32_accumulating_dtype, gelu

Array = jax.Array
LINEARS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    wte: Array  # [V, D] float32, for the embedding lookup
    wpe: Array  # [n_ctx, D] float32
    ln_f: dict[str, Array]
    head_VD: Array  # the tied head in the dtype its matmul takes
    h: list[dict[str, Any]]  # per layer: ln_1, ln_2 {g, b}; attn/c_attn, attn/c_proj, mlp/c_fc, mlp/c_proj {w_OI, b}


def decode_weights(params: Any, config: GPT2Config) -> DecodeWeights:
    """`params` (model.py's pytree) re-laid for `forward`: a list of layers, matrices [out, in] in the compute dtype.

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
    head_dtype = float32_accumulating_dtype(dtype)
    return DecodeWeights(wte, jnp.asarray(params["wpe"]), ln_f, wte.astype(head_dtype), layers)


def init_kv(config: GPT2Config, batch: int, max_len: int) -> tuple[list[Array], list[Array]]:
    """Empty per-layer key and value caches `[B*N, S, K]` (row b*N + n: head n of batch row b), compute dtype."""
    shape = (batch * config.n_head, max_len, config.head_dim)
    zeros = lambda: [jnp.zeros(shape, config.dtype) for _ in range(config.n_layer)]
    return zeros(), zeros()


def layer_norm(x_DM: Array, p: dict[str, Array], eps: float, dtype: Any) -> Array:
    x = x_DM.astype(jnp.float32)
    mean = x.mean(0, keepdims=True)
    var = jnp.square(x - mean).mean(0, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + eps) * p["g"][:, None] + p["b"][:, None]).astype(dtype)


def linear(x_IM: Array, p: dict[str, Array]) -> Array:
    return jnp.dot(p["w_OI"], x_IM) + p["b"][:, None]


def attend(q_HTK: Array, k_HSK: Array, v_HSK: Array, mask_HTS: Array) -> Array:
    """Softmax attention over the cache's slots (H = B*N), logits and softmax in float32 as in model.py."""
    dtype = float32_accumulating_dtype(q_HTK.dtype)
    q_HTK, k_HSK, v_HSK = (a.astype(dtype) for a in (q_HTK, k_HSK, v_HSK))
    logits_HTS = jnp.einsum("HTK,HSK->HTS", q_HTK, k_HSK, preferred_element_type=jnp.float32)
    logits_HTS = jnp.where(mask_HTS, logits_HTS * q_HTK.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)
    probs_HTS = jax.nn.softmax(logits_HTS, axis=-1).astype(dtype)
    return jnp.einsum("HTS,HSK->HTK", probs_HTS, v_HSK)


def cache_context(mask_BT: Array, valid_BS: Array, index: Array, length_B: Array, n_head: int) -> dict[str, Array]:
    """The new tokens' positions, the attention mask over the slots, and the cache bookkeeping after the write."""
    T, S = mask_BT.shape[1], valid_BS.shape[1]
    valid_BS = jax.lax.dynamic_update_slice(valid_BS, mask_BT, (0, index))
    slot_S, query_slot_T = jnp.arange(S), index + jnp.arange(T)
    causal_TS = slot_S[None, :] <= query_slot_T[:, None]
    mask_B1TS = (causal_TS[None] & valid_BS[:, None, :])[:, None]
    # A padded query sees at least itself, so its (unused) softmax stays finite.
    mask_B1TS = mask_B1TS | (slot_S[None, :] == query_slot_T[:, None])[None, None]
    positions_BT = length_B[:, None] + jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
    B, _, T, S = mask_B1TS.shape
    return {
        "mask_HTS": jnp.broadcast_to(mask_B1TS, (B, n_head, T, S)).reshape(B * n_head, T, S),
        "positions_BT": positions_BT,
        "valid_BS": valid_BS,
        "length_B": length_B + mask_BT.sum(axis=1).astype(length_B.dtype),
    }


def block(
    x_DM: Array,
    p: dict[str, Any],
    k_HSK: Array,
    v_HSK: Array,
    ctx: dict[str, Array],
    index: Array,
    config: GPT2Config,
) -> tuple[Array, Array, Array]:
    """One transformer block on feature-major activations; writes this chunk's keys/values at `index`."""
    dtype, eps = jnp.dtype(config.dtype), config.layer_norm_epsilon
    B, T = ctx["positions_BT"].shape
    N, K = config.n_head, config.head_dim
    qkv_3NKBT = linear(layer_norm(x_DM, p["ln_1"], eps, dtype), p["attn/c_attn"]).reshape(3, N, K, B, T)
    q_HTK, k_HTK, v_HTK = qkv_3NKBT.transpose(0, 3, 1, 4, 2).reshape(3, B * N, T, K)
    k_HSK = jax.lax.dynamic_update_slice(k_HSK, k_HTK.astype(k_HSK.dtype), (0, index, 0))
    v_HSK = jax.lax.dynamic_update_slice(v_HSK, v_HTK.astype(v_HSK.dtype), (0, index, 0))
    a_BNTK = attend(q_HTK, k_HSK, v_HSK, ctx["mask_HTS"]).astype(dtype).reshape(B, N, T, K)
    x_DM = x_DM + linear(a_BNTK.transpose(1, 3, 0, 2).reshape(N * K, B * T), p["attn/c_proj"])
    h_FM = gelu(linear(layer_norm(x_DM, p["ln_2"], eps, dtype), p["mlp/c_fc"]))
    return x_DM + linear(h_FM, p["mlp/c_proj"]), k_HSK, v_HSK


def forward(
    weights: DecodeWeights,
    config: GPT2Config,
    tokens_BT: Array,
    mask_BT: Array,
    cache: dict[str, Any],
) -> tuple[Array, dict[str, Any]]:
    """Run `tokens_BT` (False in `mask_BT` on padding) through the model on top of `cache`.

    cache: {"k": [per layer], "v": [per layer], "valid": [B, S], "index": [], "length": [B]}. Returns float32
    logits `[B, V]` for each row's last position (left padding puts every row's newest token there) and the cache.
    """
    dtype = jnp.dtype(config.dtype)
    B, T = tokens_BT.shape
    ctx = cache_context(mask_BT.astype(bool), cache["valid"], cache["index"], cache["length"], config.n_head)
    x_BTD = jnp.take(weights.wte, tokens_BT, axis=0) + jnp.take(weights.wpe, ctx["positions_BT"], axis=0)
    x_DM = x_BTD.reshape(B * T, -1).T.astype(dtype)
    ks, vs = [], []
    for p, k_HSK, v_HSK in zip(weights.h, cache["k"], cache["v"]):
        x_DM, k_HSK, v_HSK = block(x_DM, p, k_HSK, v_HSK, ctx, cache["index"], config)
        ks.append(k_HSK)
        vs.append(v_HSK)
    last_DB = x_DM.reshape(-1, B, T)[:, :, -1]
    last_DB = layer_norm(last_DB, weights.ln_f, config.layer_norm_epsilon, weights.head_VD.dtype)
    logits_VB = jnp.einsum("VD,DB->VB", weights.head_VD, last_DB, preferred_element_type=jnp.float32)
    logits_BV = jax.lax.optimization_barrier(logits_VB).T
    new_cache = {"k": ks, "v": vs, "valid": ctx["valid_BS"], "index": cache["index"] + T, "length": ctx["length_B"]}
    return logits_BV, new_cache
