"""The only cached forward: GPT-2 laid out for decoding a few rows at a time, used by every sampler.

A decode step multiplies every weight by a handful of activation columns, so it is bound by reading the weights.
The training forward's layout (`transformer.py`: layers stacked for a scan, matrices stored [in, out] in float32)
costs a decode step dearly on XLA:CPU: the scan slices each layer's weights out of the stack (a copy before every
matmul), and the matmul kernels are much slower for [M, in] @ [in, out] with small M than for [out, in] @ [in, M].
Measured on the 2-core CPU (124M, float32, a greedy loop of 64 steps, the same tokens from both): a KV cache
inside the Flax module took 40.6 ms/step at batch 1 and 101 ms/step at batch 8; this forward takes 14.7 and 33.3
(2.8x and 3.0x faster), so it is the one kept. It runs on `DecodeWeights`: per-layer matrices stored [out, in] in
the compute dtype (also half the bytes in bfloat16), activations kept feature-major `[D, M]` (M = B * T columns).
The math is `ops.py`'s, shared with the training forward; tests/test_decoding.py compares this forward's logits with
it and with Hugging Face's.

The cache (`kv_cache.py`, `init_cache`): slots written at a shared `index`, a per-row `valid` mask and real-token
`length` (the next position), so left-padded prompts decode exactly as unpadded ones. With `per_row`, each row has
its own write index instead (a server's rows join and leave at different times, so a row's slots are its
positions). Its keys and values lie in one of two layouts: an array per layer and kind (the CPU's: each layer writes
its tokens, then attends over its cache), or one buffer for all (accelerators': the tokens are attended apart from
the cache, and one write per call stores every layer's). Slots fill from the front, so a call that knows how far they
will be filled attends over that many leading slots only (`window`, static: one compilation per window size), not
over the empty rest of the cache. A step with `write` False (a decode loop's masked step) leaves the cache bit for
bit as it was.

The layers run as XLA compiles them, or with `decode_weights(..., kernels="pallas")` in `fused_decode.py`'s Pallas
kernels (5 per layer) where those apply: a one-buffer cache and at most 8 new tokens per call; other calls (a long
prefill, the CPU's cache) run XLA's layers. The choice is a static field of the weights: XLA's path compiles to the
same program as before, and no backend picks Pallas by default until a GPU measured it faster.
Axis legend: B batch, T new positions, M = B*T, S cache slots, W attended slots (the first W of S), D n_embd,
F MLP width (4D), N heads, H = B*N, K head dim, V vocabulary, I and O a linear layer's input and output features,
L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.model import fused_decode, kv_cache, ops
from gpt2_jax.model.kv_cache import init_cache
from gpt2_jax.model.params import LINEARS

__all__ = ["DecodeWeights", "decode_weights", "forward", "init_cache"]  # init_cache: kv_cache's, for `forward`

Array = jax.Array
KERNELS = ("xla", "pallas")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    wte: Array  # [V, D] float32, for the embedding lookup
    wpe: Array  # [n_ctx, D] float32
    ln_f: dict[str, Array]
    head_VD: Array  # the tied head in the dtype its matmul takes
    h: list[dict[str, Any]]  # per layer: ln_1, ln_2 {g, b}; attn/c_attn, attn/c_proj, mlp/c_fc, mlp/c_proj {w_OI, b}
    # Static: "xla", or "pallas" for fused_decode.py's kernels where they apply (its doc says where and when to pick
    # it). jit keys on it, so either runs in one process and the XLA path's program stays as it was.
    kernels: str = dataclasses.field(default="xla", metadata={"static": True})


def decode_weights(params: Any, config: GPT2Config, *, kernels: str = "xla") -> DecodeWeights:
    """`params` (`transformer.py`'s pytree) re-laid for `forward`: a list of layers, matrices [out, in] in the
    compute dtype; `kernels` "pallas" runs the layers in `fused_decode.py`'s kernels where they apply.

    Layer norms stay float32; `wte` stays as it is for the embedding lookup, and the head gets its own copy in the
    compute dtype (the same array when that is float32). Run it once per model, not per call: it copies the weights.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}: choose one of {', '.join(KERNELS)}")
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
    return DecodeWeights(wte, jnp.asarray(params["wpe"]), ln_f, wte.astype(head_dtype), layers, kernels)


def linear(x_IM: Array, p: dict[str, Array]) -> Array:
    return jnp.dot(p["w_OI"], x_IM) + p["b"][:, None]


def layer_norm(x_DM: Array, p: dict[str, Array], eps: float, dtype: Any) -> Array:
    return ops.layer_norm(x_DM, p["g"], p["b"], eps, dtype, axis=0)


def attention_inputs(x_DM: Array, p: dict[str, Any], B: int, config: GPT2Config) -> tuple[Array, Array]:
    """A block's queries `[H, T, K]` and its new keys and values `[2, H, T, K]` (in the cache's dtype, the compute
    dtype: attended as they will be read back from the cache)."""
    dtype, N, K = jnp.dtype(config.dtype), config.n_head, config.head_dim
    h_IM = layer_norm(x_DM, p["ln_1"], config.layer_norm_epsilon, dtype)
    qkv_3NKBT = linear(h_IM, p["attn/c_attn"]).reshape(3, N, K, B, -1)
    qkv_3HTK = qkv_3NKBT.transpose(0, 3, 1, 4, 2).reshape(3, B * N, -1, K)
    return qkv_3HTK[0], qkv_3HTK[1:].astype(dtype)


