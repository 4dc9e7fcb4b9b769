"""One entry point for every model a user can hand us: `load_model(spec)`.

`spec` is a path, whose format is detected; `scratch:NAME` (random weights of a preset's shape); a released GPT-2's
name (`gpt2`, `124M`, ...: its weights in models/ or the Hugging Face cache, releases.py); or a Hugging Face Hub id
(`openai-community/gpt2-medium`, `user/name`: hub.py), in that order of priority. Path formats:

    openai  OpenAI release dir or gpt-2-simple run dir (TF checkpoint + hparams.json), or a checkpoint prefix/.index
    hf      Hugging Face dir (model.safetensors or sharded with model.safetensors.index.json) or a .safetensors file
    native  our converted model dir (gpt2_jax.json + params/)
    run     a training run dir (gpt2_jax.json + checkpoints/): its newest complete checkpoint
    step    one step dir inside a run (runs/NAME/checkpoints/1000)

A LoRA run's checkpoint holds adapters alone: its base model (lora_run.py) is loaded and checked, and the adapters
are merged into it here, once, so every user of the params sees plain GPT-2 weights.

The config comes from the weights' own file (hparams.json, config.json, gpt2_jax.json); without one, shapes that
match a released GPT-2 exactly select that preset. The tokenizer is the model directory's own, else GPT-2's.
A Hub id is read from its folder in the local Hugging Face cache, downloaded into it first when missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax

from gpt2_jax.config import (
    DTYPES,
    PRESETS,
    SCRATCH_PREFIX,
    GPT2Config,
    get_config,
    is_scratch,
    preset_names,
    scratch_preset,
)
from gpt2_jax.console import note
from gpt2_jax.errors import UserError
from gpt2_jax.model.lora import merge
from gpt2_jax.model.params import parse_name
from gpt2_jax.model.transformer import init_params
from gpt2_jax.precision import default_dtype_choice
from gpt2_jax.tokenizers.base import Tokenizer
from gpt2_jax.tokenizers.gpt2_bpe import load_tokenizer
from gpt2_jax.weights import hub, lora_run, native, openai, releases, safetensors_io
from gpt2_jax.weights.huggingface import params_from_hf_state_dict
from gpt2_jax.weights.tf_bundle import TFCheckpoint, checkpoint_prefix

RELEASED_SIZES = ("124M", "355M", "774M", "1558M")


@dataclass(frozen=True)
class LoadedModel:
    config: GPT2Config  # architecture; dtype is the compute dtype asked for (params stay float32)
    params: dict  # our params pytree, float32 numpy or jax arrays
    tokenizer: Tokenizer  # the model's own (gpt2_jax.tokenizers.gpt2_bpe.load_tokenizer)
    source: str  # human-readable origin, e.g. "OpenAI checkpoint models/124M"
    ignored: tuple[str, ...] = ()  # names of tensors in the checkpoint that are not model weights
    directory: Path | None = None  # the model's own folder (its tokenizer, a run's gpt2_jax.json); None for scratch
    step: int | None = None  # the training step of a run's checkpoint; None for any other model


class Weights(NamedTuple):
    """What a reader returns: the model without its compute dtype and tokenizer."""

    config: GPT2Config
    params: dict  # float32
    source: str
    ignored: list[str]  # tensor names in the checkpoint that are not model weights
    tokenizer_dir: Path  # where the model's own vocabulary files would be
    step: int | None = None  # the training step of a run's checkpoint


def default_compute_dtype() -> str:
    """The first device's compute dtype by precision.py's rule: bfloat16 on TPUs and on NVIDIA GPUs from compute
    capability 8.0, float16 on older NVIDIA GPUs (T4, V100), float32 on CPUs (params stay float32 everywhere)."""
    return default_dtype_choice().dtype


def detect_format(path: Path) -> str:
    """'openai', 'hf', 'native', 'run' or 'step' for an existing path; UserError for anything else."""
    if path.is_file():
        if path.suffix == ".safetensors" or path.name.endswith(".index.json"):
            return "hf"
        if path.suffix == ".index":
            return "openai"
        if path.suffix in safetensors_io.PICKLE_SUFFIXES:
            raise safetensors_io.refuse_pickle(path)
        raise UserError(f"{path} is not a model file this loader knows (.safetensors, a TF .index, or a directory).")
    if Path(f"{path}.index").is_file():
        return "openai"  # a checkpoint prefix such as models/124M/model.ckpt
    if not path.is_dir():
        raise UserError(
            f"No model at {path}: no such file or directory, and not a released GPT-2's name (gpt2, gpt2-medium, "
            "gpt2-large, gpt2-xl or 124M, 355M, 774M, 1558M) or scratch:NAME."
        )
    if native.is_native_model(path):
        return "native"
    if native.is_run_directory(path):
        return "run"
    if (path / "params").is_dir() and native.is_run_directory(path.parent.parent):
        return "step"
    if (path / "checkpoint").is_file() or any(path.glob("*.index")):
        return "openai"
    if any(path.glob("*.safetensors")) or (path / safetensors_io.INDEX_FILE).is_file():
        return "hf"
    pickles = safetensors_io.pickle_files(path)
    if pickles:
        raise safetensors_io.refuse_pickle(pickles[0])
    raise UserError(
        f"{path} holds no model this loader knows: expected hparams.json + model.ckpt.* (OpenAI, gpt-2-simple), "
        "model.safetensors (Hugging Face) or gpt2_jax.json (converted model or training run)."
    )


def _released_config(sizes: dict[str, int], where: Path, config_file: str) -> GPT2Config:
    for name in RELEASED_SIZES:
        if all(getattr(PRESETS[name], k) == v for k, v in sizes.items()):
            return PRESETS[name]
    raise UserError(
        f"{where} has no {config_file} and its shapes {sizes} match no released GPT-2; "
        f"put the {config_file} that came with the weights beside them."
    )


def _read_openai(path: Path, verify_crc: bool | None) -> Weights:
    if path.is_dir():
        prefix = checkpoint_prefix(path)
    else:
        prefix = path.with_suffix("") if path.suffix == ".index" else path
    ckpt = TFCheckpoint(prefix)
    hparams = prefix.parent / "hparams.json"
    if hparams.is_file():
        config = GPT2Config.from_hparams_file(hparams)
    else:
        sizes = openai.inferred_sizes({n: e.shape for n, e in ckpt.entries.items()})
        if sizes is None:
            raise UserError(f"{prefix} holds no GPT-2 weights (no model/wte); is it a GPT-2 checkpoint?")
        config = _released_config(sizes, prefix.parent, "hparams.json")
    ignored = openai.check_tf_checkpoint(ckpt, config)
    params = openai.params_from_tf_checkpoint(ckpt, config, verify_crc=verify_crc)
    kind = "OpenAI checkpoint" if prefix.name == "model.ckpt" and not ignored else "TensorFlow checkpoint"
    where = prefix if prefix.name != "model.ckpt" else prefix.parent
    return Weights(config, params, f"{kind} {where}", ignored, prefix.parent)


def _read_hf(path: Path) -> Weights:
    state = safetensors_io.SafetensorsState(safetensors_io.safetensors_files(path))
    config = safetensors_io.read_hf_config(path)
    if config is None:
        shapes = {k.removeprefix("transformer."): s for k, s in state.shapes().items()}
        if "wte.weight" not in shapes or "wpe.weight" not in shapes:
            raise UserError(f"{path} holds no GPT-2 weights (no wte.weight); is it a GPT-2 model?")
        found = (parse_name("hf", k) for k in shapes)
        n_layer = len({layer for param, layer in filter(None, found) if param.per_layer})
        (n_vocab, n_embd), n_ctx = shapes["wte.weight"], shapes["wpe.weight"][0]
        sizes = {"n_vocab": n_vocab, "n_ctx": n_ctx, "n_embd": n_embd, "n_layer": n_layer}
        config = _released_config(sizes, path, "config.json")
    params = params_from_hf_state_dict(state, config, source=str(path))
    return Weights(config, params, f"Hugging Face safetensors {path}", [], path if path.is_dir() else path.parent)


def _read_run(path: Path, fmt: str) -> Weights:
    run_dir = path.parent.parent if fmt == "step" else path
    config = native.read_model_json(run_dir)
    if fmt == "step":
        steps = [path]
    else:  # newest first
        steps = [run_dir / "checkpoints" / str(s) for s in reversed(native.complete_steps(run_dir / "checkpoints"))]
    if not steps:
        raise UserError(f"Training run {run_dir} has no complete checkpoint yet; train it or pick another model.")
    # A LoRA run's base is the run's, not a checkpoint's: loaded and checked once, before any checkpoint is tried
    # (a missing base is one error, not a reason to fall back to older checkpoints).
    record = lora_run.read_record(run_dir)
    base = load_lora_base(record, run_dir) if record is not None else None
    for step_dir in steps[:-1]:
        try:
            return _read_step(run_dir, step_dir, config, record, base)
        except UserError as e:
            note(f"skipping checkpoint {step_dir}: {e}")
    return _read_step(run_dir, steps[-1], config, record, base)


def _read_step(
    run_dir: Path, step_dir: Path, config: GPT2Config, record: lora_run.LoraRecord | None, base: dict | None
) -> Weights:
    step = int(step_dir.name)
    if record is None:
        params = native.load_params(step_dir / "params", config)
        return Weights(config, params, f"training run {run_dir} at step {step}", [], run_dir, step)
    adapters = lora_run.load_adapters(step_dir, config, record)
    params = jax.device_get(merge(base, adapters, record.lora))
    source = f"LoRA run {run_dir} at step {step} (rank {record.lora.rank} on {record.base['model']}, merged)"
    return Weights(config, params, source, [], run_dir, step)


def load_lora_base(record: lora_run.LoraRecord, run: str | os.PathLike) -> dict:
    """The float32 params of a LoRA run's base model, checked to be the ones its adapters were trained on."""
    try:
        base = load_model(record.base["model"], dtype="float32", seed=int(record.base.get("seed", 0)))
    except UserError as e:
        raise lora_run.missing_base(record, run, e)
    lora_run.check_base(record, base.params, run)
    return base.params


