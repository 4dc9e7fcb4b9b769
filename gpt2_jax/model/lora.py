"""LoRA adapters for GPT-2's linear layers: which layers get them, their shapes and init, and merging them back.

A LoRA adapter adds `scale * x @ A @ B` beside a frozen conv1d `x @ W + b` (Hu et al. 2021), with `scale = alpha /
rank`. The adapters live in the params pytree beside the weight they adapt, stacked on the layer axis as the scan
wants them, under GPT-2's own names:

    h/attn/c_attn/lora_A [L, D, r]   h/attn/c_attn/lora_B [L, r, 3D]      (and likewise for the other targets)

A is drawn as PEFT draws it (Kaiming-uniform, bound 1/sqrt(fan_in)) and B is zero, so before the first update the
adapted model is exactly the base model. Training differentiates the adapters alone (`split` / `combine`), so the
base weights get neither gradients nor optimizer state; loading a run merges once (`merge`: W + scale * A @ B).

Targets: GPT-2 has two linear layers called `c_proj` (attention's output and the MLP's second), so our names say
which: `c_attn`, `attn.c_proj`, `c_fc`, `mlp.c_proj`. They are also suffixes of Hugging Face's module names
(`transformer.h.0.attn.c_proj`), which is how PEFT matches its `target_modules`: the PEFT export uses them as they
are. The default is PEFT's for GPT-2: `c_attn` alone.

Axis legend: L n_layer, D n_embd, r rank; In / Out a linear layer's input and output widths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from gpt2_jax.errors import UsageError
from gpt2_jax.model.params import param_shapes

if TYPE_CHECKING:
    from gpt2_jax.config import GPT2Config

Array = jax.Array
ADAPTER_NAMES = ("lora_A", "lora_B")
# Our target name -> (block, layer) under `h`; the block decides which `c_proj` is meant.
TARGETS: dict[str, tuple[str, str]] = {
    "c_attn": ("attn", "c_attn"),
    "attn.c_proj": ("attn", "c_proj"),
    "c_fc": ("mlp", "c_fc"),
    "mlp.c_proj": ("mlp", "c_proj"),
}
DEFAULT_TARGETS = "c_attn"  # PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for gpt2


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Frozen and hashable: a static argument of the jitted steps."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = (DEFAULT_TARGETS,)  # names of TARGETS, in TARGETS' order
    dropout: float = 0.0  # on the adapter's input, in training only

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapts(self, block: str, layer: str) -> bool:
        return any(TARGETS[t] == (block, layer) for t in self.targets)

    def layers(self) -> tuple[tuple[str, str], ...]:
        """(block, layer) of every adapted linear layer."""
        return tuple(TARGETS[t] for t in self.targets)

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "dropout": self.dropout}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> LoraConfig:
        targets = parse_targets(",".join(record["targets"]))
        return cls(int(record["rank"]), float(record["alpha"]), targets, float(record.get("dropout", 0.0)))


def parse_targets(text: str) -> tuple[str, ...]:
    """`--lora_targets`: comma-separated names of TARGETS, or `all`; returned in TARGETS' order."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    if names == {"all"}:
        return tuple(TARGETS)
    unknown = sorted(names - set(TARGETS))
    if unknown or not names:
        what = f"the unknown layer(s) {', '.join(unknown)}" if unknown else "no layer"
        hint = " (GPT-2 has two c_proj: attn.c_proj and mlp.c_proj)" if "c_proj" in unknown else ""
        raise UsageError(
            f"--lora_targets {text!r} names {what}{hint}; choose among {', '.join(TARGETS)} (comma-separated) or all."
        )
    return tuple(t for t in TARGETS if t in names)


def linear_shape(config: GPT2Config, block: str, layer: str) -> tuple[int, int]:
    """(In, Out) of one of GPT-2's linear layers: its conv1d weight's one-layer shape in the parameter table."""
    n_in, n_out = param_shapes(config)[("h", block, layer, "w")][1:]
    return n_in, n_out


def init_a(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """PEFT's init of A (torch's kaiming_uniform_ with a=sqrt(5)): uniform within 1/sqrt(fan_in), fan_in = In."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _tree(config: GPT2Config, lora: LoraConfig, make) -> dict[str, Any]:
    tree: dict[str, Any] = {"h": {}}
    for i, (block, layer) in enumerate(lora.layers()):
        n_in, n_out = linear_shape(config, block, layer)
        tree["h"].setdefault(block, {})[layer] = make(
            i, (config.n_layer, n_in, lora.rank), (config.n_layer, lora.rank, n_out)
        )
    return tree


def init_adapters(config: GPT2Config, lora: LoraConfig, key: Array) -> dict[str, Any]:
    """Fresh float32 adapters: A random, B zero (the adapted model starts equal to the base)."""
    keys = jax.random.split(key, len(lora.targets))
    return _tree(config, lora, lambda i, a, b: {"lora_A": init_a(keys[i], a), "lora_B": jnp.zeros(b, jnp.float32)})


def abstract_adapters(config: GPT2Config, lora: LoraConfig) -> dict[str, Any]:
    def make(_, a, b):
        return {"lora_A": jax.ShapeDtypeStruct(a, jnp.float32), "lora_B": jax.ShapeDtypeStruct(b, jnp.float32)}

    return _tree(config, lora, make)


def adapter_count(config: GPT2Config, lora: LoraConfig) -> int:
    """Trainable parameters: (In + Out) * r per adapted layer, per block."""
    return sum(config.n_layer * lora.rank * sum(linear_shape(config, *t)) for t in lora.layers())


def combine(base: Mapping[str, Any], adapters: Mapping[str, Any]) -> dict[str, Any]:
    """The one params tree the adapted forward reads: `base` with the adapters beside their weights (no copies)."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(base[key], value) if isinstance(value, Mapping) else value
    return out


def merge(base: Mapping[str, Any], adapters: Mapping[str, Any], lora: LoraConfig) -> dict[str, Any]:
    """Plain GPT-2 params in float32: every adapted `w` replaced by W + scale * A @ B, layer by layer."""
    merged = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(base))
    for block, layer in lora.layers():
        node = adapters["h"][block][layer]
        delta_LIO = jnp.einsum("LIr,LrO->LIO", node["lora_A"], node["lora_B"], precision="highest")
        merged["h"][block][layer] = dict(
            merged["h"][block][layer], w=merged["h"][block][layer]["w"] + lora.scale * delta_LIO
        )
    return merged


def freeze(base: Mapping[str, Any], compute_dtype: Any) -> Any:
    """The base params as a LoRA run holds them: the conv1d matrices in the compute dtype (the forward casts them to
    it before every matmul, so a bf16 run computes exactly as with float32 copies, at half the memory), the rest
    (embeddings, layer norms, biases) float32."""

    def cast(path: tuple, x: Any) -> Array:
        matrix = str(getattr(path[-1], "key", "")) == "w"
        return jnp.asarray(x, jnp.dtype(compute_dtype) if matrix else jnp.float32)

    return jax.tree_util.tree_map_with_path(cast, base)
