"""Checkpoints of the whole training state in an orbax CheckpointManager directory (`runs/NAME/checkpoints/`).

Each step directory holds three items: `params` and `opt_state` (StandardSave pytrees; the model loader reads
`params` alone) and `meta` (JSON: step, rng, data position, tokens seen, ...). Saves are asynchronous: training goes
on while the arrays are written, `wait()` blocks until the last one is complete, and orbax writes each step under a
temporary name (`N.orbax-checkpoint-tmp`) that is renamed only when complete, so a run killed mid-save leaves a
temporary directory that is never loaded (it is reported, then removed when the next run opens the directory).
Restores use abstract targets (shape, dtype, sharding) so the optax NamedTuples come back typed and the arrays land
directly on the mesh, whatever mesh, sharding or number of processes wrote them. In a run over several processes
every process calls save, wait, delete and restore alike (orbax writes each process's shards and lets process 0
finalise).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from gpt2_jax.console import is_primary, warn
from gpt2_jax.errors import UserError, short_reason
from gpt2_jax.io import quiet_orbax_failures
from gpt2_jax.weights.checksums import verify_checksums, write_checksums
from gpt2_jax.weights.native import complete_steps

ITEMS = ("params", "opt_state", "meta")
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Errors a failed write or read surfaces as: OSError from Python, ValueError/RuntimeError from tensorstore.
IO_ERRORS = (OSError, ValueError, RuntimeError)


def half_written(directory: Path) -> list[Path]:
    """Step directories a killed run left unfinished."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if TMP_SUFFIX in p.name)


def resolve_checkpoint_path(path: str | Path) -> tuple[Path, int | None]:
    """(checkpoints directory, step or None for its newest) for a run directory, its checkpoints/ or a step dir."""
    path = Path(path).absolute()
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name == "checkpoints" and path.is_dir():
        return path, None
    if path.name.isdigit() and (path / "params").is_dir():
        return path.parent, int(path.name)
    raise UserError(
        f"--restore_from {path} is neither a training run directory nor one of its checkpoints/<step> directories; "
        "pass latest, fresh, or such a path."
    )


