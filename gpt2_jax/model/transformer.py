"""GPT-2 as a pure-functional Flax module.

`GPT2(config).apply({'params': params}, tokens)` -> float32 logits `[B, T, n_vocab]`. The params are a plain pytree
with GPT-2's own names and OpenAI's shapes (conv1d weights without their leading 1), the transformer blocks stacked
on a leading `n_layer` axis under `h` and run with `nn.scan`, so compile time does not grow with depth:

    wte [V, D]  wpe [n_ctx, D]  ln_f/{g,b} [D]
    h/ln_1/{g,b} [L, D]  h/attn/c_attn/{w [L, D, 3D], b [L, 3D]}  h/attn/c_proj/{w [L, D, D], b [L, D]}
    h/ln_2/{g,b} [L, D]  h/mlp/c_fc/{w [L, D, 4D], b [L, 4D]}    h/mlp/c_proj/{w [L, 4D, D], b [L, D]}

Axis legend for shapes in names: B batch, T query positions, S key positions (cache slots), D n_embd,
N heads, K head dim, V vocabulary, L layers.

Precision: params are float32; matmuls run in `config.dtype`; layer norms, the attention softmax and the final
logits are float32. Decoding passes a `cache` (see `decoding.py`); the module then also returns the updated cache.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config

Array = jax.Array
Cache = dict[str, Array]


def gelu(x: Array) -> Array:
    """GPT-2's tanh-approximated GELU (Hugging Face's `gelu_new`)."""
    return jax.nn.gelu(x, approximate=True)


def attention_implementation(config: GPT2Config) -> str:
    """'cudnn' (fused flash attention) on GPU with a 16-bit compute dtype, else XLA's portable path."""
    if config.attention != "auto":
        return config.attention
    if jax.default_backend() == "gpu" and config.dtype in ("bfloat16", "float16"):
        return "cudnn"
    return "xla"


def float32_accumulating_dtype(dtype: Any) -> Any:
    """The dtype to feed a dot that accumulates in float32 (the attention logits, the head).

    XLA:CPU has no float16 x float16 -> float32 dot, so float16 compute (meant for GPUs) runs those in float32 on a
    CPU instead of failing; every other dtype and backend keeps the compute dtype.
    """
    if jnp.dtype(dtype) == jnp.float16 and jax.default_backend() == "cpu":
        return jnp.float32
    return dtype


HEAD_VOCAB_MULTIPLE = 128  # 16-bit heads pad the vocabulary rows to this, for aligned tensor-core tiles


def tied_head(x_BTD: Array, wte: Array, dtype: Any) -> Array:
    """Logits through the head tied to `wte`, accumulated and returned in float32 whatever the compute dtype.

    In 16-bit compute the vocabulary is padded with zero rows to a multiple of 128 and sliced off again (50257 is
    odd, and an odd leading dimension forces the GPU onto unaligned, slow matmul kernels), and the backward pass
    runs in the compute dtype (`_head_16bit`). Padded logits never leave this function.
    """
    dtype = float32_accumulating_dtype(dtype)
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum("BTD,VD->BTV", x_BTD.astype(dtype), wte.astype(dtype), preferred_element_type=jnp.float32)
    n_vocab = wte.shape[0]
    wte_VD = jnp.pad(wte.astype(dtype), ((0, -n_vocab % HEAD_VOCAB_MULTIPLE), (0, 0)))
    return _head_16bit(x_BTD.astype(dtype), wte_VD)[..., :n_vocab]


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


