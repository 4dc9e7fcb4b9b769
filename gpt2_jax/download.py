"""Download GPT-2's released weights: OpenAI's TF checkpoint (as `download_model.py` does) or the hub's safetensors.

    python -m gpt2_jax.download 124M                         # -> models/124M (also 355M, 774M, 1558M; 117M/345M)
    python -m gpt2_jax.download 124M --source huggingface    # -> models/gpt2 (model.safetensors + config.json)

OpenAI's files each stream into NAME.part, are checked against the server's size, and are renamed to NAME only
when complete; an interrupted download resumes from the .part file with an HTTP Range request. The hub's files come
through huggingface_hub (weights/hub.py) in its local-folder mode (its bookkeeping lies in models/gpt2/.cache/): it
checks each file against the hub's size and resumes a dropped connection, but a killed download starts over.
`--base_url` (or the environment variable GPT2_JAX_BASE_URL) points at a mirror: OpenAI's files are fetched from
BASE/NAME/FILE, the hub's from a mirror of the hub's API at BASE (as HF_ENDPOINT, which huggingface_hub honours when
neither is given).
"""

from __future__ import annotations

import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from gpt2_jax.cli import ArgumentParser, run_cli
from gpt2_jax.config import ALIASES
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.hints import command_for
from gpt2_jax.io import atomic_write_bytes
from gpt2_jax.tokenizers.gpt2_bpe import PACKAGED_GPT2_DIR
from gpt2_jax.weights import hub
from gpt2_jax.weights.releases import HF_NAMES

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
HF_FILES = ("config.json", "model.safetensors")
CHUNK = 1 << 20
TIMEOUT_S = 60


def model_name(name: str) -> str:
    """OpenAI's current name for a release (`117M` -> `124M`, `345M` -> `355M`; HF names accepted too)."""
    canonical = ALIASES.get(name, name)
    if canonical not in HF_NAMES:
        raise UsageError(f"Unknown GPT-2 release {name!r}; choose one of 124M, 355M, 774M, 1558M (or 117M, 345M).")
    return canonical


class _PartTooLong(Exception):
    pass


def _open(url: str, offset: int):
    request = urllib.request.Request(url, headers={"User-Agent": "gpt2-jax", "Range": f"bytes={offset}-"})
    if not offset:
        del request.headers["Range"]
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing after `offset`: the .part is complete, or longer than the file
            if e.headers.get("Content-Range") == f"bytes */{offset}":
                return None
            raise _PartTooLong from e
        raise UserError(f"Downloading {url} failed: HTTP {e.code} {e.reason}; check the name or try again later.")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"Cannot reach {url} ({reason}); check your connection or --base_url and try again.")


def _stream_into(part: Path, response, resumed: bool, offset: int, total: int | None, name: str) -> Exception | None:
    """Append the response body to `part` (or rewrite it); returns the error that cut the connection, if any."""
    with (
        open(part, "ab" if resumed else "wb") as f,
        tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=name, file=sys.stderr) as bar,
    ):
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:  # connection dropped or timed out
                chunk, error = b"", e
            else:
                error = None
            if not chunk:
                break
            f.write(chunk)
            bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    return error


def download_file(url: str, dest: Path) -> None:
    """Fetch `url` into `dest` via `dest.part`, resuming a previous partial download and checking the size."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset)
    except _PartTooLong:
        part.unlink()  # not a prefix of the file on the server: start over
        offset, response = 0, _open(url, 0)
    if response is None:
        os.replace(part, dest)
        return
    with response:
        resumed = response.status == 206
        if offset and not resumed:
            offset = 0  # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        try:
            error = _stream_into(part, response, resumed, offset, total, dest.name)
        except OSError as e:  # writing failed (full disk, read-only folder): what came so far stays in the .part
            raise UserError(
                f"Cannot write {part}: {e.strerror or e}; free disk space there and run the same command again "
                "to resume."
            )
    size = part.stat().st_size
    if error is not None or (total is not None and size != total):
        expected = f"{total:,}" if total is not None else "?"
        raise UserError(
            f"Download of {url} stopped after {size:,} of {expected} bytes; run the same command again to resume."
        )
    os.replace(part, dest)


def download(name: str, *, source: str = "openai", base_url: str | None = None, models_dir: str = "models") -> Path:
    """Download a GPT-2 release into `models_dir` and return its directory; complete files are not fetched again."""
    name = model_name(name)
    mirror = (base_url or os.environ.get("GPT2_JAX_BASE_URL") or "").rstrip("/") or None
    directory = Path(models_dir) / (name if source == "openai" else HF_NAMES[name])
    directory.mkdir(parents=True, exist_ok=True)
    for file in OPENAI_FILES if source == "openai" else HF_FILES:
        if (directory / file).is_file():
            print(f"{directory / file} already downloaded", file=sys.stderr)
        elif source == "openai":
            download_file(f"{mirror or OPENAI_BASE_URL}/{name}/{file}", directory / file)
        else:
            hub.fetch(f"openai-community/{HF_NAMES[name]}", [file], directory, endpoint=mirror)
    if source != "openai":  # the hub's tokenizer files differ in name only: ship the packaged GPT-2 vocabulary
        for file in ("encoder.json", "vocab.bpe"):
            atomic_write_bytes(directory / file, (PACKAGED_GPT2_DIR / file).read_bytes())
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog=command_for("download"), description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="124M, 355M, 774M or 1558M (old names 117M, 345M accepted)")
    parser.add_argument("--source", choices=("openai", "huggingface"), default="openai")
    parser.add_argument(
        "--base_url", default=None, help="mirror URL (default: the source's own; env GPT2_JAX_BASE_URL)"
    )
    parser.add_argument("--models_dir", default="models", help="parent directory (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    directory = download(args.model, source=args.source, base_url=args.base_url, models_dir=args.models_dir)
    print(f"{args.model} is in {directory}; try: {command_for('sample')} --model {directory}")
    return 0


if __name__ == "__main__":
    run_cli(main)