class Checkpoints:
    """The CheckpointManager of one run, with errors as sentences and fallback past broken checkpoints."""

    def __init__(self, directory: str | Path, *, keep: int = 3, read_only: bool = False) -> None:
        self.directory = Path(directory).absolute()
        if not read_only and is_primary():
            # Here and now, not in the thread orbax's cleanup_tmp_directories starts: that one would go on deleting
            # while the state is restored and would be waited for by the first save alone, or by nothing.
            self._remove_half_written()
        self.in_flight: int | None = None  # the step being written in the background
        self.keep = keep
        quiet_orbax_failures()  # a failed save or restore is one sentence (_failed, restore), not orbax's tracebacks
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    # Old checkpoints are pruned by us, after the newer one is complete (orbax drops them on starting
                    # a save, so a save that then fails would leave fewer than --keep).
                    max_to_keep=None,
                    create=not read_only,
                    read_only=read_only,
                ),
                item_names=ITEMS,
            )
        except OSError as e:
            raise UserError(f"Cannot use {self.directory} for checkpoints: {e.strerror or e}.")

    def steps(self) -> list[int]:
        """Complete checkpoints on disk, oldest first."""
        if jax.process_count() > 1:
            # Saves and deletes are collective: every process must act on the same list, and a directory listing
            # taken while process 0 renames a finished save could differ between processes; the manager's cannot.
            return sorted(self.manager.all_steps())
        return complete_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # --- saving --------------------------------------------------------------------------------------------------
    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> bool:
        """Start writing step `step` (returns at once; False when it already exists). Raises UserError on failure."""
        self.wait()  # orbax would wait for the previous save anyway; this way its failure is reported as its own
        self._prune()
        if step in self.steps():
            return False
        self._check_writable(step)
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        try:
            started = bool(self.manager.save(step, args=args, force=True))
        except IO_ERRORS as e:
            raise self._failed(step, e)
        self.in_flight = step if started else None
        return started

    def _check_writable(self, step: int) -> None:
        """Refuse before orbax starts: a save it cannot even begin leaves its writer threads waiting 5 minutes."""
        probe = self.directory / f".write-probe-{os.getpid()}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise self._failed(step, e)

    def wait(self) -> None:
        """Block until every started save is complete on disk, then record its checksums."""
        step = self.in_flight
        try:
            self.manager.wait_until_finished()
        except IO_ERRORS as e:
            raise self._failed(self.in_flight, e)
        finally:
            self.in_flight = None
        if step is not None and is_primary() and (self.directory / str(step)).is_dir():
            try:  # orbax keeps no checksum: bytes overwritten later would read back as silently wrong weights
                write_checksums(self.directory / str(step), ITEMS[:2])
            except OSError as e:
                raise self._failed(step, e)
        self._prune()

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints (called only when no save is in flight)."""
        for step in self.steps()[: -self.keep]:
            self._delete(step)

    def _delete(self, step: int) -> None:
        try:
            self.manager.delete(step)
        except FileNotFoundError:  # on disk but unknown to this manager (written by another process)
            if is_primary():
                shutil.rmtree(self.directory / str(step), ignore_errors=True)

    def check(self) -> None:
        """Raise now if the background save has finished and failed (cheap: never waits for a running one)."""
        if self.in_flight is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def _remove_half_written(self) -> None:
        for leftover in half_written(self.directory):
            shutil.rmtree(leftover, ignore_errors=True)

    def _failed(self, step: int | None, error: Exception) -> UserError:
        self._remove_half_written()  # free the space a full disk needs back
        kept = self.steps()
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        previous = f"the previous checkpoints ({', '.join(map(str, kept))}) are untouched" if kept else "none kept"
        return UserError(
            f"Could not write {what} into {self.directory} ({short_reason(error)}); {previous}; free disk space or fix "
            "the directory's permissions, then resume with --restore_from latest."
        )

    def delete_after(self, step: int | None) -> list[int]:
        """Delete every checkpoint newer than `step` (all of them for None); returns the steps deleted."""
        doomed = [s for s in self.steps() if step is None or s > step]
        for s in doomed:
            self._delete(s)
        return doomed

    def close(self) -> None:
        try:
            self.manager.close()
        except IO_ERRORS:
            pass  # a failed save was reported by wait(); closing must still release everything else

    # --- restoring -----------------------------------------------------------------------------------------------
    def restore(self, step: int, params_target: Any, opt_state_target: Any) -> tuple[Any, Any, dict[str, Any]]:
        """(params, opt_state, meta) of step `step`, placed as the abstract targets ask."""
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(params_target),
            opt_state=ocp.args.StandardRestore(opt_state_target),
            meta=ocp.args.JsonRestore(),
        )
        verify_checksums(self.directory / str(step), advice="it is not used")
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as e:  # orbax wraps tensorstore's read errors (truncated or corrupt data) in a bare Exception
            raise UserError(f"Checkpoint {self.directory / str(step)} is damaged or incomplete ({short_reason(e)}).")
        return restored.params, restored.opt_state, dict(restored.meta)

    def restore_newest(
        self, params_target: Any, opt_state_target: Any, *, at_most: int | None = None
    ) -> tuple[int, Any, Any, dict[str, Any]]:
        """The newest checkpoint (not after `at_most`) that reads back; broken ones are skipped with a warning."""
        candidates = [s for s in reversed(self.steps()) if at_most is None or s <= at_most]
        if not candidates:
            raise UserError(f"No complete checkpoint in {self.directory} to restore from.")
        for step in candidates:
            try:
                return (step, *self.restore(step, params_target, opt_state_target))
            except UserError as e:
                if step == candidates[-1]:
                    raise
                warn(f"{e} Falling back to the checkpoint before it.")
        raise AssertionError("unreachable")
