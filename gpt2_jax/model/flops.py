"""FLOPs per token and device peaks, for MFU.

Training FLOPs per token follow nanoGPT/PaLM: 6N + 12 * n_layer * n_head * head_dim * T, with N the parameter count
without `wpe` (the tied head is counted once, through `wte`). For GPT-2 124M at T=1024 that is about 855 MFLOP.
The peak comes from a table of known accelerators (dense bf16 / fp32 datasheet rates), never an A100 constant; on a
CPU there is no datasheet to trust, so the peak is a matmul measured in the same process, once, at start-up: the
median of several timings, which one busy moment cannot move. A run keeps that one figure, so its MFU changes only
when its rate does (re-measuring while other programs share the cores moved one demo's MFU from 83% to 40% at the
same tokens/s).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.model.params import count_params

# Dense (no sparsity) peak FLOP/s by device kind substring, per dtype; datasheet SXM figures.
KNOWN_PEAKS: dict[str, dict[str, float]] = {  # the first name found in the device kind wins: variants first
    "H200 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12},
    "RTX 4090": {"bfloat16": 165e12, "float16": 165e12, "float32": 82.6e12},
    "RTX 3090": {"bfloat16": 71e12, "float16": 71e12, "float32": 35.6e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12 / 4},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12 / 4},
    "TPU v6": {"bfloat16": 918e12, "float32": 918e12 / 4},
}


def flops_per_token(config: GPT2Config, seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token (forward + backward when training) at sequence length `seq_len`."""
    n = count_params(config) - config.n_ctx * config.n_embd
    attention = 12 * config.n_layer * config.n_head * config.head_dim * seq_len
    total = 6 * n + attention
    return float(total if training else total / 3)


def known_peak_flops(device: jax.Device, dtype: str) -> float | None:
    """Datasheet peak for a known accelerator, or None (CPUs and unknown devices)."""
    kind = getattr(device, "device_kind", "")
    for name, peaks in KNOWN_PEAKS.items():
        if name.lower() in kind.lower():
            return peaks.get(dtype)
    return None


MATMUL_N = 2048  # 17 GFLOP a matmul: ~0.1 s on a 2-core CPU, long enough to time, short enough to repeat
MATMUL_REPEATS = 7


def measure_matmul_flops(
    dtype: str = "float32", n: int = MATMUL_N, repeats: int = MATMUL_REPEATS, device: jax.Device | None = None
) -> float:
    """FLOP/s of a large square matmul on `device`, the median of `repeats` timings after a warm-up: the practical
    CPU peak."""
    device = device or jax.devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def peak_flops(device: jax.Device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): a datasheet figure for known accelerators, else a matmul measured now."""
    known = known_peak_flops(device, dtype)
    if known is not None:
        return known, f"datasheet ({device.device_kind})"
    shape = f"{MATMUL_N}x{MATMUL_N}"
    source = f"{dtype} {shape} matmul measured at start-up on {device.device_kind}, median of {MATMUL_REPEATS}"
    return measure_matmul_flops(dtype, device=device), source
