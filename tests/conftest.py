"""Fixtures shared by the test files: a slice of the bundled corpus, and a compilation cache of the session's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# train.py turns on XLA:CPU flags of its own before JAX starts (gpt2_jax/xla_cpu.py); this process's JAX has started
# without them, so the suite's train.py subprocesses leave them off too and every comparison between an in-process
# run and a subprocess compares the same arithmetic. tests/test_xla_cpu.py trains with them on.
os.environ["GPT2_JAX_XLA_DEFAULTS"] = "0"


@pytest.fixture(scope="session", autouse=True)
def _session_compile_cache(tmp_path_factory):
    """train.py/sample.py keep JAX's compilation cache in $GPT2_JAX_CACHE: a folder of this session, never the
    user's ~/.cache (subprocesses inherit the variable, so the suite's commands also share compiled code)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("GPT2_JAX_CACHE", str(tmp_path_factory.mktemp("gpt2_jax_cache")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The first 40,000 characters of Macbeth (about 11k GPT-2 tokens): enough windows for tiny runs."""
    text = (ROOT / "data" / "shakespeare" / "macbeth_gut.txt").read_text(encoding="utf-8")[:40_000]
    path = tmp_path_factory.mktemp("data") / "macbeth.txt"
    path.write_text(text, encoding="utf-8")
    return path
