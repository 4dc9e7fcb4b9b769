"""The persistent compilation cache of train.py and sample.py (gpt2_jax/compile_cache.py): on by default in
$GPT2_JAX_CACHE/jax_cache, off with --no_compile_cache, and a second start that loads the compiled steps computes
exactly what the first did. Every run here points GPT2_JAX_CACHE at a temporary folder, never the user's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax import compile_cache

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, args: list[str], cache: Path, cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GPT2_JAX_CACHE=str(cache), JAX_PLATFORMS="cpu", **env_vars)
    done = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def entries(cache: Path) -> list[str]:
    folder = cache / "jax_cache"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_sample_reuses_its_compiled_functions_and_prints_the_same(tmp_path):
    cache = tmp_path / "cache"
    flags = ["--model", "scratch:tiny", "--length", "12", "--seed", "5", "--nsamples", "2"]
    first = run("sample.py", flags, cache, tmp_path)
    decode = ("jit_prefill_and_sample", "jit_decode_chunk")  # the sampler's two compiled functions
    assert all(any(entry.startswith(f"{name}-") for entry in entries(cache)) for name in decode)
    second = run("sample.py", flags, cache, tmp_path, JAX_LOG_COMPILES="1")  # which logs each cache hit
    assert second.stdout == first.stdout
    for name in decode:
        assert f"Persistent compilation cache hit for '{name}'" in second.stderr

    off = tmp_path / "off"
    assert run("sample.py", [*flags, "--no_compile_cache"], off, tmp_path).stdout == first.stdout
    assert entries(off) == []


@pytest.mark.slow  # three train.py processes: ~60 s on 2 cores
def test_train_from_the_cache_computes_what_a_fresh_compile_does(tmp_path, corpus):
    cache = tmp_path / "cache"
    flags = ["--init", "scratch:tiny", "--dataset", str(corpus), "--steps", "3", "--batch_size", "2", "--seq_len",
             "32", "--log_every", "1", "--val_every", "3", "--val_batches", "2", "--sample_num", "0"]  # fmt: skip

    def losses(out: str, *extra: str, where: Path = cache) -> list[float]:
        run("train.py", [*flags, "--out", str(tmp_path / out), *extra], where, tmp_path)
        records = (json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines())
        return [r.get("loss", r.get("val_loss")) for r in records]

    first = losses("first")
    assert any(name.startswith("jit_train_step-") for name in entries(cache))
    assert losses("second") == first
    assert losses("uncached", "--no_compile_cache", where=tmp_path / "off") == first
    assert entries(tmp_path / "off") == []


def test_a_cache_folder_that_cannot_be_written_is_one_note(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GPT2_JAX_CACHE", str(blocker))
    assert compile_cache.compile_cache_dir() == str(blocker / "jax_cache")
    assert compile_cache.use_compile_cache() is None
    assert capsys.readouterr().err == (
        f"note: compiling without the compilation cache: {blocker / 'jax_cache'} cannot be written "
        "(set GPT2_JAX_CACHE elsewhere)\n"
    )
    assert compile_cache.use_compile_cache(enabled=False) is None
