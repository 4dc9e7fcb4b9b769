"""Hugging Face Hub ids wherever a model is taken (`load_model`: sample.py --model, train.py --init, convert,
evaluate): fetched into the local Hugging Face cache from a local stand-in for the Hub (hub_server.py), resumed
after a dropped connection, then read offline; a pre-filled cache serves sample.py offline; local paths and presets keep
priority; an id that is nowhere is one sentence.

The loads run in fresh processes: huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hub_server import HubServer

from gpt2_jax import convert
from gpt2_jax.errors import UserError
from gpt2_jax.sampling.sampler import Sampler
from gpt2_jax.weights.hub import is_hub_id
from gpt2_jax.weights.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny"
REPO = "someone/tiny-gpt2"
NEEDED = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "encoder.json", "vocab.bpe"}
LOADER = """
import json, sys
from gpt2_jax.errors import UserError
from gpt2_jax.weights.loading import load_model
for spec in sys.argv[1:]:
    try:
        model = load_model(spec)
        print(json.dumps({"source": model.source, "wte": model.params["wte"][:3, :4].tolist()}))
    except UserError as e:
        print(json.dumps({"error": str(e)}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The `tiny` preset exported with `convert --to hf`, as a user would push it to the Hub."""
    out = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    assert convert.main(["scratch:tiny", str(out), "--to", "hf"]) == 0
    return out


@pytest.fixture
def hub(exported):
    server = HubServer({REPO: exported})
    yield server
    server.close()


def load_in_a_new_process(hf_home: Path, *specs: str, **env: str) -> list[dict]:
    environment = {**os.environ, "HF_HOME": str(hf_home), "JAX_PLATFORMS": "cpu", **env}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, *specs], capture_output=True, text=True, env=environment, cwd=ROOT, timeout=900
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def wte_corner(directory: Path) -> list:
    return np.asarray(load_model(directory).params["wte"])[:3, :4].tolist()


def fetched(server: HubServer) -> set[str]:
    return {path.rsplit("/", 1)[1] for method, path, _ in server.requests if method == "GET" and "/resolve/" in path}


def test_a_hub_id_is_downloaded_into_the_cache_once_then_read_offline(hub, exported, tmp_path):
    online = load_in_a_new_process(tmp_path, REPO, "someone/missing", HF_ENDPOINT=hub.url)
    assert online[0] == {"source": f"Hugging Face Hub model {REPO}", "wte": wte_corner(exported)}
    assert online[1]["error"].startswith(
        "No model at someone/missing: no such file or directory, not a released GPT-2's name or scratch:NAME, and the "
        "Hugging Face Hub has no "
        "model someone/missing"
    )
    [snapshot] = (tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots").iterdir()
    assert {p.name for p in snapshot.iterdir()} == NEEDED  # never the card, the generation config or tokenizer.json
    assert fetched(hub) <= NEEDED and len(hub.requests) <= 3 * len(NEEDED) + 6

    hub.requests.clear()
    offline = load_in_a_new_process(tmp_path, REPO, "someone/other", HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="1")
    assert offline[0]["wte"] == wte_corner(exported) and hub.requests == []
    assert offline[1]["error"].endswith("someone/other is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                                        "unset it to download the model.")  # fmt: skip


def test_a_dropped_connection_resumes_where_it_stopped(hub, exported, tmp_path):
    size = (exported / "model.safetensors").stat().st_size
    hub.faults[(REPO, "model.safetensors")] = "drop"  # the connection breaks 1 kB before the end
    [loaded] = load_in_a_new_process(tmp_path, REPO, HF_ENDPOINT=hub.url)
    assert loaded["wte"] == wte_corner(exported)
    first, resumed = [r for method, path, r in hub.requests if method == "GET" and path.endswith("/model.safetensors")]
    assert first is None and re.fullmatch(r"bytes=\d+-", resumed) and 0 < int(resumed[6:-1]) < size


def prefill_cache(hf_home: Path, repo: str, files: list[Path]) -> None:
    """The cache as huggingface_hub leaves it after a download: refs/main names a snapshot holding the files."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files:
        shutil.copy(file, snapshot / file.name)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)


def test_sample_cli_takes_a_hub_id_from_a_prefilled_cache_offline(exported, tmp_path):
    prefill_cache(tmp_path, REPO, [exported / name for name in sorted(NEEDED)])
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "sample.py", "--model", REPO, "--prompt", "Hello", "--length", "6", "--temperature", "0"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr
    [greedy] = Sampler.from_model(load_model(exported)).generate("Hello", length=6, temperature=0)
    assert result.stdout == f"{'=' * 40} SAMPLE 1 {'=' * 40}\n{greedy[0]}\n{'=' * 80}\n"


def test_local_paths_and_presets_keep_priority_over_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURE / "hf", tmp_path / "someone" / "tiny-gpt2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were the Hub asked, this would fail
    assert load_model(REPO).source == f"Hugging Face safetensors {REPO}"
    assert load_model("scratch:tiny").source.startswith("tiny with random weights")
    with pytest.raises(UserError, match="names OpenAI's released GPT-2 124M"):
        load_model("gpt2")  # a release's name: its weights in models/ or the cache, never random, never fetched
    assert all(map(is_hub_id, ["gpt2", "openai-community/gpt2-medium", "user/name", "distilgpt2", "a.b_c-d/e1"]))
    assert not any(map(is_hub_id, ["./x", "/abs/model", "runs/a/b", "runs/", "x--y", "a..b", "-x", "x.", ""]))
