"""FLOPs per token and device peaks, for MFU.

Training FLOPs per token follow nanoGPT/PaLM: 6N + 12 * n_layer * n_head * head_dim * T, with N the parameter count
without `wpe` (the tied head is counted once, through `wte`). For GPT-2 124M at T=1024 that is about 855 MFLOP.

The peak comes from a table of known accelerators, never an A100 constant: the dense (no sparsity) datasheet rate of
one JAX device for each compute dtype, its source beside it. What each dtype's figure is:

    bfloat16, float16  the tensor-core (or TPU matrix-unit) rate; on GeForce cards the one with float32 accumulation,
                       which XLA asks for. V100 and T4 have no bfloat16 tensor cores: XLA computes bfloat16 there in
                       float32, so their bfloat16 figure is the plain FP32 rate
    float32            what JAX's default matmul precision runs float32 matmuls on: TF32 tensor cores on NVIDIA GPUs
                       from compute capability 8.0, plain FP32 before them, one bfloat16 pass on TPUs (JAX's
                       "Matmul precision" page: docs.jax.dev/en/latest/201/precision.html)

TPUs have no float16 matrix path, so they have no float16 figure. A TPU v2 or v3 chip holds two TensorCores and JAX
makes each a device, so their figures are half a chip's; v4 and v5p join a chip's two cores into one device, and v5e
and v6e have one core per chip. An accelerator the table does not know, or a dtype it has no figure for, gets no peak
and its log says "MFU unavailable", naming the device: a guess would be a number that looks measured and is not.

On a CPU there is no datasheet to trust, so the peak is a matmul measured in the same process, once, at start-up: the
median of several timings, which one busy moment cannot move. A run keeps that one figure, so its MFU changes only
when its rate does (re-measuring while other programs share the cores moved one demo's MFU from 83% to 40% at the
same tokens/s).
"""

from __future__ import annotations

import re
import statistics
import time

import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.model.params import count_params

T = 1e12
# (pattern searched in the lower-case device kind, per-device peak FLOP/s by compute dtype). The first pattern that
# matches wins, so variants come before the bare name; \b keeps "a10" from matching "a100" and "l4" "l40s".
KNOWN_PEAKS: list[tuple[str, dict[str, float]]] = [
    # NVIDIA H100 / H200 datasheets: BF16/FP16 and TF32 tensor figures are printed with sparsity; halved here
    # (BF16 1,979 -> 989 as the benchmarks have always divided by).
    (r"\bh200 nvl\b", {"bfloat16": 835 * T, "float16": 835 * T, "float32": 417.5 * T}),  # H200 NVL
    (r"\bh200\b", {"bfloat16": 989 * T, "float16": 989 * T, "float32": 494.5 * T}),  # H200 SXM
    (r"\bh100 nvl\b", {"bfloat16": 835 * T, "float16": 835 * T, "float32": 417.5 * T}),  # H100 NVL
    (r"\bh100 pcie\b", {"bfloat16": 756 * T, "float16": 756 * T, "float32": 378 * T}),  # H100 PCIe
    (r"\bh100\b", {"bfloat16": 989 * T, "float16": 989 * T, "float32": 494.5 * T}),  # H100 SXM ("80GB HBM3")
    # NVIDIA A100 datasheet, the same for 40 and 80 GB, SXM4 and PCIe: BF16/FP16 312, TF32 156 (dense).
    (r"\ba100\b", {"bfloat16": 312 * T, "float16": 312 * T, "float32": 156 * T}),
    # NVIDIA publishes no A10G datasheet. AWS's A10G is a GA102 with 80 SMs whose tensor cores run at GeForce rates:
    # 70 TFLOP/s BF16/FP16 with FP32 accumulation, 35 TF32 (AWS G5 figures, as Baseten's "A10 vs A10G" lists them).
    (r"\ba10g\b", {"bfloat16": 70 * T, "float16": 70 * T, "float32": 35 * T}),
    (r"\ba10\b", {"bfloat16": 125 * T, "float16": 125 * T, "float32": 62.5 * T}),  # A10 datasheet
    (r"\bl40s\b", {"bfloat16": 362 * T, "float16": 362 * T, "float32": 183 * T}),  # L40S datasheet
    (r"\bl4\b", {"bfloat16": 121 * T, "float16": 121 * T, "float32": 60 * T}),  # L4 datasheet
    # GeForce: NVIDIA's Ada (RTX 4090) and Ampere GA102 (RTX 3090) whitepapers, FP16 with FP32 accumulation.
    (r"\brtx 4090\b(?! d)", {"bfloat16": 165.2 * T, "float16": 165.2 * T, "float32": 82.6 * T}),
    (r"\brtx 3090\b(?! ti)", {"bfloat16": 71 * T, "float16": 71 * T, "float32": 35.6 * T}),
    # NVIDIA V100 datasheet (tensor FP16; FP32). No bfloat16 tensor cores: bfloat16 runs at the FP32 rate.
    (r"\bv100s\b", {"bfloat16": 16.4 * T, "float16": 130 * T, "float32": 16.4 * T}),  # V100S PCIe
    (r"\bv100\b.*\bpcie\b", {"bfloat16": 14 * T, "float16": 112 * T, "float32": 14 * T}),  # V100 PCIe
    (r"\bv100\b", {"bfloat16": 15.7 * T, "float16": 125 * T, "float32": 15.7 * T}),  # V100 SXM2 (and DGX)
    # NVIDIA T4 datasheet: 65 TFLOP/s mixed precision (FP16 tensor, FP32 accumulation), 8.1 FP32; no bfloat16 units.
    (r"\bt4\b", {"bfloat16": 8.1 * T, "float16": 65 * T, "float32": 8.1 * T}),
    # Google Cloud TPU system architecture pages, bf16 per chip: v2 45, v3 123 (two devices per chip: halved here),
    # v4 275, v5e 197, v5p 459, v6e 918. float32: JAX's default precision, one bfloat16 pass.
    (r"\btpu v2\b", {"bfloat16": 22.5 * T, "float32": 22.5 * T}),
    (r"\btpu v3\b", {"bfloat16": 61.5 * T, "float32": 61.5 * T}),
    (r"\btpu v4\b(?! lite)", {"bfloat16": 275 * T, "float32": 275 * T}),
    (r"\btpu v5 ?(lite|e)\b", {"bfloat16": 197 * T, "float32": 197 * T}),  # "TPU v5 lite"
    (r"\btpu v5p?\b", {"bfloat16": 459 * T, "float32": 459 * T}),  # "TPU v5" is v5p
    (r"\btpu v6 ?(lite|e)?\b", {"bfloat16": 918 * T, "float32": 918 * T}),  # "TPU v6 lite" is v6e
]


def flops_per_token(config: GPT2Config, seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token (forward + backward when training) at sequence length `seq_len`."""
    n = count_params(config) - config.n_ctx * config.n_embd
    attention = 12 * config.n_layer * config.n_head * config.head_dim * seq_len
    total = 6 * n + attention
    return float(total if training else total / 3)


def known_peak_flops(device_kind: str, dtype: str) -> float | None:
    """One device's datasheet peak in `dtype`, or None: an unknown accelerator, or no figure for that dtype."""
    kind = device_kind.lower()
    for pattern, peaks in KNOWN_PEAKS:
        if re.search(pattern, kind):
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


def peak_flops(device: jax.Device, dtype: str, *, measure_unknown: bool = False) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where it came from): a datasheet figure for a known accelerator, a matmul measured
    now on a CPU, and for any other accelerator None with "MFU unavailable" and the device named, or with
    `measure_unknown` (the benchmarks, which report how close they come to what the device attains) a measured one."""
    known = known_peak_flops(device.device_kind, dtype)
    if known is not None:
        return known, f"datasheet ({device.device_kind})"
    if device.platform != "cpu" and not measure_unknown:
        return None, f"MFU unavailable: no datasheet peak for {device.device_kind} in {dtype}"
    shape = f"{MATMUL_N}x{MATMUL_N}"
    source = f"{dtype} {shape} matmul measured at start-up on {device.device_kind}, median of {MATMUL_REPEATS}"
    return measure_matmul_flops(dtype, device=device), source
