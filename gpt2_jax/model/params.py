"""GPT-2's parameter table: every tensor of the params pytree, its shape, and what each weight format calls it.

The pytree uses GPT-2's own names (`wte wpe h ln_1 attn c_attn c_proj ln_2 mlp c_fc ln_f`; gains `g`, biases `b`,
matrices `w` stored [in, out] as GPT-2's conv1d stores them). The layers are stacked for the scan: every leaf under
`h` has a leading L axis. This table is the one place those names and shapes are written down: the OpenAI and
Hugging Face readers and writers rename through it and check shapes against it, `count_params` sums it, the
decode layout takes its linear layers from it, and tests/test_params.py holds it equal to the Flax module's init.

A checkpoint stores each layer's tensors on their own, so a format's name is a template with `{i}` for the layer:
OpenAI's TF variable `model/h{i}/attn/c_attn/w` (conv1d weights carry a leading axis of 1 there) and Hugging Face's
key `h.{i}.attn.c_attn.weight` (hub layout; its Conv1D also stores [in, out], so no transposes). The quirks of one
format's files (HF's `transformer.` prefix, its tied `lm_head.weight` and causal-mask buffers, OpenAI's leading 1)
live beside that format's reader.

Axis legend: L n_layer, C n_ctx (positions), D n_embd, V n_vocab; 3D and 4D are multiples of D.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # only annotations: the table needs no config code at run time
    from gpt2_jax.config import GPT2Config

Format = Literal["openai", "hf"]


@dataclasses.dataclass(frozen=True)
class Param:
    path: tuple[str, ...]  # in the params pytree; under "h" for a per-layer param
    axes: tuple[str, ...]  # one tensor's shape in the legend's letters (without L)
    openai: str  # OpenAI's TF variable name, `{i}` the layer
    hf: str  # Hugging Face's key, `{i}` the layer

    @property
    def per_layer(self) -> bool:
        return self.path[0] == "h"

    @property
    def conv1d(self) -> bool:
        """A per-layer matrix: GPT-2's conv1d weight, [in, out]."""
        return self.per_layer and self.path[-1] == "w"

    def tensor_shape(self, config: GPT2Config) -> tuple[int, ...]:
        """One tensor as a checkpoint stores it: a single layer's slice of a per-layer param."""
        d = config.n_embd
        sizes = {"C": config.n_ctx, "D": d, "3D": 3 * d, "4D": 4 * d, "V": config.n_vocab}
        return tuple(sizes[axis] for axis in self.axes)

    def shape(self, config: GPT2Config) -> tuple[int, ...]:
        """The leaf's shape in the params pytree: per-layer params stacked on a leading L."""
        return (config.n_layer, *self.tensor_shape(config)) if self.per_layer else self.tensor_shape(config)

    def layers(self, n_layer: int) -> tuple[int | None, ...]:
        """The layer index of each tensor this param stands for in a checkpoint (None: one top-level tensor)."""
        return tuple(range(n_layer)) if self.per_layer else (None,)

    def name(self, fmt: Format, layer: int | None = None) -> str:
        return getattr(self, fmt).format(i=layer)


def _layer(path: str, axes: tuple[str, ...], hf: str) -> Param:
    return Param(("h", *path.split("/")), axes, f"model/h{{i}}/{path}", f"h.{{i}}.{hf}")


# In the order the forward pass uses them.
PARAMS: tuple[Param, ...] = (
    Param(("wte",), ("V", "D"), "model/wte", "wte.weight"),
    Param(("wpe",), ("C", "D"), "model/wpe", "wpe.weight"),
    _layer("ln_1/g", ("D",), "ln_1.weight"),
    _layer("ln_1/b", ("D",), "ln_1.bias"),
    _layer("attn/c_attn/w", ("D", "3D"), "attn.c_attn.weight"),
    _layer("attn/c_attn/b", ("3D",), "attn.c_attn.bias"),
    _layer("attn/c_proj/w", ("D", "D"), "attn.c_proj.weight"),
    _layer("attn/c_proj/b", ("D",), "attn.c_proj.bias"),
    _layer("ln_2/g", ("D",), "ln_2.weight"),
    _layer("ln_2/b", ("D",), "ln_2.bias"),
    _layer("mlp/c_fc/w", ("D", "4D"), "mlp.c_fc.weight"),
    _layer("mlp/c_fc/b", ("4D",), "mlp.c_fc.bias"),
    _layer("mlp/c_proj/w", ("4D", "D"), "mlp.c_proj.weight"),
    _layer("mlp/c_proj/b", ("D",), "mlp.c_proj.bias"),
    Param(("ln_f", "g"), ("D",), "model/ln_f/g", "ln_f.weight"),
    Param(("ln_f", "b"), ("D",), "model/ln_f/b", "ln_f.bias"),
)
BY_PATH: dict[tuple[str, ...], Param] = {p.path: p for p in PARAMS}
# Each layer's linear layers, (block, name) under `h`: the matrices the decode layout re-lays [out, in].
LINEARS: tuple[tuple[str, str], ...] = tuple((p.path[1], p.path[2]) for p in PARAMS if p.conv1d)


def param_shapes(config: GPT2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every leaf of the params pytree -> its shape."""
    return {p.path: p.shape(config) for p in PARAMS}


def tensor_names(fmt: Format, n_layer: int) -> dict[str, tuple[Param, int | None]]:
    """Every tensor's name in `fmt` for a GPT-2 of `n_layer` layers -> (param, layer), param by param."""
    return {param.name(fmt, layer): (param, layer) for param in PARAMS for layer in param.layers(n_layer)}


def _name_pattern(template: str) -> re.Pattern[str]:
    return re.compile(r"(\d+)".join(re.escape(part) for part in template.split("{i}")))


_PATTERNS = {fmt: [(_name_pattern(getattr(p, fmt)), p) for p in PARAMS] for fmt in ("openai", "hf")}


def parse_name(fmt: Format, name: str) -> tuple[Param, int | None] | None:
    """The (param, layer) a tensor name of `fmt` stands for, for any layer index; None if it is no GPT-2 weight."""
    for pattern, param in _PATTERNS[fmt]:
        if match := pattern.fullmatch(name):
            return param, int(match.group(1)) if param.per_layer else None
    return None


def n_layer_of(params: Mapping[str, Any]) -> int:
    """How many layers a params pytree holds: the leading axis of its per-layer leaves."""
    return np.shape(get_leaf(params, next(p.path for p in PARAMS if p.per_layer)))[0]


def get_leaf(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def empty_params(config: GPT2Config) -> dict[str, Any]:
    """Uninitialised float32 numpy params of this config, for a reader to fill one tensor at a time."""
    tree: dict[str, Any] = {}
    for param in PARAMS:
        node = tree
        for part in param.path[:-1]:
            node = node.setdefault(part, {})
        node[param.path[-1]] = np.empty(param.shape(config), np.float32)
    return tree


def count_params(config: GPT2Config) -> int:
    """Exact parameter count (head tied to `wte`): 124,439,808 for GPT-2 124M."""
    return sum(math.prod(shape) for shape in param_shapes(config).values())
