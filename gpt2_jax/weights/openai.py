"""OpenAI's TensorFlow variable names (also gpt-2-simple's and nshepperd's) <-> our params.

OpenAI's release and every fine-tune made with its code keep GPT-2's weights under `model/`: `model/wte`,
`model/h3/attn/c_attn/w` ..., conv1d weights with a leading axis of 1 (`[1, n_in, n_out]`). Our params have the same
names with the layers stacked on a leading axis, so loading is a rename, a squeeze and a stack, with a shape check
per tensor. Everything else in a checkpoint (Adam slots `.../Adam`, `.../Adam_1`, `beta1_power`, `beta2_power`,
`global_step`, ...) is training state of the TF optimizer: it is ignored and reported in one line.
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
from gpt2_jax.weights.tf_bundle import TFCheckpoint, write_checkpoint

# Our per-layer param path -> the TF variable under `model/h{i}/`.
LAYER_VARS: dict[tuple[str, ...], str] = {
    ("ln_1", "g"): "ln_1/g",
    ("ln_1", "b"): "ln_1/b",
    ("attn", "c_attn", "w"): "attn/c_attn/w",
    ("attn", "c_attn", "b"): "attn/c_attn/b",
    ("attn", "c_proj", "w"): "attn/c_proj/w",
    ("attn", "c_proj", "b"): "attn/c_proj/b",
    ("ln_2", "g"): "ln_2/g",
    ("ln_2", "b"): "ln_2/b",
    ("mlp", "c_fc", "w"): "mlp/c_fc/w",
    ("mlp", "c_fc", "b"): "mlp/c_fc/b",
    ("mlp", "c_proj", "w"): "mlp/c_proj/w",
    ("mlp", "c_proj", "b"): "mlp/c_proj/b",
}
TOP_VARS: dict[tuple[str, ...], str] = {
    ("wte",): "wte",
    ("wpe",): "wpe",
    ("ln_f", "g"): "ln_f/g",
    ("ln_f", "b"): "ln_f/b",
}
SCOPE = "model/"
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# Tensors this big get a progress bar while loading (a 124M checkpoint is ~500 MB).
PROGRESS_BYTES = 100 << 20


def layer_shapes(config: GPT2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shape of each per-layer param in one layer (conv1d weights without OpenAI's leading 1)."""
    d = config.n_embd
    shapes = {("ln_1", "g"): (d,), ("ln_1", "b"): (d,), ("ln_2", "g"): (d,), ("ln_2", "b"): (d,)}
    for path, (n_in, n_out) in {
        ("attn", "c_attn"): (d, 3 * d),
        ("attn", "c_proj"): (d, d),
        ("mlp", "c_fc"): (d, 4 * d),
        ("mlp", "c_proj"): (4 * d, d),
    }.items():
        shapes[(*path, "w")] = (n_in, n_out)
        shapes[(*path, "b")] = (n_out,)
    return shapes


def top_shapes(config: GPT2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    d = config.n_embd
    return {("wte",): (config.n_vocab, d), ("wpe",): (config.n_ctx, d), ("ln_f", "g"): (d,), ("ln_f", "b"): (d,)}


def model_variables(config: GPT2Config) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """Every TF variable name of a GPT-2 of this config -> (our param path, layer index or None)."""
    names = {SCOPE + var: (path, None) for path, var in TOP_VARS.items()}
    for i in range(config.n_layer):
        names.update({f"{SCOPE}h{i}/{var}": (path, i) for path, var in LAYER_VARS.items()})
    return names


def inferred_sizes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int] | None:
    """n_vocab, n_ctx, n_embd, n_layer read off a checkpoint's tensor shapes (None if it is not a GPT-2)."""
    if f"{SCOPE}wte" not in shapes or f"{SCOPE}wpe" not in shapes:
        return None
    layers = {int(m.group(1)) for name in shapes if (m := re.match(rf"{SCOPE}h(\d+)/", name))}
    (n_vocab, n_embd), (n_ctx, _) = shapes[f"{SCOPE}wte"], shapes[f"{SCOPE}wpe"]
    return {"n_vocab": n_vocab, "n_ctx": n_ctx, "n_embd": n_embd, "n_layer": len(layers)}


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
    expected = model_variables(config)
    layer, top = layer_shapes(config), top_shapes(config)
    for name, (path, index) in expected.items():
        entry = ckpt.entries.get(name)
        if entry is None:
            raise UserError(
                f"{ckpt.prefix} has no tensor {name}, which a GPT-2 of {config.to_hparams()} needs; "
                "is hparams.json the one these weights were trained with?"
            )
        shape = layer[path] if index is not None else top[path]
        allowed = (shape, (1, *shape)) if len(shape) == 2 and index is not None else (shape,)  # conv1d's leading 1
        if entry.shape not in allowed:
            raise UserError(
                f"{ckpt.prefix}: {name} has shape {list(entry.shape)} but hparams {config.to_hparams()} need "
                f"{list(shape)}; the weights and hparams.json do not match."
            )
        if entry.dtype is None or entry.dtype.name not in FLOAT_DTYPES:
            raise UserError(f"{ckpt.prefix}: {name} is stored as TF dtype {entry.dtype_code}, not a float type.")
    extra_layers = [n for n in ckpt.entries if n not in expected and re.match(rf"{SCOPE}h\d+/[\w/]+/[wbg]$", n)]
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
    layer, top = layer_shapes(config), top_shapes(config)
    params: dict[str, Any] = {}
    h: dict[str, Any] = {}
    for path, shape in layer.items():
        _set(h, path, np.empty((config.n_layer, *shape), np.float32))
    params["h"] = h
    names = model_variables(config)
    total = sum(ckpt.entries[n].size for n in names)
    bar = tqdm(names.items(), desc="reading weights", unit="tensor", disable=total < PROGRESS_BYTES, file=sys.stderr)
    for name, (path, index) in bar:
        size = ckpt.entries[name].size
        array = ckpt.read(name, verify_crc=size <= 1 << 20 if verify_crc is None else verify_crc)
        if index is None:
            _set(params, path, np.asarray(array, np.float32).reshape(top[path]))
        else:
            _get(h, path)[index] = array.reshape(layer[path])  # casts to float32 in place of a copy
    return params


def params_to_tf_tensors(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """OpenAI-named float32 tensors (conv1d weights with their leading 1) for `write_checkpoint`."""
    tensors = {SCOPE + var: np.asarray(_get(params, path), np.float32) for path, var in TOP_VARS.items()}
    for path, var in LAYER_VARS.items():
        stacked = np.asarray(_get(params["h"], path), np.float32)
        for i in range(stacked.shape[0]):
            tensors[f"{SCOPE}h{i}/{var}"] = stacked[i][None] if path[-1] == "w" else stacked[i]
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


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree
