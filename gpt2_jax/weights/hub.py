"""Models on the Hugging Face Hub, fetched with `huggingface_hub` (imported only when a Hub id is used).

    snapshot("openai-community/gpt2-medium", ...)   the model's folder in the local Hugging Face cache
    fetch("openai-community/gpt2", FILES, models/gpt2)    files into a folder of ours (download.py)

`load_model` takes a Hub id (`user/name`, or a bare `name`) for any spec that is neither an existing path nor a
released GPT-2's name (releases.py: `gpt2` is found in models/ or the cache, never fetched unasked) nor scratch:NAME.
Only the files a model needs
here are fetched (config.json, safetensors weights, GPT-2 or SentencePiece vocabulary files), never pickles.
huggingface_hub does the rest and follows its own environment: HF_HOME / HF_HUB_CACHE (where the cache is),
HF_ENDPOINT (a mirror), HF_HUB_OFFLINE=1 (the cache alone), HF_TOKEN (private and gated models). Files download with
a progress bar, a dropped connection resumes where it stopped (a Range request; huggingface_hub 2 keeps no partial
file across runs, so a killed download starts that file over), and a file whose content the cache already holds is
not fetched again; when the Hub cannot be reached, what the cache holds is used.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from pathlib import Path

from gpt2_jax.errors import UserError, root_cause, short_reason

WANTED = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "vocab.json",
    "merges.txt",
    "encoder.json",
    "vocab.bpe",
    "tokenizer.model",
]
# The Hub's rule for a repository id: an optional owner, a name; letters, digits, '-', '_', '.'; at most 96 each.
_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"(?:{_PART}/)?{_PART}")
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)


def is_hub_id(spec: str) -> bool:
    return HUB_ID.fullmatch(spec) is not None and ".." not in spec and "--" not in spec


def snapshot(repo_id: str, not_found: str) -> Path:
    """The folder holding `repo_id`'s model files, from the cache or downloaded into it.

    not_found: the start of the sentence a failure raises ("No model at X: no such file ..."), which this ends
    with why the Hub could not provide it and what to do.
    """
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=WANTED))
    except Exception as e:  # huggingface_hub's errors share no base class (HTTP, OS, offline, validation)
        raise UserError(f"{not_found}, and {why_not(repo_id, e)}.")
    if not any(folder.glob("*.safetensors")):
        raise UserError(
            f"{repo_id} on the Hugging Face Hub has no .safetensors weights (pickled PyTorch files are never loaded: "
            "they could run arbitrary code); ask its owner for a model.safetensors, or use another model."
        )
    return folder


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of `repo_id`'s newest snapshot in the local Hugging Face cache when it holds safetensors weights;
    None otherwise. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    for weights in ("model.safetensors", "model.safetensors.index.json"):
        found = try_to_load_from_cache(repo_id, weights)
        if isinstance(found, str):  # a path; None or a "known not to exist" marker otherwise
            return Path(found).parent
    return None


def why_not(repo_id: str, error: BaseException) -> str:
    """Why the Hub (or the cache) could not give `repo_id`, and what to do, for the end of a sentence."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):
        return f"{repo_id} is gated on the Hugging Face Hub: accept its terms on its page and log in (`hf auth login`)"
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"the Hugging Face Hub has no model {repo_id} (or it is private: log in with `hf auth login`); "
            "check the spelling"
        )
    if isinstance(error, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:
        return f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; unset it to download the model"
    if isinstance(error, LocalEntryNotFoundError):
        return (
            f"{repo_id} is not in the Hugging Face cache and the Hub could not be reached ({short_reason(error)}); "
            "check your connection (or HF_ENDPOINT) and try again"
        )
    return f"fetching {repo_id} from the Hugging Face Hub failed ({short_reason(error)}); try again"


def fetch(repo_id: str, files: Sequence[str], directory: Path, *, endpoint: str | None = None) -> None:
    """Download `files` of `repo_id` into `directory` (huggingface_hub's local-folder mode: resumable, and a file
    already complete there is not fetched again); `endpoint` replaces the Hub's address (a mirror)."""
    from huggingface_hub import hf_hub_download

    for file in files:
        try:
            hf_hub_download(repo_id, file, local_dir=directory, endpoint=endpoint)
        except Exception as e:  # huggingface_hub's errors share no base class (HTTP, OS, offline, validation)
            cause = root_cause(e)
            if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
                raise UserError(
                    f"Cannot write {directory / file}: {cause.strerror}; free disk space there (or make it writable) "
                    "and run the same command again to resume."
                )
            raise UserError(f"Downloading {file} of {repo_id} failed: {why_not(repo_id, e)}.")
