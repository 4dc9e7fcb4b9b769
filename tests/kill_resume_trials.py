"""Stress trials: kill -9 a 2-device training run at a random moment, resume it, and check that the resume exits 0.

    .venv/bin/python tests/kill_resume_trials.py --trials 50 --loops 2      # README: "What happens when..."

Each trial trains GPT-2 `scratch:tiny` on two CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`,
`--devices all`) over the bundled corpus with `--save_every 5` and the other flags at their defaults (validation of
20 batches and a sample at the end), kills it with SIGKILL at a random moment once two checkpoints exist, resumes it
with `--restore_from latest` for 3 more steps, and records the resumed run's exit code and any native crash in its
output. `--loops 2` runs two such loops at once, as a loaded machine would. Each trial's output is kept under
`--out` for a failure to be read. Exits 1 if any resumed run did not exit 0. Not part of the suite (it takes
minutes): tests/test_kill_resume.py is the bounded test.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2_jax.weights.native import complete_steps  # noqa: E402

FLAGS = ["--init", "scratch:tiny", "--devices", "all", "--save_every", "5", "--seq_len", "64", "--log_every", "5"]
CRASH = re.compile(r"SIGABRT|SIGSEGV|^F\d{4} |Check failed|Fatal Python error|terminate called|Traceback", re.M)
PATIENCE_S = 900  # a hang guard per process, far above what a loaded machine needs


def start(run: Path, name: str, flags: list[str]) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    log = run.parent / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "--out", str(run), *flags],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return proc, log


def trial(folder: Path, rng: random.Random) -> tuple[int, str]:
    """One kill and resume; (the resumed run's exit code, a crash line or '')."""
    run = folder / "run"
    proc, _ = start(run, "first", [*FLAGS, "--steps", "1000"])
    deadline = time.monotonic() + PATIENCE_S
    while len(complete_steps(run / "checkpoints")) < 2:
        if proc.poll() is not None:
            return -1, f"the first run ended with {proc.returncode} before its second checkpoint"
        if time.monotonic() > deadline:
            proc.kill()
            return -1, "the first run wrote no second checkpoint in time"
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 2.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = complete_steps(run / "checkpoints")[-1]
    resumed, log = start(run, "resumed", ["--restore_from", "latest", "--steps", str(newest + 3)])
    try:
        code = resumed.wait(timeout=PATIENCE_S)
    except subprocess.TimeoutExpired:
        resumed.kill()
        code = resumed.wait()
    crash = CRASH.search(log.read_text(encoding="utf-8", errors="replace"))
    return code, crash.group(0) if crash else ""


def loop(index: int, trials: int, out: Path, seed: int, results: list) -> None:
    rng = random.Random(seed + index)
    for t in range(trials):
        folder = out / f"loop{index}-trial{t:03d}"
        folder.mkdir(parents=True)
        code, crash = trial(folder, rng)
        results.append((folder.name, code, crash))
        print(f"{folder.name}: resumed run exited {code}{'; ' + crash if crash else ''}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50, help="trials in all, shared by the loops (default 50)")
    p.add_argument("--loops", type=int, default=2, help="loops running at once (default 2)")
    p.add_argument("--out", default=None, help="where each trial's run and logs are kept (default: a temp folder)")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kill-resume-"))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 16)
    print(f"{args.trials} trials in {args.loops} loops, seed {seed}, runs in {out}", flush=True)
    results: list = []
    per_loop = [args.trials // args.loops + (i < args.trials % args.loops) for i in range(args.loops)]
    threads = [threading.Thread(target=loop, args=(i, n, out, seed, results)) for i, n in enumerate(per_loop)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [r for r in results if r[1] != 0 or r[2]]
    print(f"{len(results) - len(failed)} of {len(results)} resumed runs exited 0 with no crash", flush=True)
    for name, code, crash in failed:
        print(f"  {name}: exit {code} {crash}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
