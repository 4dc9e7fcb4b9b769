"""train.py end to end on a tiny model: resume exactness, signals, kill -9, NaN, locks, overwrite refusal, full disk.

One straight 30-step run (checkpoints at 10, 20, 30) is the reference; the other tests copy its run directory and
interrupt, damage or extend the copy, then compare with it. Runs go in-process through `run_training` (train.py's
own entry) except where a real process must be signalled or killed.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt2_jax.config import get_config
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.training.checkpoints import complete_steps
from gpt2_jax.training.config import TrainConfig
from gpt2_jax.training.events import due_at
from gpt2_jax.training.loop import run_training
from gpt2_jax.training.run_dir import RunLock
from gpt2_jax.weights.native import load_params

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = str(ROOT / "data" / "shakespeare")
STEPS = 30


@pytest.fixture(scope="module")
def flags(corpus) -> dict:
    return dict(
        init="scratch:tiny", dataset=str(corpus), seq_len=32, batch_size=8, steps=STEPS, learning_rate=3e-3,
        warmup_steps=5, log_every=1, val_every=0, val_batches=2, save_every=10, keep=5, sample_num=0,
    )  # fmt: skip


def train(out: Path, **flags) -> int:
    return run_training(dict(flags, out=str(out)), bundled_dataset=BUNDLED)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def params_at(out: Path, step: int) -> dict:
    return load_params(out / "checkpoints" / str(step) / "params", get_config("tiny"))


def assert_same_params(a: dict, b: dict) -> None:
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def straight(tmp_path_factory, flags) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert train(out, **flags) == 0
    assert complete_steps(out / "checkpoints") == [10, 20, 30]
    return out


def test_straight_run_writes_a_loadable_run_directory(straight):
    record = json.loads((straight / "gpt2_jax.json").read_text())
    assert record["format"] == "gpt2-jax" and record["config"]["n_embd"] == 64
    assert record["training"]["steps"] == STEPS and "restore_from" not in record["training"]
    assert (straight / "encoder.json").is_file() and (straight / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    assert all({"lr", "tokens_per_s", "avg", "mfu", "tokens"} <= set(r) for r in logged)
    assert any("val_loss" in r for r in records)
    assert not (straight / "train.lock").exists()


def test_resume_after_a_half_written_checkpoint_is_bit_identical(straight, tmp_path, flags, capsys):
    """20 steps + resume + 10 steps == 30 straight steps; a save killed mid-way is reported and skipped."""
    run = copy_run(straight, tmp_path / "run")
    shutil.copytree(run / "checkpoints" / "30", run / "checkpoints" / "30.orbax-checkpoint-tmp")
    shutil.rmtree(run / "checkpoints" / "30")
    shutil.rmtree(run / "checkpoints" / "30.orbax-checkpoint-tmp" / "meta")  # as a kill mid-save leaves it
    assert train(run, restore_from="latest") == 0
    assert "half-written checkpoint(s) 30.orbax-checkpoint-tmp" in capsys.readouterr().err
    assert complete_steps(run / "checkpoints") == [10, 20, 30]
    assert losses(run) == losses(straight)
    assert_same_params(params_at(run, 30), params_at(straight, 30))


def test_refuses_to_overwrite_checkpoints_unless_asked(straight, tmp_path, flags, corpus):
    run = copy_run(straight, tmp_path / "run")
    with pytest.raises(UsageError, match=r"already holds checkpoints .*--restore_from latest"):
        train(run, **flags)
    with pytest.raises(UsageError, match="--overwrite was not given"):
        train(run, **flags, restore_from="fresh")
    with pytest.raises(UsageError, match="would continue elsewhere"):
        train(run, **flags, restore_from=str(straight / "checkpoints" / "10"))
    assert complete_steps(run / "checkpoints") == [10, 20, 30]
    assert not (run / "train.lock").exists()

    # --overwrite starts over (and over-fits a small text: the loss falls, validation is reported).
    small = corpus.parent / "small.txt"
    small.write_text(corpus.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    fit = dict(flags, dataset=str(small), save_every=0, val_every=15, val_fraction=0.2)
    assert train(run, **fit, restore_from="fresh", overwrite=True) == 0
    assert complete_steps(run / "checkpoints") == [STEPS]
    curve = losses(run)
    assert curve[STEPS] < curve[1] - 4, curve
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [15, 30]


def _start(out: Path, flags: dict, **extra) -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "train.py"), "--out", str(out)]
    for key, value in dict(flags, **extra).items():
        args += [f"--{key}", str(value)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _wait_for_step(proc: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + 900  # a hang guard; a loaded machine is slow
    for line in proc.stdout:
        if line.startswith(f"[{step} |"):
            return
        assert time.monotonic() < deadline, "train.py did not reach the step in time"
    raise AssertionError(f"train.py ended before step {step}: {proc.stderr.read()[-2000:]}")


@pytest.mark.slow  # two real train.py processes (imports and compiles twice): ~40 s on 2 cores
def test_kill_9_then_sigterm_then_resume_ends_as_the_straight_run(straight, tmp_path, flags):
    """A real train.py is killed with -9 (saving every step, so often mid-save), a second one resumes, takes over
    the dead process's lock and is stopped by SIGTERM (checkpoint, exit 143); a third run finishes. Same result."""
    run = tmp_path / "run"
    killed = _start(run, flags, save_every=1)
    _wait_for_step(killed, 6)
    killed.kill()
    killed.communicate(timeout=900)
    assert killed.returncode == -signal.SIGKILL  # not finished before the kill landed
    assert (run / "train.lock").exists()  # the dead process's
    after_kill = complete_steps(run / "checkpoints")
    assert after_kill  # the newest ones may be half-written: resuming must skip them

    stopped = _start(run, {}, restore_from="latest", save_every=10)
    _wait_for_step(stopped, after_kill[-1] + 3)
    stopped.send_signal(signal.SIGTERM)
    out, err = stopped.communicate(timeout=900)
    assert stopped.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "took over the stale lock" in err and "Traceback" not in err
    step = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert complete_steps(run / "checkpoints")[-1] == step < STEPS
    assert not (run / "train.lock").exists()

    assert train(run, restore_from="latest") == 0
    assert losses(run) == losses(straight)
    assert_same_params(params_at(run, 30), params_at(straight, 30))


