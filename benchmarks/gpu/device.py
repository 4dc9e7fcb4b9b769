"""The device part: the card and its ceilings, before any timing.

nvidia-smi's name, power limits, max clocks, memory, compute capability and driver (an SXM part and an NVL part of
the same chip differ in power, clocks and peak), the JAX environment, the dense bf16 peak MFU is counted over
(gpt2_jax/model/flops.py: the datasheet's for known cards), and the two ceilings measured here: an n^3 bf16 matmul
on random data and an in-place device copy of 2 GiB (bandwidth.py), which bound every rate that follows.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from benchmarks.bandwidth import measure_copy_bandwidth
from benchmarks.gpu.common import Sizes, nvidia_smi, record
from gpt2_jax.model.flops import peak_flops


def median_seconds(fn, *args, repeats: int = 10) -> float:
    """Median seconds of `fn(*args)` after a warm-up call (results blocked on)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def ceilings(n: int = 8192) -> dict[str, float]:
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    matmul_s = median_seconds(jax.jit(lambda x, y: x @ y), a, b)
    copy_bytes_per_s = measure_copy_bandwidth(n * n * 32)  # 2 GiB at n=8192, in place (see bandwidth.py)
    return {"bf16_matmul_tflops": 2 * n**3 / matmul_s / 1e12, "copy_gb_per_s": copy_bytes_per_s / 1e9}


def run(out: str, work: str, sizes: Sizes) -> None:
    peak, source = peak_flops(jax.devices()[0], sizes.dtype, measure_unknown=True)
    record(
        out, "device", environment=report.environment(), nvidia_smi=nvidia_smi(), peak_flops=peak,
        peak_source=source, matmul_n=sizes.matmul_n, **ceilings(sizes.matmul_n),
    )  # fmt: skip
