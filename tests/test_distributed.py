"""train.py over several processes (jax.distributed on 127.0.0.1, gloo collectives between CPU devices).

Three real runs of train.py, on a constant learning rate so that a 4-step run resumed to 6 steps equals a straight
6-step run:
    A  1 process x 4 devices, 6 steps (the reference)
    B  2 processes x 2 devices, 4 steps, state sharded across all 4 devices (fsdp), samples at the end
    C  B's run directory resumed in 1 process x 4 devices (replicated) to step 6
B's losses equal A's for steps 1-4 and C's equal A's for steps 5-6 up to summation order: the global batch, the
collectives and the checkpoint (written by two processes, read by one, resharded on the way) are all exact.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tolerance import ulps

from gpt2_jax.config import get_config
from gpt2_jax.weights.native import load_params

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 900  # a hang guard, not a speed check: two suites at once on 2 cores are slow


def train_args(corpus: Path, out: Path, steps: int) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "--init", "scratch:tiny", "--dataset", str(corpus), "--out", str(out),
        "--seq_len", "32", "--batch_size", "8", "--steps", str(steps), "--learning_rate", "3e-3",
        "--lr_schedule", "constant", "--warmup_steps", "2", "--log_every", "1", "--val_every", "0",
        "--val_batches", "2", "--save_every", "4", "--sample_num", "0",
    ]  # fmt: skip


def env_with_devices(n: int) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(args: list[str], devices: int) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=ROOT, env=env_with_devices(devices), capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


PORT_TAKEN = ("Failed to start RPC server", "Address already in use")


def run_processes(args: list[str], n_processes: int, devices_each: int) -> list[tuple[int, str, str]]:
    """Start every process of one run, wait for all; kill the rest if one fails or hangs. A coordinator port taken
    by someone else between free_port() and the coordinator's bind (another test, on a busy machine) is retried."""
    for _ in range(3):
        results = _run_processes_once(args, n_processes, devices_each)
        if not any(reason in results[0][2] for reason in PORT_TAKEN):
            return results
    return results


def _run_processes_once(args: list[str], n_processes: int, devices_each: int) -> list[tuple[int, str, str]]:
    cluster = ["--distributed", "--coordinator", f"127.0.0.1:{free_port()}", "--num_processes", str(n_processes)]
    popen = dict(
        cwd=ROOT, env=env_with_devices(devices_each), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    procs = [subprocess.Popen([*args, *cluster, "--process_id", str(i)], **popen) for i in range(n_processes)]
    try:
        results = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT_S)
            results.append((p.returncode, stdout, stderr))
            if p.returncode and any(reason in stderr for reason in PORT_TAKEN):
                return results  # the coordinator never started: the others would only wait for it
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow  # four train.py processes with compiles: ~60 s on 2 cores
def test_two_processes_train_like_one_and_resume_in_one(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_one(train_args(corpus, a, 6), devices=4)

    results = run_processes([*train_args(corpus, b, 4), "--sharding", "fsdp", "--sample_num", "1",
                             "--sample_length", "4"], n_processes=2, devices_each=2)  # fmt: skip
    for i, (code, _, stderr) in enumerate(results):
        assert code == 0, f"process {i}: {stderr[-3000:]}"
    primary_out, other_out = results[0][1], results[1][1]
    assert "devices: 4 x cpu (cpu) in 2 processes" in primary_out
    assert "sharded 4 ways (fsdp)" in primary_out
    assert "[4 |" in primary_out and "==== SAMPLE 1 ====" in primary_out
    assert "[4 |" not in other_out and "SAMPLE" not in other_out  # only process 0 speaks
    assert (b / "samples" / "samples-4.txt").is_file()
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["4"]

    resumed = run_one([*train_args(corpus, b, 6), "--restore_from", "latest"], devices=4)
    assert "resuming at step 4" in resumed.stdout and "replicated" in resumed.stdout

    # A model trained across several devices is a model for one: sample.py/convert read it on this 1-device process.
    for step in ("4", "6"):  # written by 2 processes (fsdp over 4 devices), and by 1 process (4 devices, replicated)
        assert load_params(b / "checkpoints" / step / "params", get_config("tiny"))["wte"].shape == (50257, 64)

    reference, distributed = losses(a), losses(b)
    assert sorted(distributed) == [1, 2, 3, 4, 5, 6]
    assert reference[6] < reference[1]  # it trains
    for step in range(1, 7):  # a mean of 8 x 32 token losses that 2 processes' devices sum in other orders
        tolerance = ulps(reference[step], 256)
        assert abs(distributed[step] - reference[step]) <= tolerance, (step, distributed[step], reference[step])


@pytest.mark.parametrize(
    ("flags", "code", "message"),
    [
        (["--distributed"], 1, r"outside a TPU pod, SLURM or Open MPI job, start every process with --coordinator"),
        (["--coordinator", "127.0.0.1:1"], 2, r"--coordinator only means something with --distributed; add it\."),
        (["--distributed", "--num_processes", "2"], 2, r"--coordinator, --num_processes and --process_id go together"),
        (["--distributed", "--coordinator", "127.0.0.1:1", "--num_processes", "2", "--process_id", "2"], 2,
         r"--process_id must be in \[0, 2\), got 2\."),
    ],
)  # fmt: skip
def test_cluster_flags_that_cannot_work_are_one_sentence(flags, code, message):
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], cwd=ROOT, env=env_with_devices(1),
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert done.returncode == code, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert re.search(message, done.stderr.strip().splitlines()[-1]), done.stderr[-2000:]
