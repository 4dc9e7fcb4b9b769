"""GPT-2 model configuration: one frozen, hashable dataclass and the named presets.

Field names follow OpenAI's `hparams.json` (`n_vocab, n_ctx, n_embd, n_head, n_layer`) so a release directory's
file maps onto it one to one. Being frozen and hashable, a config can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

from gpt2_jax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    layer_norm_epsilon: float = 1e-5
    # How the model computes, not what it is: none of these change the parameters.
    dtype: str = "float32"  # compute dtype; params stay float32
    attention: str = "auto"  # 'auto': cuDNN's fused kernel on GPUs that have it (sm80+) in bf16/fp16, else XLA
    remat: bool = False  # recompute each block's activations in the backward pass (saves memory)
    scan_unroll: int = 1  # layers per scan iteration; n_layer unrolls the stack completely

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"Model config field {name}={value!r} must be a positive integer.")
        if self.n_embd % self.n_head:
            raise UserError(
                f"Model config has n_embd={self.n_embd} not divisible by n_head={self.n_head}; "
                "each attention head needs an equal share of the embedding."
            )
        if self.dtype not in DTYPES:
            raise UserError(f"Unknown compute dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}.")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(
                f"Unknown attention implementation {self.attention!r}; "
                f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}."
            )
        if not (self.layer_norm_epsilon > 0):
            raise UserError(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}.")
        if not (1 <= self.scan_unroll):
            raise UserError(f"scan_unroll must be at least 1, got {self.scan_unroll!r}.")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes: Any) -> GPT2Config:
        return dataclasses.replace(self, **changes)

    # --- OpenAI hparams.json --------------------------------------------------------------------------------
    def to_hparams(self) -> dict[str, int]:
        """The architecture as OpenAI's `hparams.json` writes it."""
        return {name: getattr(self, name) for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any], **overrides: Any) -> GPT2Config:
        if not isinstance(hparams, dict):
            raise UserError(f"hparams must be a JSON object of sizes, got a {type(hparams).__name__}.")
        missing = [k for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer") if k not in hparams]
        if missing:
            raise UserError(f"hparams are missing {', '.join(missing)}; a GPT-2 hparams.json names all five sizes.")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hparams.items() if k in fields}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_hparams_file(cls, path: str | os.PathLike[str], **overrides: Any) -> GPT2Config:
        try:
            with open(path, encoding="utf-8") as f:
                hparams = json.load(f)
        except FileNotFoundError:
            raise UserError(f"No hparams file at {path}; a model directory needs hparams.json or config.json.")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); restore it from the original model download.")
        with naming_the_file(path):
            return cls.from_hparams(hparams, **overrides)

    # --- Hugging Face config.json ---------------------------------------------------------------------------
    def to_hf_config(self) -> dict[str, Any]:
        """The architecture as Hugging Face's config.json spells it. The special-token ids belong to the tokenizer,
        not the architecture: the export adds them (weights/safetensors_io.py), inside the model's vocabulary."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.n_vocab,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_layer": self.n_layer,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
        }

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> GPT2Config:
        if not isinstance(hf, dict):
            raise UserError(f"A Hugging Face config must be a JSON object, got a {type(hf).__name__}.")
        if hf.get("model_type", "gpt2") != "gpt2":
            raise UserError(f"config.json describes a {hf.get('model_type')!r} model, not GPT-2.")
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(
                f"config.json asks for activation {hf['activation_function']!r}; "
                "only GPT-2's tanh-approximated GELU is supported."
            )
        if (
            hf.get("scale_attn_by_inverse_layer_idx")
            or hf.get("reorder_and_upcast_attn")
            or not hf.get("scale_attn_weights", True)
        ):
            raise UserError(
                "config.json changes GPT-2's attention scaling (scale_attn_weights / scale_attn_by_inverse_layer_idx "
                "/ reorder_and_upcast_attn); only the original GPT-2 attention is supported."
            )
        if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
            raise UserError("config.json sets n_inner to something other than 4 * n_embd, which GPT-2 never does.")
        hparams = {
            "n_vocab": hf.get("vocab_size"),
            "n_ctx": hf.get("n_positions", hf.get("n_ctx")),
            "n_embd": hf.get("n_embd"),
            "n_head": hf.get("n_head"),
            "n_layer": hf.get("n_layer"),
            "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
        }
        return cls.from_hparams({k: v for k, v in hparams.items() if v is not None}, **overrides)


@contextlib.contextmanager
def naming_the_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """Prefix a config error raised inside with the file it came from: the user has to fix that file."""
    try:
        yield
    except UserError as e:
        if str(path) in str(e):
            raise
        raise UserError(f"{path}: {e}", exit_code=e.exit_code) from None


_GPT2 = dict(n_vocab=50257, n_ctx=1024)
PRESETS: dict[str, GPT2Config] = {
    "124M": GPT2Config(**_GPT2, n_embd=768, n_head=12, n_layer=12),
    "355M": GPT2Config(**_GPT2, n_embd=1024, n_head=16, n_layer=24),
    "774M": GPT2Config(**_GPT2, n_embd=1280, n_head=20, n_layer=36),
    "1558M": GPT2Config(**_GPT2, n_embd=1600, n_head=25, n_layer=48),
    # Small shapes for demos, tests and CPU benchmarks; GPT-2's vocabulary so the real tokenizer works.
    "mini": GPT2Config(**_GPT2, n_embd=384, n_head=6, n_layer=6),
    "tiny": GPT2Config(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2),
}
ALIASES = {
    "117M": "124M",
    "gpt2": "124M",
    "345M": "355M",
    "gpt2-medium": "355M",
    "gpt2-large": "774M",
    "gpt2-xl": "1558M",
}


# `scratch:NAME` names a preset's shape with random weights, wherever a model is named (`--init`, `--model`): a bare
# `gpt2` or `124M` means OpenAI's trained weights, as it does everywhere else in the ecosystem.
SCRATCH_PREFIX = "scratch:"


def preset_names() -> list[str]:
    return list(PRESETS) + list(ALIASES)


def is_scratch(spec: str | os.PathLike[str] | None) -> bool:
    return spec is not None and str(spec).startswith(SCRATCH_PREFIX)


def scratch_preset(spec: str) -> str:
    """The preset named by `scratch:NAME` (checked: an unknown NAME is one sentence listing the known ones)."""
    name = spec[len(SCRATCH_PREFIX) :]
    if ALIASES.get(name, name) not in PRESETS:
        names = ", ".join(SCRATCH_PREFIX + n for n in preset_names())
        raise UserError(f"Unknown model shape {spec!r} for random weights; choose one of {names}.")
    return name


def get_config(name: str, **overrides: Any) -> GPT2Config:
    """A preset by OpenAI's or Hugging Face's name (`124M`, `117M`, `gpt2`, ..., `gpt2-xl`) or `mini`/`tiny`."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise UserError(f"Unknown model preset {name!r}; choose one of {', '.join(preset_names())}.")
    return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]