def read_weights(path: str | os.PathLike, *, verify_crc: bool | None = None) -> Weights:
    """The weights at any supported path (see the module docstring), read and shape-checked."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "openai":
        return _read_openai(path, verify_crc)
    if fmt == "hf":
        return _read_hf(path)
    if fmt == "native":
        config = native.read_model_json(path)
        return Weights(config, native.load_params(path / "params", config), f"gpt2-jax model {path}", [], path)
    return _read_run(path, fmt)


def load_model(
    spec: str | os.PathLike, *, dtype: str | None = None, seed: int = 0, verify_crc: bool | None = None
) -> LoadedModel:
    """Load a model: a path of any supported format, a released GPT-2's name (`gpt2`, `124M`, ...: releases.py), a
    Hugging Face Hub id, or `scratch:NAME` for random weights of a preset's shape (`scratch:tiny`, `scratch:124M`).

    dtype: compute dtype (default `default_compute_dtype()`); verify_crc: see `openai.params_from_tf_checkpoint`.
    """
    dtype = dtype or default_compute_dtype()
    if dtype not in DTYPES:  # before reading gigabytes of weights
        raise UserError(f"Unknown compute dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    on_disk = os.path.exists(spec) or os.path.exists(f"{spec}.index")
    if not on_disk and is_scratch(spec):
        preset = scratch_preset(str(spec))
        config = get_config(preset, dtype=dtype)
        params = init_params(config, seed)
        return LoadedModel(config, params, load_tokenizer(None), f"{preset} with random weights (seed {seed})")
    if not on_disk and releases.release_size(str(spec)):
        spec = releases.find_release(str(spec))
        on_disk = True
    elif not on_disk and str(spec) in preset_names():
        raise UserError(
            f"{spec} is a model shape, not trained weights; name it {SCRATCH_PREFIX}{spec} for random weights of that "
            "shape, or give a model's path."
        )
    if not on_disk and hub.is_hub_id(str(spec)):
        not_found = f"No model at {spec}: no such file or directory, not a released GPT-2's name or scratch:NAME"
        weights = read_weights(hub.snapshot(str(spec), not_found))._replace(source=f"Hugging Face Hub model {spec}")
    else:
        weights = read_weights(spec, verify_crc=verify_crc)
    if weights.ignored:
        note(f"{weights.source}: {openai.describe_ignored(weights.ignored)}")
    config = weights.config.replace(dtype=dtype)
    tokenizer = load_tokenizer(weights.tokenizer_dir)
    ignored = tuple(weights.ignored)
    return LoadedModel(config, weights.params, tokenizer, weights.source, ignored, weights.tokenizer_dir, weights.step)
