"""OpenAI's TensorFlow variable names (also gpt-2-simple's and nshepperd's) <-> our params.

OpenAI's release and every fine-tune made with its code keep GPT-2's weights under `model/`: `model/wte`,
`model/h3/attn/c_attn/w` ..., conv1d weights with a leading axis of 1 (`[1, n_in, n_out]`). Our params have the same
names with the layers stacked on a leading axis, so loading is a rename, a squeeze and a stack, with a shape check
per tensor; the names and shapes come from the parameter table (`model/params.py`). Everything else in a checkpoint
(Adam slots `.../Adam`, `.../Adam_1`, `beta1_power`, `beta2_power`, `global_step`, ...) is training state of the TF
optimizer: it is ignored and reported in one line.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from tqdm import tqdm

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError
from gpt2_jax.io import atomic_write_bytes
from gpt2_jax.model.params import (
    BY_PATH,
    PARAMS,
    Param,
    empty_params,
    get_leaf,
    n_layer_of,
    parse_name,
    tensor_names,
)
from gpt2_jax.weights.tf_bundle import TFCheckpoint, write_checkpoint

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# Tensors this big get a progress bar while loading (a 124M checkpoint is ~500 MB).
PROGRESS_BYTES = 100 << 20


def stored_shapes(param: Param, config: GPT2Config) -> tuple[tuple[int, ...], ...]:
    """The shapes a checkpoint may store one tensor of `param` in: conv1d weights with or without the leading 1."""
    shape = param.tensor_shape(config)
    return (shape, (1, *shape)) if param.conv1d else (shape,)


def inferred_sizes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int] | None:
    """n_vocab, n_ctx, n_embd, n_layer read off a checkpoint's tensor shapes (None if it is not a GPT-2)."""
    wte, wpe = BY_PATH[("wte",)].openai, BY_PATH[("wpe",)].openai
    if wte not in shapes or wpe not in shapes:
        return None
    found = [parse_name("openai", name) for name in shapes]
    n_layer = len({layer for param, layer in filter(None, found) if param.per_layer})
    (n_vocab, n_embd), (n_ctx, _) = shapes[wte], shapes[wpe]
    return {"n_vocab": n_vocab, "n_ctx": n_ctx, "n_embd": n_embd, "n_layer": n_layer}


def describe_ignored(names: list[str]) -> str:
    """One line saying what a checkpoint held besides the model weights."""
    slots = [n for n in names if re.search(r"/Adam(_\d+)?$", n)]
    others = sorted(set(names) - set(slots))
    parts = [f"{len(slots)} Adam optimizer slots"] if slots else []
    if others:
        parts.append(", ".join(others[:6]) + (f" and {len(others) - 6} more" if len(others) > 6 else ""))
    return f"ignored {len(names)} non-model tensors ({'; '.join(parts)})"


def check_tf_checkpoint(ckpt: TFCheckpoint, config: GPT2Config) -> list[str]:
    """Check every model tensor's presence, dtype and shape; returns the names of the ignored (non-model) tensors."""
    expected = tensor_names("openai", config.n_layer)
    for name, (param, _) in expected.items():
        entry = ckpt.entries.get(name)
        if entry is None:
            raise UserError(
                f"{ckpt.prefix} has no tensor {name}, which a GPT-2 of {config.to_hparams()} needs; "
                "is hparams.json the one these weights were trained with?"
            )
        if entry.shape not in stored_shapes(param, config):
            raise UserError(
                f"{ckpt.prefix}: {name} has shape {list(entry.shape)} but hparams {config.to_hparams()} need "
                f"{list(param.tensor_shape(config))}; the weights and hparams.json do not match."
            )
        if entry.dtype is None or entry.dtype.name not in FLOAT_DTYPES:
            raise UserError(f"{ckpt.prefix}: {name} is stored as TF dtype {entry.dtype_code}, not a float type.")
    extra_layers = [n for n in ckpt.entries if n not in expected and parse_name("openai", n)]
    if extra_layers:
        raise UserError(
            f"{ckpt.prefix} holds {extra_layers[0]}, a layer beyond hparams' n_layer={config.n_layer}; "
            "use the hparams.json that came with these weights."
        )
    return [n for n in ckpt.entries if n not in expected]


def params_from_tf_checkpoint(ckpt: TFCheckpoint, config: GPT2Config, *, verify_crc: bool | None = None) -> dict:
    """Our params (float32 numpy) from a checkpoint, reading one tensor at a time into the stacked arrays.

    Call `check_tf_checkpoint` first. verify_crc: True checks every tensor's crc32c (seconds per 100 MB), False none,
    None only tensors up to 1 MiB (biases and gains: cheap, and they catch a mangled shard at no real cost).
    """
    params = empty_params(config)
    names = tensor_names("openai", config.n_layer)
    total = sum(ckpt.entries[n].size for n in names)
    bar = tqdm(names.items(), desc="reading weights", unit="tensor", disable=total < PROGRESS_BYTES, file=sys.stderr)
    for name, (param, layer) in bar:
        size = ckpt.entries[name].size
        array = ckpt.read(name, verify_crc=size <= 1 << 20 if verify_crc is None else verify_crc)
        # Assigning into the float32 leaf casts in place of a copy; `...` fills a top-level leaf whole.
        get_leaf(params, param.path)[... if layer is None else layer] = array.reshape(param.tensor_shape(config))
    return params


def params_to_tf_tensors(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """OpenAI-named float32 tensors (conv1d weights with their leading 1) for `write_checkpoint`."""
    tensors = {}
    n_layer = n_layer_of(params)
    for param in PARAMS:
        leaf = np.asarray(get_leaf(params, param.path), np.float32)
        for layer in param.layers(n_layer):
            tensor = leaf if layer is None else leaf[layer]
            tensors[param.name("openai", layer)] = tensor[None] if param.conv1d else tensor
    return tensors


def write_openai_checkpoint(directory: str | os.PathLike, params: Mapping[str, Any], config: GPT2Config) -> None:
    """`hparams.json`, `checkpoint` and `model.ckpt.{index,data-00000-of-00001}` as OpenAI's release lays them out.

    No `model.ckpt.meta` (a TF graph we cannot build without TF): OpenAI's and gpt-2-simple's code rebuild the graph
    in Python and restore by variable name, so they do not need it.
    """
    directory = os.fspath(directory)
    write_checkpoint(os.path.join(directory, "model.ckpt"), params_to_tf_tensors(params))
    atomic_write_bytes(os.path.join(directory, "hparams.json"), json.dumps(config.to_hparams(), indent=2).encode())
    state = 'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    atomic_write_bytes(os.path.join(directory, "checkpoint"), state.encode())
