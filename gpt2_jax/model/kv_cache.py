"""The decoding cache of `decode.py`'s forward: its two layouts, how new keys and values are written, and how a
one-row prefill is put into a row of a server's cache.

The keys and values are kept in one of two layouts, chosen per backend (`one_buffer_default`):

- per layer (XLA:CPU): `k` and `v`, lists of one `[B*N, S, K]` array per layer. XLA:CPU's attention matmuls are
  library calls that take their operands whole, so a layer's keys must be an array of their own: sliced out of a
  larger buffer they are copied first, every layer, every step (on the 2-core CPU under load, jax 0.10.2, 12 layers
  of batch-8 attention over 192 slots: 16 ms with separate arrays, 130-144 ms sliced from one buffer). Each layer
  writes its new keys and values before its attention reads them: 2 writes per layer and step.
- one buffer (GPUs and TPUs): `kv`, `[L, 2, B*N, S, K]`, every layer's keys (0) and values (1). A GPU decode step
  of a small model is bound by how many kernels it launches (193 per step, ~2 us each, on an H200 in the 2026-11-30
  profile, 24 of them cache writes), so the step writes every layer's keys and values in one update instead of
  2 x L, and the attention takes the new tokens apart from the cache (`ops.cached_attention`). On a GPU a one-token
  attention matmul becomes a reduction, into which XLA fuses the slice of the buffer it reads (to be confirmed by
  the kernel count of a GPU run: a copy per layer would show as `copy` in `kernels_by_kind`).
  The one write has to wait for the layers' reads of the buffer it updates, or XLA copies the whole buffer to update
  it (optimization barriers do not order it: XLA removes them before it places copies). So the forward writes just
  before the last layer's attention, whose inputs include every earlier layer's reads, and the last layer reads its
  cached slots from the updated buffer (the slots it sees hold the same there).

Both hold `valid [B, S]` (slots holding a real token), `length [B]` (real tokens per row: the next position) and
`index`: `[]`, the next slot to write, shared by the batch (prompts are left-padded), or `[B]` with `per_row`, each
row's own next slot (a server's rows join and leave at any time, so a row's slots are its positions).
Axis legend: L layers, B batch, T new positions, S cache slots, N heads, H = B*N, K head dim, P prompt slots.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError

Array = jax.Array


def one_buffer_default(backend: str | None = None) -> bool:
    """Whether caches on `backend` (default JAX's) keep every layer's keys and values in one buffer: all but the CPU
    (see the module doc)."""
    return (backend or jax.default_backend()) != "cpu"


def init_cache(
    config: GPT2Config, batch: int, max_len: int, *, per_row: bool = False, one_buffer: bool | None = None
) -> dict[str, Any]:
    """An empty cache of `max_len` slots for `batch` rows, as `decode.forward` takes it (see the module doc);
    `one_buffer` picks the layout (default: `one_buffer_default()`)."""
    if not 1 <= max_len <= config.n_ctx:
        raise UserError(
            f"A decoding cache of max_len={max_len} tokens does not fit the model's context; "
            f"choose 1 to n_ctx={config.n_ctx} (prompt plus new tokens)."
        )
    if batch < 1:
        raise UserError(f"A decoding cache needs a batch of at least 1 row, got {batch}.")
    H, L = batch * config.n_head, config.n_layer
    if one_buffer_default() if one_buffer is None else one_buffer:
        kv = {"kv": jnp.zeros((L, 2, H, max_len, config.head_dim), config.dtype)}
    else:
        kv = {name: [jnp.zeros((H, max_len, config.head_dim), config.dtype) for _ in range(L)] for name in "kv"}
    index = jnp.zeros((batch,) if per_row else (), jnp.int32)
    return {**kv, "valid": jnp.zeros((batch, max_len), bool), "index": index, "length": jnp.zeros((batch,), jnp.int32)}


def write(cache_HS: Array, new_HT: Array, index: Array, write: Array | bool) -> Array:
    """`new_HT` written into `cache_HS` at slot `index` along the slot axis, which follows the attention problems'
    axis H (the last two are [S, K]): one layer's `[H, S, K]` keys or values, or the one buffer `[L, 2, H, S, K]`.

    index `[B]` (per row): each problem at its row's slot, one in-place scatter. write False (traced): a masked step
    puts back what the slots held (the index is clamped at the end of the cache), so the cache stays as it was.
    """
    new_HT = new_HT.astype(cache_HS.dtype)
    axis = cache_HS.ndim - 3  # of H; the slots follow it
    if index.ndim:
        index_H = jnp.repeat(index, cache_HS.shape[axis] // index.shape[0])
        at = lambda i: (0,) * axis + (i, 0)
        write_one = lambda c_S, n_T, i: jax.lax.dynamic_update_slice(c_S, n_T, at(i))
        return jax.vmap(write_one, in_axes=(axis, axis, 0), out_axes=axis)(cache_HS, new_HT, index_H)
    at = (0,) * (axis + 1) + (index, 0)
    if write is not True:
        new_HT = jnp.where(write, new_HT, jax.lax.dynamic_slice(cache_HS, at, new_HT.shape))
    return jax.lax.dynamic_update_slice(cache_HS, new_HT, at)


def put_prompt(cache: dict[str, Any], prompt: dict[str, Any], row: Array, shift: Array) -> dict[str, Any]:
    """The keys and values of `prompt` (a one-row cache of P slots, filled by a prefill) rolled `shift` slots to the
    left and written into row `row` of `cache` (same layout), slots 0 to P - 1; nothing else changes."""
    n_head = prompt["kv"].shape[2] if "kv" in prompt else prompt["k"][0].shape[0]

    def put(big_HS: Array, small_NP: Array) -> Array:
        axis = big_HS.ndim - 3
        at = (0,) * axis + (row * n_head, 0, 0)
        return jax.lax.dynamic_update_slice(big_HS, jnp.roll(small_NP, -shift, axis=axis + 1), at)

    if "kv" in cache:
        return {**cache, "kv": put(cache["kv"], prompt["kv"])}
    return {**cache, **{name: [put(c, p) for c, p in zip(cache[name], prompt[name])] for name in "kv"}}
