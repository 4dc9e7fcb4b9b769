"""OpenAI's released GPT-2s by the names the ecosystem gives them, and where their weights are found here.

`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` (Hugging Face's names) and `124M`, `355M`, `774M`, `1558M` (OpenAI's,
with the older `117M`, `345M`) mean the trained weights, as they do in transformers and in OpenAI's scripts. They are
looked for, in this order:

    models/124M              where `download 124M` puts OpenAI's files
    models/gpt2              where `download 124M --source huggingface` puts the Hub's
    the Hugging Face cache   openai-community/gpt2 (or the older id gpt2), as transformers or `hf download` left it

and are never fetched on their own: a download of up to 6 GB is the user's choice, so a release that is not here is
one sentence naming the command that gets it. Random weights of a release's shape are `scratch:gpt2` (config.py).
"""

from __future__ import annotations

from pathlib import Path

from gpt2_jax.config import ALIASES, SCRATCH_PREFIX
from gpt2_jax.errors import UserError
from gpt2_jax.hints import command_for
from gpt2_jax.weights import hub

HF_NAMES = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}
MODELS_DIR = Path("models")


def release_size(name: str) -> str | None:
    """OpenAI's size name (`124M`, ...) of the release `name` names, or None when it names none."""
    size = ALIASES.get(name, name)
    return size if size in HF_NAMES else None


def hub_ids(size: str) -> list[str]:
    return [f"openai-community/{HF_NAMES[size]}", HF_NAMES[size]]


def find_release(name: str) -> Path:
    """The folder holding release `name`'s weights (see the module docstring), or UserError saying how to get it."""
    size = release_size(name)
    assert size is not None, name
    for folder in (MODELS_DIR / size, MODELS_DIR / HF_NAMES[size]):
        if folder.is_dir() and any(folder.iterdir()):
            return folder
    for repo_id in hub_ids(size):
        cached = hub.cached_snapshot(repo_id)
        if cached is not None:
            return cached
    raise UserError(
        f"{name} names OpenAI's released GPT-2 {size}, whose weights are not here (looked in {MODELS_DIR / size}, "
        f"{MODELS_DIR / HF_NAMES[size]} and the Hugging Face cache); get them with `{command_for('download')} {size}`, "
        f"or name {SCRATCH_PREFIX}{name} for random weights of its shape."
    )
