"""File and process helpers shared by every writer and reader.

Nothing is ever left half-written under its final name (`atomic_write_bytes`). Orbax's own failure noise is kept
off the user's terminal when a read or write fails (`quiet_orbax_failures`): a failed orbax save logs a traceback
per writer thread through absl, and tensorstore's callbacks then raise 'Event loop is closed' into threads whose
loop is gone; a failed restore leaves its other reading coroutines to raise when they are collected. Python prints
those as "Exception ignored in ..." tracebacks, and asyncio logs a failed task nobody awaited as "Task exception
was never retrieved". The callers (training/checkpoints.py, weights/native.py) already turn the failure itself into
one sentence; this drops the rest.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, so `path` is never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _DropOrbaxTasks(logging.Filter):
    """asyncio's "Task exception was never retrieved" for a task of orbax's (the failed write, reported already)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "orbax" not in record.getMessage()


def quiet_orbax_failures() -> None:
    """Silence absl's per-thread error logs and orbax's leftover-coroutine tracebacks, once per process."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropOrbaxTasks) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropOrbaxTasks())
    previous = sys.unraisablehook
    if getattr(previous, "gpt2_jax_filter", False):
        return

    def hook(unraisable) -> None:
        if not _is_orbax_leftover(unraisable):
            previous(unraisable)

    hook.gpt2_jax_filter = True
    sys.unraisablehook = hook


def _is_orbax_leftover(unraisable) -> bool:
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
        return True
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine of orbax's, collected after a failed read
    return code is not None and "orbax" in code.co_filename


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (someone else's live process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    return True