def block_output(x_DM: Array, a_HTK: Array, p: dict[str, Any], config: GPT2Config) -> Array:
    """The rest of a block after its attention `a_HTK`: the projection, the residual and the MLP."""
    dtype, N, K = jnp.dtype(config.dtype), config.n_head, config.head_dim
    a_NKBT = a_HTK.astype(dtype).reshape(-1, N, a_HTK.shape[1], K).transpose(1, 3, 0, 2)
    x_DM = x_DM + linear(a_NKBT.reshape(N * K, -1), p["attn/c_proj"])
    h_FM = ops.gelu(linear(layer_norm(x_DM, p["ln_2"], config.layer_norm_epsilon, dtype), p["mlp/c_fc"]))
    return x_DM + linear(h_FM, p["mlp/c_proj"])


def layers_per_layer_cache(
    weights: DecodeWeights, x_DM: Array, cache: dict[str, Any], ctx: dict[str, Array], W: int, write: Array | bool,
    config: GPT2Config,
) -> tuple[Array, dict[str, Any]]:  # fmt: skip
    """Every block over a cache of one array per layer and kind: each writes its keys and values at the index, then
    attends over the first W slots (which cover them); with W 0 (a fresh cache) over the new tokens alone."""
    B, N = ctx["new_mask_BTT"].shape[0], config.n_head
    mask_HTW = jnp.repeat(ctx["mask_BTS"][:, :, :W], N, axis=0)
    new_mask_HTT = jnp.repeat(ctx["new_mask_BTT"], N, axis=0)
    ks, vs = [], []
    for p, k_HSK, v_HSK in zip(weights.h, cache["k"], cache["v"]):
        q_HTK, (k_HTK, v_HTK) = attention_inputs(x_DM, p, B, config)
        k_HSK, v_HSK = (kv_cache.write(c, new, cache["index"], write) for c, new in ((k_HSK, k_HTK), (v_HSK, v_HTK)))
        if W:
            a_HTK = ops.attention(q_HTK, k_HSK[:, :W], v_HSK[:, :W], mask_HTW)
        else:
            a_HTK = ops.attention(q_HTK, k_HTK, v_HTK, new_mask_HTT)
        x_DM = block_output(x_DM, a_HTK, p, config)
        ks.append(k_HSK)
        vs.append(v_HSK)
    return x_DM, {"k": ks, "v": vs}


def layers_one_buffer_cache(
    weights: DecodeWeights, x_DM: Array, cache: dict[str, Any], ctx: dict[str, Array], W: int, write: Array | bool,
    config: GPT2Config,
) -> tuple[Array, dict[str, Any]]:  # fmt: skip
    """Every block over a cache of one buffer: each attends over its first W cached slots and the new tokens apart,
    and one write stores every layer's keys and values, just before the last layer's attention (`kv_cache.py` says
    why there); with W 0 (a fresh cache) the blocks read no cache and the write follows them."""
    B, N, L = ctx["new_mask_BTT"].shape[0], config.n_head, config.n_layer
    cache_mask_HW = jnp.repeat(ctx["cache_mask_BS"][:, :W], N, axis=0)
    new_mask_HTT = jnp.repeat(ctx["new_mask_BTT"], N, axis=0)
    kv_L2HSK, new = cache["kv"], []
    for layer, p in enumerate(weights.h):
        q_HTK, kv_2HTK = attention_inputs(x_DM, p, B, config)
        new.append(kv_2HTK)
        if W and layer == L - 1:
            kv_L2HSK = kv_cache.write(kv_L2HSK, jnp.stack(new), cache["index"], write)
        cached_2HWK = kv_L2HSK[layer, :, :, :W] if W else None
        a_HTK = ops.cached_attention(q_HTK, *kv_2HTK, new_mask_HTT, cached_2HWK, cache_mask_HW)
        x_DM = block_output(x_DM, a_HTK, p, config)
    if not W:
        kv_L2HSK = kv_cache.write(kv_L2HSK, jnp.stack(new), cache["index"], write)
    return x_DM, {"kv": kv_L2HSK}


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

    window: attend over the first `window` cache slots only (default all; 0 for none: a fresh cache's prefill),
    only the attention's reads shrink. It must cover every slot written so far and these tokens' (`index + T <=
    window`; 0 only with index 0), which the caller knows and the traced index cannot check. write: False (traced)
    makes this a masked step, computed but leaving the cache exactly as it was, so a loop of static trip count can run
    steps past its end.
    """
    if cache["index"].ndim and write is not True:
        raise ValueError("a cache with per-row indices takes write=True only")
    dtype = jnp.dtype(config.dtype)
    B, T = tokens_BT.shape
    W = cache["valid"].shape[1] if window is None else window
    ctx = ops.cache_context(mask_BT.astype(bool), cache["valid"], cache["index"], cache["length"])
    x_BTD = jnp.take(weights.wte, tokens_BT, axis=0) + jnp.take(weights.wpe, ctx["positions_BT"], axis=0)
    x_DM = x_BTD.reshape(B * T, -1).T.astype(dtype)
    if weights.kernels == "pallas" and fused_decode.applies(cache, B * T):
        layers = fused_decode.layers
    else:
        layers = layers_one_buffer_cache if "kv" in cache else layers_per_layer_cache
    x_DM, kv = layers(weights, x_DM, cache, ctx, W, write, config)
    last_DB = x_DM.reshape(-1, B, T)[:, :, -1]
    last_DB = layer_norm(last_DB, weights.ln_f, config.layer_norm_epsilon, weights.head_VD.dtype)
    logits_VB = jnp.einsum("VD,DB->VB", weights.head_VD, last_DB, preferred_element_type=jnp.float32)
    logits_BV = jax.lax.optimization_barrier(logits_VB).T
    new = {"valid": ctx["valid_BS"], "index": cache["index"] + T, "length": ctx["length_B"]}
    if write is not True:
        new = {name: jnp.where(write, value, cache[name]) for name, value in new.items()}
    return logits_BV, {**kv, **new}
