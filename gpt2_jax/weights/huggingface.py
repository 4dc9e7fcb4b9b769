"""Hugging Face GPT-2 state dicts <-> our params: a rename, a per-layer stack and a shape check per key.

Two key layouts are found in the wild: the hub's `model.safetensors` (`wte.weight`, `h.0.attn.c_attn.weight`, ...,
causal-mask buffers `h.N.attn.bias`/`h.N.attn.masked_bias`, no head) and `save_pretrained`'s (`transformer.` prefix,
`lm_head.weight` tied to `wte.weight`). HF's Conv1D stores weights `[n_in, n_out]` like OpenAI, so no transposes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError

# Our per-layer param path -> the HF key suffix under `h.{i}.`
LAYER_KEYS: dict[tuple[str, ...], str] = {
    ("ln_1", "g"): "ln_1.weight",
    ("ln_1", "b"): "ln_1.bias",
    ("attn", "c_attn", "w"): "attn.c_attn.weight",
    ("attn", "c_attn", "b"): "attn.c_attn.bias",
    ("attn", "c_proj", "w"): "attn.c_proj.weight",
    ("attn", "c_proj", "b"): "attn.c_proj.bias",
    ("ln_2", "g"): "ln_2.weight",
    ("ln_2", "b"): "ln_2.bias",
    ("mlp", "c_fc", "w"): "mlp.c_fc.weight",
    ("mlp", "c_fc", "b"): "mlp.c_fc.bias",
    ("mlp", "c_proj", "w"): "mlp.c_proj.weight",
    ("mlp", "c_proj", "b"): "mlp.c_proj.bias",
}
TOP_KEYS: dict[tuple[str, ...], str] = {
    ("wte",): "wte.weight",
    ("wpe",): "wpe.weight",
    ("ln_f", "g"): "ln_f.weight",
    ("ln_f", "b"): "ln_f.bias",
}
# Buffers, not weights: the causal mask and its fill value, saved by older transformers versions.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every HF key of a GPT-2 of this config (hub layout) with its shape."""
    d, v = config.n_embd, config.n_vocab
    top = {"wte.weight": (v, d), "wpe.weight": (config.n_ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    layer = {
        "ln_1.weight": (d,),
        "ln_1.bias": (d,),
        "attn.c_attn.weight": (d, 3 * d),
        "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d),
        "attn.c_proj.bias": (d,),
        "ln_2.weight": (d,),
        "ln_2.bias": (d,),
        "mlp.c_fc.weight": (d, 4 * d),
        "mlp.c_fc.bias": (4 * d,),
        "mlp.c_proj.weight": (4 * d, d),
        "mlp.c_proj.bias": (d,),
    }
    for i in range(config.n_layer):
        top.update({f"h.{i}.{k}": s for k, s in layer.items()})
    return top


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
    shapes = expected_shapes(config)
    missing = [k for k in shapes if k not in weights]
    if missing:
        raise UserError(
            f"{source} is missing {len(missing)} GPT-2 weights (first: {missing[0]}) for the config "
            f"{config.to_hparams()}; is the config right for these weights?"
        )
    unexpected = sorted(set(weights) - set(shapes))
    if unexpected:
        raise UserError(
            f"{source} has weights a GPT-2 of config {config.to_hparams()} does not have "
            f"(first: {unexpected[0]}); check n_layer in the config."
        )
    for key, shape in shapes.items():
        if tuple(weights[key].shape) != shape:
            raise UserError(
                f"{source}: {key} has shape {tuple(weights[key].shape)} but the config needs {shape}; "
                "the weights and their config do not match."
            )

    def f32(x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    params: dict[str, Any] = {}
    for path, key in TOP_KEYS.items():
        _set(params, path, f32(weights[key]))
    h: dict[str, Any] = {}
    for path, suffix in LAYER_KEYS.items():
        _set(h, path, np.stack([f32(weights[f"h.{i}.{suffix}"]) for i in range(config.n_layer)]))
    params["h"] = h
    return params


def params_to_hf_state_dict(params: Mapping[str, Any], *, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Hub-layout state dict (no `transformer.` prefix, no head: transformers ties it) as numpy arrays."""
    state = {key: np.asarray(_get(params, path), dtype=dtype) for path, key in TOP_KEYS.items()}
    n_layer = np.shape(params["h"]["ln_1"]["g"])[0]
    for path, suffix in LAYER_KEYS.items():
        stacked = np.asarray(_get(params["h"], path))
        for i in range(n_layer):
            state[f"h.{i}.{suffix}"] = np.ascontiguousarray(stacked[i], dtype=dtype)
    return state


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree
