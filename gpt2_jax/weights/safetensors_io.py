"""Hugging Face safetensors weights: a model directory, a single file, or shards with an index; read and written
with `safetensors.numpy` (no torch). The key layouts and the rename live in `huggingface.py`.

Reading is lazy: the state dict handed to `huggingface` holds tensors that know their shape from the file header and
read their bytes only when converted, so every shape is checked before anything is read and the params are filled
one tensor at a time. Pickled PyTorch files are refused, never unpickled: loading a pickle runs
whatever code it carries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gpt2_jax.config import GPT2Config, naming_the_file
from gpt2_jax.errors import UserError
from gpt2_jax.io import atomic_write_bytes
from gpt2_jax.weights.huggingface import params_to_hf_state_dict

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.float16}


def refuse_pickle(path: Path) -> UserError:
    return UserError(
        f"{path} is a pickled PyTorch file, which could run arbitrary code when loaded, so it is not read; get a "
        "model.safetensors instead (the Hugging Face hub has one for every GPT-2, or run "
        "GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(OUT) where you trust the file)."
    )


def pickle_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def safetensors_files(path: Path) -> list[Path]:
    """The .safetensors file(s) a path stands for: a file, an index's shards, or a directory's model."""
    if path.is_file() and path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a safetensors index (no readable weight_map: {e}); download it again.")
        files = [path.parent / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise UserError(f"Shard {file.name} listed in {path} is missing; download every shard the index names.")
        return files
    if path.is_file():
        return [path]
    if (path / INDEX_FILE).is_file():
        return safetensors_files(path / INDEX_FILE)
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise UserError(f"{path} holds {len(found)} .safetensors files but no {INDEX_FILE}; name the file to load.")
    raise UserError(f"{path} has no .safetensors weights.")


class _LazyTensor:
    """A tensor in a safetensors file: shape from the header, bytes read on conversion to an array."""

    def __init__(self, file: Path, key: str, shape: tuple[int, ...]) -> None:
        self.file, self.key, self.shape = file, key, shape

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = _open(self.file, lambda f: f.get_tensor(self.key))
        return array if dtype is None else array.astype(dtype, copy=False)


def _open(file: Path, use: Any) -> Any:
    try:
        with safe_open(file, framework="numpy") as f:
            return use(f)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({e}); download or copy it again.")


class SafetensorsState(Mapping[str, _LazyTensor]):
    """The union of the tensors of one or more safetensors files, keyed as stored."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.tensors: dict[str, _LazyTensor] = {}
        for file in files:
            headers = _open(file, lambda f: {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            self.tensors.update({k: _LazyTensor(file, k, shape) for k, shape in headers.items()})

    def __getitem__(self, key: str) -> _LazyTensor:
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}


def read_hf_config(path: Path) -> GPT2Config | None:
    """The config.json beside the weights (None if there is none)."""
    directory = path if path.is_dir() else path.parent
    file = directory / "config.json"
    if not file.is_file():
        return None
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); restore it from the model's download.")
    with naming_the_file(file):
        return GPT2Config.from_hf_config(hf)


def write_safetensors_model(
    directory: str | os.PathLike,
    params: Mapping[str, Any],
    config: GPT2Config,
    *,
    dtype: str = "float32",
    eot_id: int | None = None,
) -> None:
    """`model.safetensors` (hub layout, head tied) + `config.json`, loadable by `GPT2LMHeadModel.from_pretrained`.

    eot_id: the tokenizer's end-of-text id, config.json's bos/eos token (None: the model names none, as when its
    vocabulary is too small to hold GPT-2's 50256). `dtype` is the stored dtype (transformers 5 reads `dtype`).
    """
    directory = Path(directory)
    state = params_to_hf_state_dict(params, dtype=NUMPY_DTYPES[dtype])
    tmp = directory / f".{SINGLE_FILE}.tmp"
    save_file(state, tmp, metadata={"format": "pt"})  # transformers checks the format tag
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the safetensors writer creates files private to the owner
    os.replace(tmp, directory / SINGLE_FILE)
    hf_config = {**config.to_hf_config(), "bos_token_id": eot_id, "eos_token_id": eot_id, "dtype": dtype}
    atomic_write_bytes(directory / "config.json", (json.dumps(hf_config, indent=2) + "\n").encode())
