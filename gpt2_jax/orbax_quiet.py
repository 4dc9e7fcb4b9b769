"""Keep orbax's own failure noise off the user's terminal when a read or write fails (full disk, read-only folder,
a damaged checkpoint that is skipped).

A failed orbax save logs a traceback per writer thread through absl, and tensorstore's callbacks then raise
'Event loop is closed' into threads whose loop is gone; a failed restore leaves its other reading coroutines to
raise when they are collected. Python prints those as "Exception ignored in ..." tracebacks, and asyncio logs a failed
task nobody awaited as "Task exception was never retrieved". The callers
(checkpoints.py, native_format.py) already turn the failure itself into one sentence; this drops the rest.
"""

from __future__ import annotations

import logging
import sys


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
