"""Memory ceilings for the benchmarks: measured copy bandwidth, the bytes a decode step must read, memory in use.

Batch-1 decoding reads every weight once per token, and a large batch also reads its whole KV cache once per token,
so the fastest a decode step can possibly run is

    (weight bytes + KV cache bytes) / bandwidth

with the weights counted in the compute dtype (what the matmuls need; `wpe` left out, only one row of it is read)
and the KV cache counted over the valid context only (the slots a step has to attend to, not the padded cache).
`bandwidth` is a copy measured in the same run: a large array read and written in place by a jitted kernel, bytes
moved = 2 x its size. The decode point's `bandwidth_fraction` is that bound over the measured time per step (1.0
would be at the physical limit).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.config import GPT2Config
from gpt2_jax.model.params import count_params


def measure_copy_bandwidth(nbytes: int | None = None, repeats: int = 5, device: jax.Device | None = None) -> float:
    """Bytes/s moved (read + write) by a jitted elementwise copy of an `nbytes` float32 array, best of `repeats`."""
    device = device or jax.devices()[0]
    if nbytes is None:  # well past every cache; a GPU needs more to hide launch latency
        nbytes = 2 << 30 if device.platform == "gpu" else 256 << 20
    x = jax.device_put(jnp.ones((max(nbytes // 4 // 1024, 1), 1024), jnp.float32), device)
    size = x.nbytes
    # In place (donated): a fresh output buffer each call would time the OS faulting in new pages, not the memory.
    # `+ 1.0` reads and writes every element; there is nothing for XLA to fold away.
    copy = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    x = copy(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x = copy(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def weight_bytes(config: GPT2Config, dtype: str) -> int:
    """Bytes of the weights one decode step reads, in the compute dtype (the tied head counted once, no `wpe`)."""
    return (count_params(config) - config.n_ctx * config.n_embd) * np.dtype(jnp.dtype(dtype)).itemsize


def kv_cache_bytes(config: GPT2Config, batch: int, context: float, dtype: str) -> float:
    """Bytes of keys and values over `context` positions for `batch` rows, every layer."""
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    return 2 * config.n_layer * batch * context * config.n_embd * itemsize


def decode_bound(
    config: GPT2Config,
    *,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    dtype: str,
    seconds_per_step: float,
    bandwidth: float,
) -> dict[str, float]:
    """How close a decode loop came to the memory-bandwidth bound (see the module doc)."""
    mean_context = prompt_len + new_tokens / 2  # the context grows by one token per step
    step_bytes = weight_bytes(config, dtype) + kv_cache_bytes(config, batch, mean_context, dtype)
    bound_s = step_bytes / bandwidth
    return {
        "bytes_per_step": float(step_bytes),
        "bound_ms_per_step": 1e3 * bound_s,
        "bandwidth_fraction": bound_s / seconds_per_step,
    }


def memory_in_use(device: jax.Device | None = None) -> dict[str, int | None]:
    """Device bytes in use now and the peak since the process started, where the backend reports them (not CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    return {"memory_bytes_in_use": stats.get("bytes_in_use"), "memory_peak_bytes": stats.get("peak_bytes_in_use")}
