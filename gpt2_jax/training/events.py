"""What is due after each training step (log, save, stop, validate, sample), and the signals that ask for a stop.

`due_at` is the whole schedule: the loop (loop.py) runs what it returns and nothing else, and between due steps it
never waits for the device. A signal does not stop the run by itself: `stop_signals` turns SIGTERM and the first
Ctrl-C into a flag, and `stop_agreed` decides when the run stops on it (at once in one process; at the next log step
when several processes must agree, since the checkpoint they save is collective).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import jax
import numpy as np

from gpt2_jax.training.config import TrainConfig
from gpt2_jax.training.distributed import host_copy


def periodic(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


@dataclasses.dataclass(frozen=True)
class Due:
    """What a finished step calls for besides the next step."""

    log: bool
    save: bool
    stop: bool  # after the save; nothing else runs
    validate: bool
    sample: bool

    @property
    def anything(self) -> bool:
        return self.log or self.save or self.stop or self.validate or self.sample


def due_at(step: int, cfg: TrainConfig, *, stopping: bool) -> Due:
    """The flags' periodic events at `step`; the last step also logs, saves and validates (its samples come after
    the loop); a stop (`stop_agreed`) saves first."""
    last = step == cfg.steps
    return Due(
        log=periodic(step, cfg.log_every) or last,
        save=periodic(step, cfg.save_every) or last or stopping,
        stop=stopping,
        validate=periodic(step, cfg.val_every) or last,
        sample=periodic(step, cfg.sample_every) and not last,
    )


@contextmanager
def stop_signals() -> Iterator[dict[str, int]]:
    """Turn SIGTERM and the first Ctrl-C into a flag the loop polls; a second Ctrl-C interrupts at once."""
    received: dict[str, int] = {}
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if "signum" in received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received["signum"] = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_agreed(stop: dict[str, int], *, at_log_step: bool) -> bool:
    """Whether to save and stop after this step. One process decides alone at once; several processes must
    agree, since saving is collective, so they compare their signal flags at log steps (where the host waits
    anyway): a run over several hosts stops within --log_every steps of a signal to any of them."""
    if jax.process_count() == 1:
        return "signum" in stop
    if not at_log_step:
        return False
    return bool(np.any(host_copy(np.array(["signum" in stop]))))
