"""kill -9 at random moments of a 2-device train.py, each time resumed with --restore_from latest (issue 12).

One chain of real processes: a run on two CPU devices, saving every 2 steps, is killed with SIGKILL at a random
moment (every other time while a save is being written, so that a half-written `N.orbax-checkpoint-tmp` is left
behind), the next process resumes it and is killed in turn, and the last one finishes. Every resume must read a
checkpoint back and carry on: no native abort, no traceback, each step logged once, nothing half-written left at
the end. A failure names the random seed and, for each kill, the newest complete step and what was half-written.
At least MIN_KILLS kills, then more up to KILLS while within a time budget: a loaded machine runs fewer of them
rather than running long, and no deadline decides whether the test passes.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2_jax.training.checkpoints import complete_steps, half_written

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
MIN_KILLS, KILLS = 2, 4
BUDGET_S = 150  # no kill past MIN_KILLS after this long: a loaded machine runs fewer, not longer
PATIENCE_S = 900  # for one process to reach the moment it is killed at: far more than any loaded machine needs
FLAGS = ["--init", "scratch:tiny", "--seq_len", "32", "--batch_size", "8", "--steps", str(STEPS), "--devices", "2",
         "--learning_rate", "3e-3", "--warmup_steps", "2", "--log_every", "1", "--val_every", "0", "--save_every", "2",
         "--keep", "3", "--sample_num", "0"]  # fmt: skip
# What a crash prints besides its exit code: absl's failure handler (a signal), a fatal log line or failed CHECK of
# XLA or tensorstore (`F1130 08:52:17.04 ...`), Python's fatal error handler, a C++ exception, a Python traceback.
CRASH = re.compile(r"SIGABRT|SIGSEGV|SIGBUS|^F\d{4} |Check failed|Fatal Python error|terminate called|Traceback", re.M)


class Process:
    """One train.py of the chain, its output in files (read while it runs, never blocking on a pipe)."""

    def __init__(self, run: Path, index: int, extra: list[str]) -> None:
        self.out, self.err = run.parent / f"{index}.out", run.parent / f"{index}.err"
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), "--out", str(run), *extra], cwd=ROOT, env=env,
                stdout=out, stderr=err,
            )  # fmt: skip

    def stdout(self) -> str:
        return self.out.read_text(encoding="utf-8")

    def stderr(self) -> str:
        return self.err.read_text(encoding="utf-8")

    def wait_until(self, ready, what: str, context: str) -> bool:
        """Poll until `ready()` (True) or the process ends (False); PATIENCE_S passing fails with its output."""
        deadline = time.monotonic() + PATIENCE_S
        while not ready():
            if self.proc.poll() is not None:
                return False
            assert time.monotonic() < deadline, f"{context}: no {what} after {PATIENCE_S} s:\n{self.stderr()[-3000:]}"
            time.sleep(0.02)
        return True

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def two_and_newer(checkpoints: Path, newest: list[int]) -> bool:
    """At least two complete checkpoints, the newest one written by the process now running."""
    steps = complete_steps(checkpoints)
    return len(steps) >= 2 and steps[-1:] > newest


def kill_at_a_random_moment(proc: Process, checkpoints: Path, rng: random.Random, mid_save: bool, context: str) -> bool:
    """SIGKILL `proc` once it has resumed (if it is a resume) and written a checkpoint of its own: inside its next
    save (`mid_save`: orbax's temporary directory is there) or anywhere in its cycle of steps and saves. False if it
    ended first (the caller then checks how)."""
    newest = complete_steps(checkpoints)[-1:]
    resumed = not newest or proc.wait_until(lambda: "resuming at step" in proc.stdout(), "a resume", context)
    if not (resumed and proc.wait_until(lambda: two_and_newer(checkpoints, newest), "a new checkpoint", context)):
        return False
    if mid_save and not proc.wait_until(lambda: bool(half_written(checkpoints)), "a save in progress", context):
        return False
    time.sleep(rng.uniform(0, 0.3) if mid_save else rng.uniform(0, 1.0))  # a step or a save: a few tenths of a s
    if proc.proc.poll() is not None:
        return False
    proc.kill()
    assert not CRASH.search(proc.stderr()), f"{context}: {proc.stderr()[-3000:]}"
    return True


@pytest.mark.slow  # KILLS + 1 train.py processes, each importing JAX and compiling: ~90 s on 2 idle cores
def test_kill_9_at_random_moments_then_resume_each_time(corpus, tmp_path):
    seed = random.SystemRandom().randrange(1 << 16)
    rng, run = random.Random(seed), tmp_path / "run"
    checkpoints, started, kills = run / "checkpoints", time.monotonic(), []
    proc = Process(run, 0, ["--dataset", str(corpus), *FLAGS])
    while len(kills) < MIN_KILLS or (len(kills) < KILLS and time.monotonic() - started < BUDGET_S):
        context = f"seed {seed}, kills so far (newest step, half-written) {kills}"
        if not kill_at_a_random_moment(proc, checkpoints, rng, mid_save=len(kills) % 2 == 0, context=context):
            break
        kills.append((complete_steps(checkpoints)[-1], [p.name for p in half_written(checkpoints)]))
        proc = Process(run, len(kills), ["--restore_from", "latest"])

    context = f"seed {seed}, kills (newest step, half-written) {kills}"
    assert proc.proc.wait(timeout=PATIENCE_S) == 0, f"{context}: exit {proc.proc.returncode}\n{proc.stderr()[-3000:]}"
    err = proc.stderr()
    assert not CRASH.search(err), f"{context}: {err[-3000:]}"
    assert len(kills) >= MIN_KILLS, f"{context}: the run finished before it was killed {MIN_KILLS} times"
    assert complete_steps(checkpoints)[-1] == STEPS and not half_written(checkpoints), context
    assert not (run / "train.lock").exists(), context
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1)), context
