"""GPT-2 as a pure-functional Flax module: the forward pass for training and evaluation.

`GPT2(config).apply({'params': params}, tokens)` -> float32 logits `[B, T, n_vocab]`; with `method=GPT2.hidden`, the
final hidden state `[B, T, D]` instead, which the training loss takes through the fused head (`ops.tied_head_losses`,
no float32 logits). The params are a plain pytree with GPT-2's own names and OpenAI's shapes (conv1d weights without
their leading 1), the transformer blocks stacked on a leading `n_layer` axis under `h` and run with `nn.scan`, so
compile time does not grow with depth:

    wte [V, D]  wpe [n_ctx, D]  ln_f/{g,b} [D]
    h/ln_1/{g,b} [L, D]  h/attn/c_attn/{w [L, D, 3D], b [L, 3D]}  h/attn/c_proj/{w [L, D, D], b [L, D]}
    h/ln_2/{g,b} [L, D]  h/mlp/c_fc/{w [L, D, F], b [L, F]}      h/mlp/c_proj/{w [L, F, D], b [L, D]}

The training forward adds what `Tuning` asks for: LoRA adapters beside the adapted conv1d weights (lora.py:
`h/attn/c_attn/lora_A [L, D, r]`, `lora_B [L, r, 3D]`, ...) and GPT-2's embedding, attention and residual
dropout. Without a `Tuning` (evaluation, and every caller that passes plain GPT-2 params) the forward is GPT-2's.

Axis legend for shapes in names: B batch, T positions, D n_embd, F MLP width (4D), N heads, K head dim,
V vocabulary, L layers.

Precision: params are float32; matmuls run in `config.dtype`; layer norms, the attention softmax and the final
logits are float32 (the training loss keeps its logits in `config.dtype`, its log-sum-exp in float32; the math is
`ops.py`'s). Every row is a whole sequence from position 0: nothing pads the training forward. Decoding, with its KV
cache and left-padded prompts, is `decode.py`'s forward, the only cached one.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.model import ops
from gpt2_jax.model.lora import LoraConfig, init_a

Array = jax.Array


class LayerNorm(nn.Module):
    """GPT-2's layer norm with OpenAI's parameter names `g` and `b`, computed in float32."""

    epsilon: float
    dtype: Any

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        d = x_BTD.shape[-1]
        g = self.param("g", nn.initializers.ones, (d,), jnp.float32)
        b = self.param("b", nn.initializers.zeros, (d,), jnp.float32)
        return ops.layer_norm(x_BTD, g, b, self.epsilon, self.dtype)


class Conv1D(nn.Module):
    """OpenAI's `conv1d` (a dense layer, weight `w` stored [n_in, n_out]) with params cast to the compute dtype.

    With `lora`, the LoRA adapter `lora_A [n_in, r]`, `lora_B [r, n_out]` adds `scale * dropout(x) @ A @ B`
    (lora.py); the scale multiplies the rank-r intermediate, the cheapest place for it.
    """

    features: int
    dtype: Any
    init_std: float = 0.02
    lora: LoraConfig | None = None  # set only for an adapted layer
    train: bool = False  # the adapter's input dropout applies in training only

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in = x.shape[-1]
        w = self.param("w", nn.initializers.normal(self.init_std), (n_in, self.features), jnp.float32)
        b = self.param("b", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.dot(x, w.astype(self.dtype)) + b.astype(self.dtype)
        if self.lora is None:
            return y
        a = self.param("lora_A", init_a, (n_in, self.lora.rank), jnp.float32)
        b_lora = self.param("lora_B", nn.initializers.zeros, (self.lora.rank, self.features), jnp.float32)
        x_in = _dropout(self, x, self.lora.dropout if self.train else 0.0)
        h = jnp.dot(x_in, a.astype(self.dtype)) * jnp.asarray(self.lora.scale, self.dtype)
        return y + jnp.dot(h, b_lora.astype(self.dtype))


def _dropout(module: nn.Module, x: Array, rate: float) -> Array:
    """Inverted dropout with the module's next key of the 'dropout' stream; the identity (no op, no key) at rate 0.

    The mask covers the whole (global) batch: jax's partitionable threefry draws the same bits however the batch is
    sharded, so the masks do not depend on the device count."""
    if rate == 0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class Tuning(NamedTuple):
    """What the training forward adds to GPT-2: LoRA adapters (None: plain GPT-2) and dropout.

    `dropout` is GPT-2's embd_pdrop = attn_pdrop = resid_pdrop (0.1 each in GPT-2's training): after wte + wpe, on
    the attention probabilities, and on each block's attention and MLP outputs before they join the residual stream.
    The fused attention kernels (`jax.nn.dot_product_attention`'s, cuDNN's) have no dropout, so a step with dropout
    runs `ops.attention`, the portable path. `train` turns the dropouts on; evaluation and sampling leave it off, so
    they see the same model whatever the rates.
    """

    lora: LoraConfig | None = None
    dropout: float = 0.0
    train: bool = False

    @property
    def needs_rng(self) -> bool:
        """Whether a forward draws dropout masks (and so needs a 'dropout' key)."""
        return self.train and (self.dropout > 0 or (self.lora is not None and self.lora.dropout > 0))

    def adapter(self, block: str, layer: str) -> LoraConfig | None:
        return self.lora if self.lora is not None and self.lora.adapts(block, layer) else None

    @property
    def dropout_rate(self) -> float:
        return self.dropout if self.train else 0.0


class Attention(nn.Module):
    config: GPT2Config
    tuning: Tuning = Tuning()

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        B, T, D = x_BTD.shape
        N, K = cfg.n_head, cfg.head_dim
        t = self.tuning
        qkv = Conv1D(3 * D, dtype, lora=t.adapter("attn", "c_attn"), train=t.train, name="c_attn")(x_BTD)
        attn_dtype = ops.float32_accumulating_dtype(dtype)
        q_BTNK, k_BTNK, v_BTNK = (a.reshape(B, T, N, K).astype(attn_dtype) for a in jnp.split(qkv, 3, axis=-1))
        if t.dropout_rate:  # GPT-2's attn_pdrop on the probabilities: ops.attention, one problem per row and head
            q_HTK, k_HTK, v_HTK = (a.transpose(0, 2, 1, 3).reshape(B * N, T, K) for a in (q_BTNK, k_BTNK, v_BTNK))
            causal_1TT = jnp.tril(jnp.ones((T, T), bool))[None]
            out_HTK = ops.attention(q_HTK, k_HTK, v_HTK, causal_1TT, lambda p: _dropout(self, p, t.dropout_rate))
            out_BTNK = out_HTK.reshape(B, N, T, K).transpose(0, 2, 1, 3)
        else:
            out_BTNK = jax.nn.dot_product_attention(
                q_BTNK, k_BTNK, v_BTNK, is_causal=True, implementation=ops.attention_implementation(cfg)
            )
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5  # GPT-2's scaled init of residual projections
        c_proj = Conv1D(D, dtype, init_std=proj_std, lora=t.adapter("attn", "c_proj"), train=t.train, name="c_proj")
        return _dropout(self, c_proj(out_BTNK.reshape(B, T, D).astype(dtype)), t.dropout_rate)


class MLP(nn.Module):
    config: GPT2Config
    tuning: Tuning = Tuning()

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        cfg, t = self.config, self.tuning
        dtype = jnp.dtype(cfg.dtype)
        h_BTF = ops.gelu(
            Conv1D(4 * cfg.n_embd, dtype, lora=t.adapter("mlp", "c_fc"), train=t.train, name="c_fc")(x_BTD)
        )
        proj_std = 0.02 / (2 * cfg.n_layer) ** 0.5
        c_proj = Conv1D(
            cfg.n_embd, dtype, init_std=proj_std, lora=t.adapter("mlp", "c_proj"), train=t.train, name="c_proj"
        )
        return _dropout(self, c_proj(h_BTF), t.dropout_rate)


class Block(nn.Module):
    """One pre-norm transformer block, shaped as a scan body: carry -> (carry, no per-layer output)."""

    config: GPT2Config
    tuning: Tuning = Tuning()

    @nn.compact
    def __call__(self, x_BTD: Array) -> tuple[Array, None]:
        cfg, t = self.config, self.tuning
        dtype = jnp.dtype(cfg.dtype)
        x_BTD = x_BTD + Attention(cfg, t, name="attn")(LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_1")(x_BTD))
        x_BTD = x_BTD + MLP(cfg, t, name="mlp")(LayerNorm(cfg.layer_norm_epsilon, dtype, name="ln_2")(x_BTD))
        return x_BTD, None


class GPT2(nn.Module):
    """`apply(vars, tokens_BT)` gives the logits, `apply(vars, tokens_BT, method=GPT2.hidden)` what the head reads.

    With a `tuning` (the training forward), the params also hold its LoRA adapters, and when `tuning.needs_rng`,
    `apply` takes `rngs={'dropout': key}`: the scan folds the layer index into that key, so every layer's masks
    differ and a given key always draws the same ones.
    """

    config: GPT2Config
    tuning: Tuning = Tuning()

    def setup(self) -> None:
        cfg = self.config
        self.wte = self.param("wte", nn.initializers.normal(0.02), (cfg.n_vocab, cfg.n_embd), jnp.float32)
        self.wpe = self.param("wpe", nn.initializers.normal(0.01), (cfg.n_ctx, cfg.n_embd), jnp.float32)
        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        self.h = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=cfg.n_layer,
            unroll=cfg.scan_unroll,
        )(cfg, self.tuning)
        self.ln_f = LayerNorm(cfg.layer_norm_epsilon, jnp.dtype(cfg.dtype))

    def __call__(self, tokens_BT: Array) -> Array:
        """Logits `[B, T, n_vocab]` (float32) for `tokens_BT`, each row a sequence starting at position 0."""
        return ops.tied_head(self.hidden(tokens_BT), self.wte, jnp.dtype(self.config.dtype))

    def hidden(self, tokens_BT: Array) -> Array:
        """The final hidden state `[B, T, D]` (after `ln_f`, in the compute dtype) that the tied head multiplies.

        The training loss reads this rather than the logits: `ops.tied_head_losses` applies the head itself.
        """
        dtype = jnp.dtype(self.config.dtype)
        x_BTD = (jnp.take(self.wte, tokens_BT, axis=0) + self.wpe[: tokens_BT.shape[1]]).astype(dtype)
        x_BTD, _ = self.h(_dropout(self, x_BTD, self.tuning.dropout_rate))
        return self.ln_f(x_BTD)


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
