"""Every hint a command prints runs as printed, from the folder the user is in, with the interpreter they used:
the end of a training run, a model that is not here, --help's epilogue, a Python without the dependencies. Each
test takes the command out of the printed sentence and runs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = os.path.relpath(sys.executable, ROOT)  # as a user of the checkout types it: .venv/bin/python


def run(command: list[str] | str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", COLUMNS="200")
    env.pop("PYTHONPATH", None)  # as a user runs it: the package comes from the environment or the checkout
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, shell=isinstance(command, str))


def test_the_end_of_a_training_run_names_a_sample_command_that_runs(corpus, tmp_path):
    flags = ["--init", "scratch:tiny", "--dataset", str(corpus), "--out", str(tmp_path / "run"), "--steps", "2"]
    flags += ["--seq_len", "16", "--batch_size", "2", "--sample_num", "0", "--val_every", "0", "--warmup_steps", "1"]
    done = run([PYTHON, "train.py", *flags], ROOT)
    assert done.returncode == 0, done.stderr
    printed = re.search(r"sample it with: (.+)$", done.stdout, re.M).group(1)
    assert printed.startswith(f"{PYTHON} sample.py --model ") or printed.startswith("python sample.py --model ")
    sampled = run(f"{printed} --length 3 --seed 1", ROOT)
    assert sampled.returncode == 0 and "SAMPLE 1" in sampled.stdout, sampled.stderr


def download_command(text: str) -> str:
    return re.search(r"`([^`]*download[^`]*) 124M`", text).group(1)


def test_a_missing_model_names_a_download_command_that_runs(tmp_path):
    for args in (["sample.py"], ["sample.py", "--model", "gpt2"]):  # no models/124M in an empty folder
        missing = run([sys.executable, str(ROOT / args[0]), *args[1:], "--length", "2"], tmp_path)
        assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
        command = download_command(missing.stderr)
        assert run(f"{command} --help", tmp_path).returncode == 0, command  # the download itself needs the network


def test_the_help_epilogue_names_a_download_command_that_runs():
    helped = run([PYTHON, "train.py", "--help"], ROOT)
    assert helped.returncode == 0
    command = download_command(helped.stdout)
    assert run(f"{command} --help", ROOT).returncode == 0, command


def test_a_python_without_the_dependencies_gets_one_sentence():
    """`-S` leaves site-packages out: this very interpreter without its packages."""
    for args in (["train.py", "--help"], ["-m", "gpt2_jax.sample", "--model", "x"], ["-c", "import gpt2_jax"]):
        bare = run([sys.executable, "-S", *args], ROOT)
        assert bare.returncode == 1 and bare.stdout == "", bare.stderr
        assert bare.stderr.startswith("error: ") and bare.stderr.count("\n") == 1, bare.stderr
        assert "does not have jax" in bare.stderr and "which gpt2-jax needs" in bare.stderr


def a_python_without_jax() -> str | None:
    for name in ("python3", "python3.11", "python3.12", "python3.13", "python"):
        found = shutil.which(name)
        if found and run([found, "-c", "import jax"], ROOT).returncode != 0:
            return found
    return None


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").is_file(), reason="no .venv (make demo/test builds it)")
def test_the_system_python_is_told_the_venv_command_and_that_command_runs():
    python = a_python_without_jax()
    if python is None:
        pytest.skip("every Python on PATH has jax")
    told = run([python, "sample.py", "--model", "scratch:tiny", "--length", "2", "--seed", "1"], ROOT)
    assert told.returncode == 1 and told.stderr.count("\n") == 1, told.stderr
    command = re.search(r"set up: (.+)\.$", told.stderr).group(1)
    assert command == ".venv/bin/python sample.py --model scratch:tiny --length 2 --seed 1"
    assert run(command, ROOT).returncode == 0
