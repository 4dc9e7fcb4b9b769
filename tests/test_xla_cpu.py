"""XLA:CPU flags that training turns on where the running jaxlib has them (gpt2_jax/xla_cpu.py): a flag is added
only after a throwaway process of this jaxlib started with it, the answer is remembered, a flag this jaxlib does not
know is never added (XLA would abort the process), and the user's own XLA_FLAGS are left as they are."""

from __future__ import annotations

import json

from gpt2_jax import xla_cpu


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
