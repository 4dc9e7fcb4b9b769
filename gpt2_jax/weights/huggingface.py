"""Hugging Face GPT-2 state dicts <-> our params: a rename, a per-layer stack and a shape check per key.

Two key layouts are found in the wild: the hub's `model.safetensors` (`wte.weight`, `h.0.attn.c_attn.weight`, ...,
causal-mask buffers `h.N.attn.bias`/`h.N.attn.masked_bias`, no head) and `save_pretrained`'s (`transformer.` prefix,
`lm_head.weight` tied to `wte.weight`). HF's Conv1D stores weights `[n_in, n_out]` like OpenAI, so no transposes.
The per-tensor names and shapes come from the parameter table (`model/params.py`); the layouts' quirks are here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError
from gpt2_jax.model.params import PARAMS, empty_params, get_leaf, n_layer_of, tensor_names

# Buffers, not weights: the causal mask and its fill value, saved by older transformers versions.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def strip_layout(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Normalise either layout to hub keys; returns (weights, names of ignored entries)."""
    weights, ignored = {}, []
    for key, value in state.items():
        name = key.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith(IGNORED_SUFFIXES):
            ignored.append(key)
            continue
        weights[name] = value
    return weights, ignored


def params_from_hf_state_dict(state: Mapping[str, Any], config: GPT2Config, *, source: str = "checkpoint") -> dict:
    """Our params (float32 numpy arrays) from a HF GPT-2 state dict in either key layout.

    Raises UserError naming the first missing, unexpected or mis-shaped key. An `lm_head.weight` that differs from
    `wte.weight` is refused: GPT-2's head is tied, and silently dropping a trained head would change the model.
    """
    weights, _ = strip_layout(state)
    if "lm_head.weight" in state or "transformer.lm_head.weight" in state:
        head = np.asarray(state.get("lm_head.weight", state.get("transformer.lm_head.weight")))
        if "wte.weight" in weights and not np.array_equal(head, np.asarray(weights["wte.weight"])):
            raise UserError(f"{source} has an lm_head.weight different from wte.weight; GPT-2 ties them.")
    names = tensor_names("hf", config.n_layer)
    missing = [k for k in names if k not in weights]
    if missing:
        raise UserError(
            f"{source} is missing {len(missing)} GPT-2 weights (first: {missing[0]}) for the config "
            f"{config.to_hparams()}; is the config right for these weights?"
        )
    unexpected = sorted(set(weights) - set(names))
    if unexpected:
        raise UserError(
            f"{source} has weights a GPT-2 of config {config.to_hparams()} does not have "
            f"(first: {unexpected[0]}); check n_layer in the config."
        )
    for key, (param, _) in names.items():
        shape = param.tensor_shape(config)
        if tuple(weights[key].shape) != shape:
            raise UserError(
                f"{source}: {key} has shape {tuple(weights[key].shape)} but the config needs {shape}; "
                "the weights and their config do not match."
            )
    params = empty_params(config)
    for key, (param, layer) in names.items():  # a lazy tensor reads its bytes here, one at a time
        get_leaf(params, param.path)[... if layer is None else layer] = np.asarray(weights[key], np.float32)
    return params


def params_to_hf_state_dict(params: Mapping[str, Any], *, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Hub-layout state dict (no `transformer.` prefix, no head: transformers ties it) as numpy arrays."""
    state = {}
    n_layer = n_layer_of(params)
    for param in PARAMS:
        leaf = np.asarray(get_leaf(params, param.path))
        for layer in param.layers(n_layer):
            state[param.name("hf", layer)] = np.ascontiguousarray(leaf if layer is None else leaf[layer], dtype=dtype)
    return state
