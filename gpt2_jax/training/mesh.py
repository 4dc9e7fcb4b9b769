"""The device mesh and where things lie on it: the batch split by rows, the training state replicated or sharded.

The mesh has one axis, 'data', over the chosen devices of every process (`select_devices`, `make_mesh`). Every
batch `[B, T+1]` is split along it by rows (`batch_sharding`); the global batch must split evenly into devices x
micro-batches (`check_batch`). The training state lies on the same axis in one of two ways (FSDP / ZeRO-3 is the
second):

    replicated  every device holds all params and AdamW moments (plain data parallelism; the fastest when it fits)
    fsdp        each large tensor of params and moments is split along the mesh's 'data' axis, so a device holds
                1/n of the state; XLA gathers a layer's weights where its matmuls need them (inside the layer
                scan, one layer at a time) and reduce-scatters the gradients back to their shards
    auto        replicated when it fits the devices' memory, else fsdp

The batch is split the same way under both, so the losses do not depend on the choice (tested to 1e-5 on 8 CPU
devices). Which dimension a tensor is split on: the largest one the device count divides, never the leading layer
axis of the stacked blocks under `h` (the scan slices it one layer per step; a split there would make XLA gather
the whole stack at once). Tensors too small to matter stay whole.

The memory check runs on `jax.eval_shape` results before anything is allocated: a state that cannot fit says so
and names the way out instead of failing deep inside XLA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jax.tree_util import DictKey

from gpt2_jax.errors import UsageError, UserError

STRATEGIES = ("auto", "replicated", "fsdp")
MIN_SHARDED_ELEMENTS = 1 << 14  # below this a tensor's shards would save less memory than their bookkeeping costs
STACKED_LAYERS_KEY = "h"
# Of a device's memory, the share the state may take: activations, gradients and XLA's workspace need the rest.
STATE_MEMORY_SHARE = 0.6


def select_devices(spec: str | int) -> list[jax.Device]:
    """`all` or a count of local devices, first ones first; a multi-process run always uses every device."""
    if jax.process_count() > 1:
        if str(spec) != "all":
            raise UsageError(f"--devices {spec}: a run over several processes uses every device; drop --devices.")
        return jax.devices()
    available = jax.local_devices()
    if str(spec) == "all":
        return available
    try:
        n = int(spec)
    except ValueError:
        raise UsageError(f"--devices must be 'all' or a number, got {spec!r}.")
    if not 1 <= n <= len(available):
        raise UsageError(f"--devices {n} asks for more devices than the {len(available)} this machine has.")
    return available[:n]


def on_cpu() -> bool:
    """Whether JAX computes on the host's CPU (no GPU or TPU): the demo and the layer unrolling depend on it."""
    return jax.default_backend() == "cpu"


def make_mesh(devices: Sequence[jax.Device]) -> Mesh:
    return Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))


def check_batch(batch_size: int, n_devices: int, accumulate: int) -> int:
    """The per-device micro-batch; a clear error when the global batch does not split evenly."""
    if batch_size < 1 or accumulate < 1:
        raise UsageError("--batch_size and --accumulate_gradients must be positive.")
    if batch_size % (n_devices * accumulate):
        raise UsageError(
            f"--batch_size {batch_size} must be divisible by devices x accumulate_gradients = "
            f"{n_devices} x {accumulate} = {n_devices * accumulate}; pick a multiple of {n_devices * accumulate}."
        )
    return batch_size // (n_devices * accumulate)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def shard_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Host batch `[B, T+1]` -> a device array split by rows over the mesh (asynchronous copy)."""
    return jax.device_put(batch, batch_sharding(mesh))


def leaf_spec(path: tuple, shape: tuple[int, ...], n_shards: int) -> PartitionSpec:
    """The fsdp placement of one params or optimizer-state leaf, from its path and shape."""
    if n_shards == 1 or math.prod(shape) < MIN_SHARDED_ELEMENTS:
        return PartitionSpec()
    stacked = any(isinstance(key, DictKey) and key.key == STACKED_LAYERS_KEY for key in path)
    dims = [d for d in range(1 if stacked else 0, len(shape)) if shape[d] % n_shards == 0]
    if not dims:
        return PartitionSpec()
    dim = max(dims, key=lambda d: (shape[d], d))
    return PartitionSpec(*(["data" if d == dim else None for d in range(len(shape))]))


def tree_shardings(abstract_tree: Any, mesh: Mesh, strategy: str) -> Any:
    """NamedShardings for every leaf of params (or an optimizer state over them) under `strategy`."""
    if strategy not in ("replicated", "fsdp"):
        raise ValueError(f"unknown sharding strategy {strategy!r}")
    n_shards = mesh.shape["data"]

    def place(path: tuple, leaf: Any) -> NamedSharding:
        spec = leaf_spec(path, leaf.shape, n_shards) if strategy == "fsdp" else PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(place, abstract_tree)


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
    """Bytes of `abstract_tree` one device holds when placed as `shardings` (the largest shard of each leaf)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings), strict=True):
        shard_shape = sharding.shard_shape(leaf.shape)
        total += math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
    return total


def device_memory_bytes(device: jax.Device) -> int | None:
    """The memory XLA may use on `device`, where the backend reports it (GPUs, TPUs); None on CPUs."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without the call raise rather than return None
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def choose_strategy(requested: str, state_bytes: dict[str, int], device: jax.Device, n_devices: int) -> str:
    """The strategy to use: `requested`, or for 'auto' the first that fits; raises when the choice cannot fit.

    state_bytes: per-device bytes of the whole state under each of 'replicated' and 'fsdp'.
    """
    limit = device_memory_bytes(device)
    budget = None if limit is None else limit * STATE_MEMORY_SHARE
    if requested == "auto":
        fits = budget is None or state_bytes["replicated"] <= budget
        requested = "replicated" if fits or n_devices == 1 else "fsdp"
    if budget is not None and state_bytes[requested] > budget:
        if requested == "fsdp":
            way_out = "add devices (or hosts: see the README's Several machines)"
        elif n_devices > 1:
            way_out = f"split it across the devices with --sharding fsdp ({gib(state_bytes['fsdp'])} per device)"
        else:
            way_out = "add devices and split it across them with --sharding fsdp"
        raise UserError(
            f"The training state (the params, and AdamW state for those that train) needs {gib(state_bytes[requested])}"
            f" per device ({requested}), more than {STATE_MEMORY_SHARE:.0%} of the {gib(limit)} a "
            f"{device.device_kind} has; {way_out}, or pick a smaller model."
        )
    return requested


def gib(n_bytes: float) -> str:
    """Bytes for people: GiB, or MiB below one GiB."""
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"
