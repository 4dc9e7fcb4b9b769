"""XLA:CPU flags that training turns on where the running jaxlib has them (gpt2_jax/xla_cpu.py): a flag is added
only after a throwaway process of this jaxlib started with it, the answer is remembered, a flag this jaxlib does not
know is never added (XLA would abort the process), and the user's own XLA_FLAGS are left as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax import xla_cpu

ROOT = Path(__file__).resolve().parent.parent


def test_an_unknown_flag_is_probed_once_refused_and_remembered(tmp_path, monkeypatch):
    cache = tmp_path / "xla_flags.json"
    assert not xla_cpu.accepted("--xla_cpu_no_such_flag_at_all=1", str(cache))  # the probe process aborts
    assert list(json.loads(cache.read_text()).values()) == [False]
    monkeypatch.setattr(xla_cpu.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("probed")))
    assert not xla_cpu.accepted("--xla_cpu_no_such_flag_at_all=1", str(cache))  # remembered: no second probe


def test_the_training_flags_are_added_only_where_accepted_and_never_over_the_users(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2_JAX_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setattr(xla_cpu, "accepted", lambda flag, cache_file: True)
    assert xla_cpu.use_training_flags(str(tmp_path)) == list(xla_cpu.TRAINING_FLAGS)
    assert xla_cpu.TRAINING_FLAGS[0] in xla_cpu.os.environ["XLA_FLAGS"].split()
    assert xla_cpu.use_training_flags(str(tmp_path)) == []  # already there: not twice
    name = xla_cpu.TRAINING_FLAGS[0].split("=")[0]
    monkeypatch.setenv("XLA_FLAGS", f"{name}=LIBRARY_FUSION_TYPE_NONE")  # the user's choice stands
    assert xla_cpu.use_training_flags(str(tmp_path)) == [] and xla_cpu.os.environ["XLA_FLAGS"].endswith("_NONE")
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_cpu, "accepted", lambda flag, cache_file: False)  # an older jaxlib
    assert xla_cpu.use_training_flags(str(tmp_path)) == [] and xla_cpu.os.environ["XLA_FLAGS"] == ""
    monkeypatch.setattr(xla_cpu, "accepted", lambda flag, cache_file: True)
    monkeypatch.setenv("GPT2_JAX_XLA_DEFAULTS", "0")
    assert xla_cpu.use_training_flags(str(tmp_path)) == []


def test_train_py_trains_with_the_flags_where_accepted_and_matches_a_run_without(corpus, tmp_path):
    """The shipping default end to end: the same first steps with the flags on as off."""
    from gpt2_jax.data.cache import default_cache_dir

    flags = ["--init", "scratch:tiny", "--dataset", str(corpus), "--steps", "3", "--seq_len", "16", "--batch_size", "8"]
    flags += ["--log_every", "1", "--val_every", "0", "--sample_num", "0", "--warmup_steps", "1"]
    losses = {}
    for defaults in ("1", "0"):
        env = dict(os.environ, GPT2_JAX_XLA_DEFAULTS=defaults, JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        out = tmp_path / f"run{defaults}"
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--out", str(out)], env=env, text=True,
                              capture_output=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[defaults] = [r["loss"] for r in records if "loss" in r]
    cache = json.loads((Path(default_cache_dir()) / "xla_flags.json").read_text())
    if not any(cache.values()):
        pytest.skip("this jaxlib accepts none of the training flags: both runs were the same")
    # Equal to the bit on 2026-12-07 (AMD EPYC, jax 0.10.2); another library's float32 matmuls may round otherwise,
    # and 3 AdamW steps carry that on: 1e-4 relative is rounding, while a wrong product would be off by far more.
    assert losses["1"] == pytest.approx(losses["0"], rel=1e-4)
