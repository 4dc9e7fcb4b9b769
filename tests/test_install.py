"""The package as pip installs it: a wheel built from this tree (offline, with the test environment's setuptools)
carries every subpackage, the `gpt2-jax` command, the demo corpus, the vocabulary and the LICENSE, and declares
the requirements pyproject.toml and requirements.txt agree on. Unpacked into a folder of its own, it trains in an
empty directory on the corpus it carries, and `bench` says where the benchmarks live."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "gpt2_jax", "data/shakespeare")


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("-r")]


def test_requirements_txt_is_pyprojects_runtime_list():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert requirement_lines(ROOT / "requirements.txt") == project["dependencies"]
    assert "-r requirements.txt" in (ROOT / "requirements-test.txt").read_text(encoding="utf-8")
    assert project["requires-python"] == ">=3.11"  # jax 0.10.2 and flax 0.12.8 need 3.11
    for name in ("jax", "flax", "orbax-checkpoint"):  # 0.x releases that break APIs we lean on
        (spec,) = [d for d in project["dependencies"] if d.startswith(name + ">")]
        assert ",<" in spec, f"{spec}: give it a ceiling"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of this tree, built from a copy of the files it is made of (the tree itself stays untouched)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    ignore = shutil.ignore_patterns("__pycache__", "*.cache", "*.tmp-*")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip_wheel, "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (built,) = out.glob("gpt2_jax-*.whl")
    return built


def test_wheel_holds_the_package_the_command_and_the_corpus(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in (ROOT / "gpt2_jax").rglob("__init__.py"):  # a subpackage left out of pyproject's list fails here
        assert init.relative_to(ROOT).as_posix() in names
    corpus = {f"gpt2_jax/corpus/shakespeare/{p.name}" for p in (ROOT / "data" / "shakespeare").glob("*.txt")}
    assert len(corpus) == 11 and corpus <= names
    assert not any(n.endswith(".cache") or n.startswith(("tests/", "benchmarks/", "data/")) for n in names)
    assert {"gpt2_jax/tokenizers/vocab/gpt2/encoder.json", "gpt2_jax/tokenizers/vocab/gpt2/vocab.bpe"} <= names
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{dist_info}/licenses/LICENSE" in names
    with zipfile.ZipFile(wheel) as z:
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
        metadata = email.message_from_bytes(z.read(f"{dist_info}/METADATA"))
    assert "gpt2-jax = gpt2_jax.commands:run" in entry_points
    assert metadata["Requires-Python"] == ">=3.11" and metadata["License-Expression"] == "MIT"
    assert {"cuda", "cuda12", "cuda13", "tpu", "wandb"} <= set(metadata.get_all("Provides-Extra"))
    requires = metadata.get_all("Requires-Dist")
    assert 'jax[cuda13]<0.13,>=0.10.2; extra == "cuda13"' in requires
    assert any(r.startswith("tensorboardX") for r in requires) and any(r.startswith("huggingface") for r in requires)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked as pip would into site-packages (its dependencies are this environment's)."""
    site = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheel).extractall(site)
    return site


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), GPT2_JAX_CACHE=str(cwd / "cache"), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "gpt2_jax", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_installed_command_trains_on_its_own_corpus_in_an_empty_folder(installed, tmp_path):
    flags = ["--init", "scratch:tiny", "--steps", "2", "--batch_size", "2", "--seq_len", "16", "--log_every", "1"]
    done = run_installed(installed, tmp_path, "train", *flags, "--sample_num", "0", "--val_batches", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"dataset: {installed / 'gpt2_jax' / 'corpus' / 'shakespeare'} (11 files)" in done.stdout + done.stderr
    assert (tmp_path / "runs" / "run1" / "metrics.jsonl").is_file()


def test_bench_from_an_installed_wheel_says_where_the_suite_lives(installed, tmp_path):
    done = run_installed(installed, tmp_path, "bench", "--suite", "quick")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: The benchmark suite is not installed with the package: it lives in")
