"""Keep orbax's own failure noise off the user's terminal when a write fails (full disk, read-only folder).

A failed orbax save logs a traceback per writer thread through absl, and tensorstore's callbacks then raise
'Event loop is closed' into threads whose loop is gone, which Python prints as "Exception ignored" tracebacks. The
callers (checkpoints.py, native_format.py) already turn the failure itself into one sentence; this drops the rest.
"""

from __future__ import annotations

import logging
import sys


def quiet_failed_writes() -> None:
    """Silence absl's per-thread error logs and the closed-event-loop tracebacks, once per process."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    previous = sys.unraisablehook
    if getattr(previous, "gpt2_jax_filter", False):
        return

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        previous(unraisable)

    hook.gpt2_jax_filter = True
    sys.unraisablehook = hook
