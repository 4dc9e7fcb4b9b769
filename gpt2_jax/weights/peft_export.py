"""A LoRA run's adapters as a Hugging Face PEFT adapter: `adapter_model.safetensors` + `adapter_config.json`.

PEFT loads it onto transformers' `GPT2LMHeadModel` of the base model (`PeftModel.from_pretrained(base, OUT)`) and
computes what our adapted forward does (tested to 1e-4 on the logits). The layout PEFT expects:

    base_model.model.transformer.h.{i}.{block}.{layer}.lora_A.weight   [r, In]    (ours: .../lora_A [L, In, r])
    base_model.model.transformer.h.{i}.{block}.{layer}.lora_B.weight   [Out, r]   (ours: .../lora_B [L, r, Out])

PEFT's adapters are torch `nn.Linear`s, which store [out, in]: each layer's slice is transposed. GPT-2's own layers
are transformers' `Conv1D`, which stores its weight [in, out] as we do: `fan_in_fan_out: true` tells PEFT so (it
transposes the delta when merging). `target_modules` are our target names as they are (`c_attn`, `attn.c_proj`,
...): PEFT matches a module when its full name ends with "." + a target, and `attn.c_proj` / `mlp.c_proj` are such
suffixes, so the two `c_proj` layers stay apart. The scale is PEFT's too: lora_alpha / r.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError
from gpt2_jax.model.lora import LoraConfig
from gpt2_jax.weights import lora_run, native
from gpt2_jax.weights.loading import detect_format

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model.transformer"


def peft_tensors(adapters: dict[str, Any], lora: LoraConfig) -> dict[str, np.ndarray]:
    """PEFT's key -> float32 tensor, layer by layer."""
    tensors = {}
    for block, layer in lora.layers():
        node = adapters["h"][block][layer]
        a_LIr, b_LrO = np.asarray(node["lora_A"], np.float32), np.asarray(node["lora_B"], np.float32)
        for i in range(a_LIr.shape[0]):
            tensors[f"{PREFIX}.h.{i}.{block}.{layer}.lora_A.weight"] = np.ascontiguousarray(a_LIr[i].T)
            tensors[f"{PREFIX}.h.{i}.{block}.{layer}.lora_B.weight"] = np.ascontiguousarray(b_LrO[i].T)
    return tensors


def peft_config(lora: LoraConfig, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json: LoRA on GPT-2's Conv1D layers, inference only (no adapter dropout)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.targets),
        "fan_in_fan_out": True,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def write_peft_adapter(directory: Path, adapters: dict[str, Any], lora: LoraConfig, base_model: str | None) -> None:
    """Fill `directory` (the temporary one of `io.atomic_directory`) with the adapter's two files."""
    save_file(peft_tensors(adapters, lora), str(directory / ADAPTER_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(peft_config(lora, base_model), indent=2) + "\n", encoding="utf-8")


def read_run_adapters(path: str | Path) -> tuple[GPT2Config, lora_run.LoraRecord, dict[str, Any], int]:
    """(config, LoRA record, adapters, step) of a LoRA run's newest checkpoint, or of one of its step directories."""
    path = Path(path)
    fmt = detect_format(path)
    run_dir = path.parent.parent if fmt == "step" else path
    record = lora_run.read_record(run_dir) if fmt in ("run", "step") else None
    if record is None:
        raise UserError(f"{path} is not a LoRA training run, so it has no adapters to export; train with --lora_rank.")
    steps = (
        [path]
        if fmt == "step"
        else [run_dir / "checkpoints" / str(s) for s in native.complete_steps(path / "checkpoints")]
    )
    if not steps:
        raise UserError(f"Training run {run_dir} has no complete checkpoint yet; train it first.")
    config = native.read_model_json(run_dir)
    return config, record, lora_run.load_adapters(steps[-1], config, record), int(steps[-1].name)