class LayerNorm(nn.Module):
    """GPT-2's layer norm with OpenAI's parameter names `g` and `b`, computed in float32."""

    epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        g = self.param("g", nn.initializers.ones, (d,), jnp.float32)
        b = self.param("b", nn.initializers.zeros, (d,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * g + b
        return y.astype(self.dtype)


class Conv1D(nn.Module):
    """OpenAI's `conv1d` (a dense layer, weight `w` stored [n_in, n_out]) with params cast to the compute dtype."""

    features: int
    dtype: Any
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("w", nn.initializers.normal(self.init_std), (x.shape[-1], self.features), jnp.float32)
        b = self.param("b", nn.initializers.zeros, (self.features,), jnp.float32)
        return jnp.dot(x, w.astype(self.dtype)) + b.astype(self.dtype)


class Attention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x_BTD: Array, ctx: dict[str, Array], layer_cache: Cache | None) -> tuple[Array, Cache | None]:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        B, T, D = x_BTD.shape
        N, K = cfg.n_head, cfg.head_dim
        qkv = Conv1D(3 * D, dtype, name="c_attn")(x_BTD)
        attn_dtype = float32_accumulating_dtype(dtype)
        q_BTNK, k_BTNK, v_BTNK = (a.reshape(B, T, N, K).astype(attn_dtype) for a in jnp.split(qkv, 3, axis=-1))

        if layer_cache is None and "key_mask_BS" not in ctx:
            out_BTNK = jax.nn.dot_product_attention(
                q_BTNK, k_BTNK, v_BTNK, is_causal=True, implementation=attention_implementation(cfg)
            )
        else:
            if layer_cache is not None:
                # Write this chunk's keys/values at the shared cache index, then attend over every slot; the
                # mask (validity of each slot + causality by slot index) hides padding and unwritten slots.
                index = ctx["cache_index"]
                cache_dtype = layer_cache["k"].dtype
                k_BSNK = jax.lax.dynamic_update_slice(layer_cache["k"], k_BTNK.astype(cache_dtype), (0, index, 0, 0))
                v_BSNK = jax.lax.dynamic_update_slice(layer_cache["v"], v_BTNK.astype(cache_dtype), (0, index, 0, 0))
                layer_cache = {"k": k_BSNK, "v": v_BSNK}
                k_BTNK, v_BTNK = k_BSNK.astype(attn_dtype), v_BSNK.astype(attn_dtype)
            out_BTNK = jax.nn.dot_product_attention(q_BTNK, k_BTNK, v_BTNK, mask=ctx["mask_B1TS"], implementation="xla")
        out_BTD = out_BTNK.reshape(B, T, D).astype(dtype)
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5  # GPT-2's scaled init of residual projections
        return Conv1D(D, dtype, init_std=proj_std, name="c_proj")(out_BTD), layer_cache


class MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h_BTF = gelu(Conv1D(4 * cfg.n_embd, dtype, name="c_fc")(x_BTD))
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5
        return Conv1D(cfg.n_embd, dtype, init_std=proj_std, name="c_proj")(h_BTF)


class Block(nn.Module):
    """One pre-norm transformer block; the signature is a scan body: (carry, per-layer input) -> (carry, output)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x_BTD: Array, layer_cache: Cache | None, ctx: dict[str, Array]) -> tuple[Array, Cache | None]:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h_BTD = LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_1")(x_BTD)
        a_BTD, layer_cache = Attention(cfg, name="attn")(h_BTD, ctx, layer_cache)
        x_BTD = x_BTD + a_BTD
        x_BTD = x_BTD + MLP(cfg, name="mlp")(LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_2")(x_BTD))
        return x_BTD, layer_cache


class GPT2(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(
        self,
        tokens_BT: Array,
        *,
        attention_mask_BT: Array | None = None,
        cache: Cache | None = None,
    ) -> Array | tuple[Array, Cache]:
        """Logits `[B, T, n_vocab]` (float32) for `tokens_BT`.

        attention_mask_BT: True for real tokens, False for padding (left or right). Padding is invisible to every
            real token and real tokens get positions counted without it, so outputs at real positions do not
            depend on the padding. Logits at padded positions are meaningless.
        cache: a decoding cache from `decoding.init_cache`; the tokens are written at `cache['index']`, attend to
            everything valid before them, and `(logits, updated_cache)` is returned.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        T = tokens_BT.shape[1]
        wte = self.param("wte", nn.initializers.normal(0.02), (cfg.n_vocab, cfg.n_embd), jnp.float32)
        wpe = self.param("wpe", nn.initializers.normal(0.01), (cfg.n_ctx, cfg.n_embd), jnp.float32)

        ctx, positions_BT = self._attention_context(tokens_BT, attention_mask_BT, cache)
        x_BTD = (jnp.take(wte, tokens_BT, axis=0) + jnp.take(wpe, positions_BT, axis=0)).astype(dtype)

        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=cfg.n_layer,
            unroll=cfg.scan_unroll,
        )(cfg, name="h")
        layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        x_BTD, layer_caches = layers(x_BTD, layer_caches, ctx)

        x_BTD = LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_f")(x_BTD)
        logits_BTV = tied_head(x_BTD, wte, dtype)
        if cache is None:
            return logits_BTV
        new_cache = dict(cache, k=layer_caches["k"], v=layer_caches["v"], valid=ctx["valid_BS"])
        new_cache["index"] = cache["index"] + T
        new_cache["length"] = ctx["length_B"]
        return logits_BTV, new_cache

    def _attention_context(
        self, tokens_BT: Array, attention_mask_BT: Array | None, cache: Cache | None
    ) -> tuple[dict[str, Array], Array]:
        """Positions of the new tokens and the attention mask, shared by every layer."""
        B, T = tokens_BT.shape
        real_BT = jnp.ones((B, T), bool) if attention_mask_BT is None else attention_mask_BT.astype(bool)
        if cache is None:
            if attention_mask_BT is None:
                return {}, jnp.broadcast_to(jnp.arange(T), (B, T))
            causal_TT = jnp.tril(jnp.ones((T, T), bool))
            mask_B1TS = causal_TT[None, None] & real_BT[:, None, None, :]
            # A fully padded query row would softmax over nothing; let it see itself so it stays finite.
            mask_B1TS = mask_B1TS | jnp.eye(T, dtype=bool)[None, None]
            positions_BT = jnp.maximum(jnp.cumsum(real_BT, axis=1) - 1, 0)
            return {"key_mask_BS": real_BT, "mask_B1TS": mask_B1TS}, positions_BT

        index = cache["index"]
        S = cache["valid"].shape[1]
        valid_BS = jax.lax.dynamic_update_slice(cache["valid"], real_BT, (0, index))
        slot_S = jnp.arange(S)
        query_slot_T = index + jnp.arange(T)
        causal_TS = slot_S[None, :] <= query_slot_T[:, None]
        mask_B1TS = (causal_TS[None] & valid_BS[:, None, :])[:, None]
        mask_B1TS = mask_B1TS | (slot_S[None, :] == query_slot_T[:, None])[None, None]
        positions_BT = cache["length"][:, None] + jnp.maximum(jnp.cumsum(real_BT, axis=1) - 1, 0)
        length_B = cache["length"] + real_BT.sum(axis=1).astype(cache["length"].dtype)
        ctx = {"cache_index": index, "mask_B1TS": mask_B1TS, "valid_BS": valid_BS, "length_B": length_B}
        return ctx, positions_BT


def init_params(config: GPT2Config, rng: Array | int = 0) -> dict[str, Any]:
    """Random GPT-2 params (GPT-2's initialisation) without running a forward pass over real data."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    # Only the architecture shapes the init: one compiled init per architecture, whatever the compute options.
    return _jitted_init(config.replace(dtype="float32", attention="xla", remat=False, scan_unroll=1), rng)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_init(config: GPT2Config, rng: Array) -> dict[str, Any]:
    return GPT2(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_params(config: GPT2Config) -> dict[str, Any]:
    """Shapes and dtypes of the params as `jax.ShapeDtypeStruct`s, with no allocation."""
    return jax.eval_shape(lambda: GPT2(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
