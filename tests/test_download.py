"""`python -m gpt2_jax.download` against a local HTTP server that serves the fixture in OpenAI's layout, with Range
support and injected faults (a dropped connection, then a resumed download; a server error), and against a local
stand-in for the Hugging Face Hub (hub_server.py) for `--source huggingface`."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import HubServer

from gpt2_jax.download import OPENAI_FILES, download
from gpt2_jax.errors import UserError
from gpt2_jax.tokenizers.gpt2_bpe import PACKAGED_GPT2_DIR

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny"
DATA = "model.ckpt.data-00000-of-00001"


class Server:
    """Files under `root` at /PATH; `faults[path]` is 'error' (HTTP 500) or 'drop' (send half, close; once)."""

    def __init__(self, root: Path) -> None:
        self.root, self.faults, self.requests = root, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.lstrip("/")
                server.requests.append((path, self.headers.get("Range")))
                file = server.root / path
                if server.faults.get(path) == "error":
                    return self.send_error(500, "Internal Server Error")
                if not file.is_file():
                    return self.send_error(404)
                data = file.read_bytes()
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                if start >= len(data) and start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if server.faults.pop(path, None) == "drop":
                    self.wfile.write(data[start : len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(tmp_path) -> Iterator[Server]:
    """The fixture as OpenAI's bucket lays it out: 124M/<7 files>."""
    release = tmp_path / "www" / "124M"
    shutil.copytree(FIXTURE / "openai", release)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(PACKAGED_GPT2_DIR / name, release)
    (release / "model.ckpt.meta").write_bytes(os.urandom(3000))  # a TF graph in the real release; never read
    served = Server(tmp_path / "www")
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


def _same_files(directory: Path, source: Path, names) -> None:
    for name in names:
        assert (directory / name).read_bytes() == (source / name).read_bytes(), name
    assert not list(directory.glob("*.part"))


def test_full_download_gives_a_loadable_release(server, tmp_path):
    directory = download("117M", base_url=server.url, models_dir=str(tmp_path / "models"))  # old name of 124M
    assert directory == tmp_path / "models" / "124M"
    assert sorted(p.name for p in directory.iterdir()) == sorted(OPENAI_FILES)
    _same_files(directory, server.root / "124M", OPENAI_FILES)
    from gpt2_jax.weights.loading import load_model  # imports JAX: only this test needs it

    model = load_model(directory, dtype="float32")  # byte-identical to the fixture, whose logits test_loading checks
    assert model.source == f"OpenAI checkpoint {directory}" and model.config.n_vocab == 1000


def test_dropped_connection_leaves_a_part_file_and_the_next_run_resumes(server, tmp_path):
    models = str(tmp_path / "models")
    server.faults[f"124M/{DATA}"] = "drop"
    with pytest.raises(UserError, match=r"stopped after 336,384 of 672,768 bytes; run the same command again"):
        download("124M", base_url=server.url, models_dir=models)
    directory = tmp_path / "models" / "124M"
    assert not (directory / DATA).exists() and (directory / f"{DATA}.part").stat().st_size == 336_384
    server.requests.clear()
    download("124M", base_url=server.url, models_dir=models)
    # Only what was missing is fetched again, and the data file from where it stopped.
    assert (f"124M/{DATA}", "bytes=336384-") in server.requests
    assert all(path.split("/")[1] not in ("checkpoint", "encoder.json", "hparams.json") for path, _ in server.requests)
    _same_files(directory, server.root / "124M", OPENAI_FILES)


def test_server_error_is_one_sentence_and_nothing_half_written(server, tmp_path):
    server.faults[f"124M/{DATA}"] = "error"
    with pytest.raises(UserError, match=rf"Downloading {server.url}/124M/{DATA} failed: HTTP 500") as info:
        download("124M", base_url=server.url, models_dir=str(tmp_path / "models"))
    assert "\n" not in str(info.value)
    directory = tmp_path / "models" / "124M"
    assert not (directory / DATA).exists() and not (directory / f"{DATA}.part").exists()
    assert not (directory / "model.ckpt.index").exists()  # files after the failing one were not started


def test_huggingface_source_and_the_real_command(tmp_path):
    hub = HubServer({"openai-community/gpt2": FIXTURE / "hf"})
    env = {**os.environ, "GPT2_JAX_BASE_URL": hub.url, "HF_HOME": str(tmp_path / "hf_home")}
    command = [sys.executable, "-m", "gpt2_jax.download", "gpt2", "--source", "huggingface", "--models_dir", tmp_path]
    try:
        medium = [*command[:3], "355M", *command[4:]]  # not on this hub
        failed = subprocess.run(medium, capture_output=True, text=True, env=env, timeout=120)
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    finally:
        hub.close()
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.splitlines()[-1].startswith(
        "error: Downloading config.json of openai-community/gpt2-medium failed: the Hugging Face Hub has no model"
    )
    assert result.returncode == 0, result.stderr
    directory = tmp_path / "gpt2"
    assert str(directory) in result.stdout
    _same_files(directory, FIXTURE / "hf", ("model.safetensors", "config.json"))
    _same_files(directory, PACKAGED_GPT2_DIR, ("encoder.json", "vocab.bpe"))
    assert again.returncode == 0 and f"{directory / 'model.safetensors'} already downloaded" in again.stderr
    fetched = [
        path for method, path, _ in hub.requests if method == "GET" and path.startswith("/openai-community/gpt2/")
    ]
    assert fetched == [f"/openai-community/gpt2/resolve/main/{f}" for f in ("config.json", "model.safetensors")]

    bad = subprocess.run([sys.executable, "-m", "gpt2_jax.download", "999M"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: Unknown GPT-2 release '999M'")
    assert "Traceback" not in bad.stderr
