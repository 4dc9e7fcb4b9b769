"""The compute dtype a device gets when none is asked for, and why: one rule for train, sample, serve and evaluate.

    TPU (every generation's matrix units take bfloat16)                       bfloat16
    NVIDIA GPU of compute capability 8.0 or newer (A100, A10G, L4, RTX 30xx)  bfloat16
    NVIDIA GPU of compute capability 7.x (V100 sm70, T4 sm75)                 float16, with dynamic loss scaling in
                                                                              training (training/loss_scale.py)
    NVIDIA GPU older than 7.0 (P100, GTX 10xx)                                float32: no tensor cores at all
    any other GPU (AMD ROCm: MI100 and later have bfloat16 matrix cores)      bfloat16
    CPU                                                                       float32: 16-bit matmuls are slower

Params and AdamW state stay float32 whatever the choice. V100 and T4 have tensor cores for float16 only: XLA runs
bfloat16 there without them (converted to float32), so `--dtype bfloat16` on them is slow, which `dtype_note` says.
`choose_compute_dtype` is a pure function of what `jax.Device` tells (platform, device_kind, and on CUDA
compute_capability, a string such as "7.5"), tested with stand-ins; this module imports no JAX until asked about a
real device, so the commands can name the rule in `--help` before JAX loads.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from gpt2_jax.console import note

DEFAULT_DTYPE_HELP = (
    "bfloat16 on TPUs and on NVIDIA GPUs of compute capability 8.0 or newer, float16 on older ones (T4, V100), "
    "float32 on CPUs"
)
NATIVE_BFLOAT16_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA tensor cores with bfloat16
TENSOR_CORE_CAPABILITY = (7, 0)  # Volta: the first with (float16) tensor cores


class DtypeChoice(NamedTuple):
    dtype: str
    reason: str  # for the start-up line: "<dtype> compute (<reason>)"


def compute_capability(value: Any) -> tuple[int, int] | None:
    """(major, minor) of a CUDA compute capability such as "7.5"; None for anything else (ROCm's gfx names)."""
    match = re.fullmatch(r"(\d+)\.(\d+)", str(value or "").strip())
    return (int(match[1]), int(match[2])) if match else None


def choose_compute_dtype(platform: str, device_kind: str, capability: Any = None) -> DtypeChoice:
    """The default compute dtype for a device described by its platform ("cpu", "gpu"/"cuda"/"rocm", "tpu"), its
    kind ("Tesla T4", "TPU v3", ...) and, on NVIDIA GPUs, its compute capability."""
    platform = platform.lower()
    if platform == "cpu":
        return DtypeChoice("float32", "the default on CPUs, where 16-bit matmuls are slower")
    if platform == "tpu":
        return DtypeChoice("bfloat16", f"the default on {device_kind}: its matrix units take bfloat16")
    cc = compute_capability(capability)
    if cc is None:
        return DtypeChoice("bfloat16", f"the default on {device_kind}")
    sm = f"{device_kind}, compute capability {cc[0]}.{cc[1]}"
    if cc >= NATIVE_BFLOAT16_CAPABILITY:
        return DtypeChoice("bfloat16", f"the default on {sm}: bfloat16 tensor cores")
    if cc >= TENSOR_CORE_CAPABILITY:
        return DtypeChoice(
            "float16", f"the default on {sm}: tensor cores for float16, none for bfloat16; dynamic loss scaling"
        )
    return DtypeChoice("float32", f"the default on {sm}: no tensor cores")


def has_native_bfloat16(platform: str, capability: Any = None) -> bool:
    """Whether bfloat16 matmuls run on matrix units built for them (so bfloat16 is fast there)."""
    if platform.lower() == "cpu":
        return False
    cc = compute_capability(capability)
    return cc is None or cc >= NATIVE_BFLOAT16_CAPABILITY


def has_fused_attention(device: Any) -> bool:
    """Whether cuDNN's fused (flash) attention runs on `device`: NVIDIA GPUs of compute capability 8.0 or newer
    (cuDNN's SDPA support matrix); a T4 or V100 runs XLA's attention instead."""
    platform, _, capability = describe(device)
    cc = compute_capability(capability)
    return platform.lower() in ("gpu", "cuda") and cc is not None and cc >= NATIVE_BFLOAT16_CAPABILITY


def describe(device: Any) -> tuple[str, str, Any]:
    """(platform, device_kind, compute_capability or None) of a `jax.Device` or a stand-in with those attributes."""
    return device.platform, device.device_kind, getattr(device, "compute_capability", None)


def first_device() -> Any:
    import jax  # here, not at the top: --help and flag checks need no JAX

    return jax.devices()[0]


def default_dtype_choice(device: Any = None) -> DtypeChoice:
    """The choice for `device` (default: the first device JAX sees)."""
    return choose_compute_dtype(*describe(device or first_device()))


def dtype_note(dtype: str, device: Any = None) -> str | None:
    """One sentence when an asked-for dtype will be slow on `device`: bfloat16 without native units; else None."""
    platform, kind, capability = describe(device or first_device())
    if dtype != "bfloat16" or platform.lower() == "cpu" or has_native_bfloat16(platform, capability):
        return None
    better = choose_compute_dtype(platform, kind, capability).dtype
    return (
        f"{kind} has no bfloat16 tensor cores: XLA computes bfloat16 there in float32 without them, which is slow; "
        f"{better} (the default there) is faster."
    )


def resolve_compute_dtype(requested: str | None, device: Any = None) -> DtypeChoice:
    """`requested` (a --dtype flag) or the device's default, with a note on stderr when the request will be slow."""
    if requested is None:
        return default_dtype_choice(device)
    slow = dtype_note(requested, device)
    if slow:
        note(slow)
    return DtypeChoice(requested, "--dtype")