def test_nan_loss_stops_within_a_few_steps_and_keeps_the_last_good_checkpoint(straight, tmp_path):
    run = copy_run(straight, tmp_path / "run")
    with pytest.raises(UserError, match=r"diverged.* at step 3\d .*step 30, stays the newest.*lower --learning_rate"):
        train(run, restore_from="latest", learning_rate=1e3, steps=40, save_every=2)
    assert complete_steps(run / "checkpoints") == [10, 20, 30]
    assert not (run / "train.lock").exists()


def test_a_checkpoint_that_cannot_be_written_is_one_sentence_and_keeps_the_others(straight, tmp_path):
    """A file-size limit makes every checkpoint write fail the way a full disk does (EFBIG instead of ENOSPC)."""
    run = copy_run(straight, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "30")
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, limits[1]))  # below wte's 12.8 MB, above the tokenizer's
    try:
        with pytest.raises(UserError, match=r"Could not write checkpoint step 22 .*\(10, 20\) are untouched"):
            train(run, restore_from="latest", save_every=2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert complete_steps(run / "checkpoints") == [10, 20]
    assert not any("tmp" in p.name for p in (run / "checkpoints").iterdir())
    assert_same_params(params_at(run, 20), params_at(straight, 20))


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, flags):
    (tmp_path / "train.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    with pytest.raises(UserError, match=rf"in use by another train.py \(pid {os.getpid()}\)"):
        train(tmp_path, **flags)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    lock = RunLock(tmp_path)
    assert f"pid {dead.pid}" in lock.acquire()
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match="in use"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / "train.lock").exists()


def test_what_is_due_follows_the_flags_the_last_step_and_a_stop():
    cfg = TrainConfig(steps=20, log_every=5, val_every=10, sample_every=4, save_every=8)
    due = {step: due_at(step, cfg, stopping=False) for step in range(1, cfg.steps + 1)}
    assert [step for step, d in due.items() if d.log] == [5, 10, 15, 20]
    assert [step for step, d in due.items() if d.save] == [8, 16, 20]
    assert [step for step, d in due.items() if d.validate] == [10, 20]
    assert [step for step, d in due.items() if d.sample] == [4, 8, 12, 16]  # the last step's come after the loop
    assert [step for step, d in due.items() if d.anything] == [4, 5, 8, 10, 12, 15, 16, 20]
    assert not any(d.stop for d in due.values())
    stop = due_at(3, cfg, stopping=True)
    assert stop.stop and stop.save and not (stop.log or stop.validate or stop.sample)
    only_at_the_end = TrainConfig(steps=20, log_every=5, val_every=0, sample_every=0, save_every=0)
    due = {step: due_at(step, only_at_the_end, stopping=False) for step in range(1, 21)}
    assert [step for step, d in due.items() if d.save or d.validate] == [20]
    assert not any(d.sample for d in due.values())


def test_cli_help_documents_every_flag_and_bad_flags_exit_2():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    help_text = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert help_text.returncode == 0
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in help_text.stdout
    assert help_text.stdout.count("(default:") >= len(TrainConfig.__dataclass_fields__)
    bad = subprocess.run(
        [sys.executable, "train.py", "--steps", "-1"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --steps must be at least 1, got -1."


def test_a_sample_prompt_with_bytes_that_are_not_utf8_is_repaired_and_counted(capsys):
    from gpt2_jax.training.config import repair_text_flags

    values = {"sample_prompt": "ab\udcffc"}  # how argv holds the byte 0xff
    repair_text_flags(values)
    assert values["sample_prompt"] == "ab\ufffdc"
    assert "1 invalid UTF-8 byte(s) in --sample_prompt were replaced" in capsys.readouterr().err


def test_fine_tuning_a_saved_model_on_two_devices(corpus, tmp_path):
    """A native model (or a run's checkpoint) loads onto one device; the run must still place it on both."""
    from gpt2_jax.weights.loading import load_model
    from gpt2_jax.weights.native import save_native_model

    base = tmp_path / "base"
    base.mkdir()
    model = load_model("scratch:tiny")
    save_native_model(base, model.params, model.config, model.tokenizer)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    flags = ["--init", str(base), "--dataset", str(corpus), "--devices", "2", "--steps", "2", "--seq_len", "16"]
    flags += ["--batch_size", "4", "--sample_num", "0", "--val_every", "0", "--out", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "devices: 2 x cpu" in done.stdout + done.stderr
