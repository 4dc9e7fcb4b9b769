"""Decoding hooks: a fixed-shape KV cache, a prefill over a (padded) prompt, and a one-token step.

All three are pure functions of arrays (jit them with the config static, donate the cache). The cache is a dict:

    k, v    [L, B, S, N, K]  keys/values of every layer, S = max_len slots, in the compute dtype
    valid   [B, S] bool      which slots hold a real token (padding and unwritten slots are False)
    index   []     int32     next slot to write; shared by the batch, so prompts are padded to one length
    length  [B]    int32     real tokens seen per row: the position (wpe row) of the row's next token

Left-padded prompts therefore decode exactly as unpadded ones: pads are never attended to and never counted
as positions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError
from gpt2_jax.model.transformer import GPT2, Cache

Array = jax.Array


def init_cache(config: GPT2Config, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty cache of `max_len` slots for `batch` rows (dtype defaults to the compute dtype)."""
    if not 1 <= max_len <= config.n_ctx:
        raise UserError(
            f"A decoding cache of max_len={max_len} tokens does not fit the model's context; "
            f"choose 1 to n_ctx={config.n_ctx} (prompt plus new tokens)."
        )
    if batch < 1:
        raise UserError(f"A decoding cache needs a batch of at least 1 row, got {batch}.")
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.n_layer, batch, max_len, config.n_head, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "valid": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
        "length": jnp.zeros((batch,), jnp.int32),
    }


def prefill(
    params: Any, config: GPT2Config, tokens_BT: Array, cache: Cache, attention_mask_BT: Array | None = None
) -> tuple[Array, Cache]:
    """Run the prompt (`attention_mask_BT` False on padding) through the model, filling the cache.

    Returns logits `[B, T, V]` for every prompt position and the updated cache. The prompt is written from the
    cache's index on: one longer than the whole cache is refused here; beyond that, keeping index + T <= max_len
    is the caller's job (the index is a traced value under jit, and writes past the end would be clamped).
    """
    if tokens_BT.shape[1] > cache["valid"].shape[1]:
        raise UserError(
            f"A prompt of {tokens_BT.shape[1]} tokens does not fit a decoding cache of "
            f"{cache['valid'].shape[1]} slots; make the cache longer or the prompt shorter."
        )
    return GPT2(config).apply({"params": params}, tokens_BT, attention_mask_BT=attention_mask_BT, cache=cache)


def decode_step(params: Any, config: GPT2Config, token_B: Array, cache: Cache) -> tuple[Array, Cache]:
    """One new token per row: logits `[B, V]` for the next token and the updated cache."""
    logits_B1V, cache = GPT2(config).apply({"params": params}, token_B[:, None], cache=cache)
    return logits_B1V[:, 0], cache
