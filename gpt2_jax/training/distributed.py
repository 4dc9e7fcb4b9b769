"""Several processes (hosts) as one training run, through JAX's own multi-controller runtime.

Every process runs the same train.py. `initialize` joins them (before any other JAX call): the device mesh then
spans every process's devices, and one jitted step runs on all of them with the collectives between hosts done by
XLA (NCCL on GPUs, ICI on TPUs, gloo on CPUs). What each process does differently:

    data         every process draws the same batch positions (they depend on the seed and step alone) but reads
                 only the rows its own devices hold (`local_rows`), then `global_batch` assembles the global array
    output       only process 0 prints, writes metrics, plots, samples and the run directory's files
    checkpoints  orbax writes them collectively (each process its shards, process 0 the metadata), and a run
                 resumes on any number of processes: the restore places the arrays on the new mesh

Settings come from the cluster on TPU pods, SLURM and Open MPI (jax.distributed's auto-detection), or from
`--coordinator HOST:PORT --num_processes N --process_id I` on every process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gpt2_jax.console import is_primary
from gpt2_jax.errors import UsageError, UserError, first_line
from gpt2_jax.training.mesh import batch_sharding, shard_batch


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join the other processes of the run; all three settings, or none for the cluster's auto-detection."""
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise UsageError("--coordinator, --num_processes and --process_id go together: give all three or none.")
    if all(given) and not 0 <= process_id < num_processes:
        raise UsageError(f"--process_id must be in [0, {num_processes}), got {process_id}.")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    except (RuntimeError, ValueError) as e:
        if coordinator is None:
            advice = (
                "outside a TPU pod, SLURM or Open MPI job, start every process with --coordinator HOST:PORT "
                "--num_processes N --process_id I"
            )
        else:
            advice = (
                "check that every process was started with the same --coordinator HOST:PORT and --num_processes, "
                "that each --process_id is unique, and that the coordinator's port is reachable"
            )
        raise UserError(f"Could not join the distributed run ({first_line(e)[:200]}); {advice}.")
    if not is_primary():
        # One voice: process 0 prints the log; the others' stdout would repeat it line for line.
        sys.stdout = open(os.devnull, "w", encoding="utf-8")


def local_rows(mesh: Mesh, global_rows: int) -> slice:
    """The rows of a row-sharded `[global_rows, ...]` array that live on this process's devices (contiguous)."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
    starts = sorted(
        {(s[0].start or 0, s[0].stop if s[0].stop is not None else global_rows) for s in index_map.values()}
    )
    start, stop = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != stop - start:
        raise UserError("This process's devices hold rows of the batch that are not contiguous; use one mesh axis.")
    return slice(start, stop)


def global_batch(local_BX: np.ndarray, mesh: Mesh, global_rows: int) -> jax.Array:
    """This process's rows `[local, ...]` -> the global row-sharded array `[global_rows, ...]` (asynchronous copy)."""
    if jax.process_count() == 1:
        return shard_batch(local_BX, mesh)
    shape = (global_rows, *local_BX.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_BX, shape)


def host_copy(tree: Any) -> Any:
    """Numpy copies of (possibly sharded, possibly multi-host) arrays, whole on every process; all must call it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
    """Wait until every process reaches the same point (a no-op in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
