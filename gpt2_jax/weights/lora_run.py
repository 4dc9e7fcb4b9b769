"""A LoRA training run on disk: its record in gpt2_jax.json, and its checkpoints' adapters read back.

A LoRA run's checkpoints hold the adapters and their AdamW state only; the base model stays where it was. The run's
gpt2_jax.json says which base, and with which weights, so a moved or changed base is caught rather than silently
adapted:

    "lora": {"rank": 8, "alpha": 8.0, "targets": ["c_attn"], "dropout": 0.0,
             "base": {"model": "/abs/path/models/124M", "seed": 0, "crc32": 1234567890}}

`model` is what `load_model` reads (an absolute path, or a Hub id or preset name as given), `seed` the seed of a
preset's random weights, `crc32` the checksum of the base's float32 values (checksums.params_crc32), which does not
depend on the format they were read from. loading.py loads the base and merges (W + scale * A @ B, once) for
sampling, evaluation and `convert --to hf`; peft_export.py writes the adapters for Hugging Face PEFT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError
from gpt2_jax.model.lora import LoraConfig, abstract_adapters
from gpt2_jax.weights import native
from gpt2_jax.weights.checksums import params_crc32


class LoraRecord(NamedTuple):
    lora: LoraConfig
    base: dict[str, Any]  # {"model", "seed", "crc32"}

    def to_json(self) -> dict[str, Any]:
        return {**self.lora.to_json(), "base": self.base}


def base_reference(spec: str, seed: int, params: Any) -> dict[str, Any]:
    """The record of the base model a LoRA run starts from: where it is (an absolute path when it is one) and its
    weights' checksum."""
    model = str(Path(spec).absolute()) if os.path.exists(spec) or os.path.exists(f"{spec}.index") else spec
    return {"model": model, "seed": seed, "crc32": params_crc32(params)}


def read_record(directory: str | os.PathLike) -> LoraRecord | None:
    """A run's LoRA record; None for any other model or run."""
    path = Path(directory) / native.CONFIG_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8")).get("lora")
        if record is None:
            return None
        return LoraRecord(LoraConfig.from_json(record), dict(record["base"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, UserError) as e:
        raise UserError(f"{path} holds a damaged LoRA record ({e}); restore the file from a copy.")


def check_base(record: LoraRecord, params: Any, run: str | os.PathLike) -> None:
    """UserError unless `params` are the weights the run's adapters were trained on."""
    if params_crc32(params) != int(record.base["crc32"]):
        raise UserError(
            f"The base model {record.base['model']} has changed since the LoRA run {run} was trained on it (its "
            "weights' checksum differs), so its adapters would not fit; put back the model it was trained from."
        )


def missing_base(record: LoraRecord, run: str | os.PathLike, error: UserError) -> UserError:
    """The sentence for a base model that no longer loads."""
    return UserError(
        f"The LoRA run {run} adapts the base model {record.base['model']}, which does not load now "
        f"({str(error).rstrip('.')}); put that model back where it was."
    )


def load_adapters(step_dir: Path, config: GPT2Config, record: LoraRecord) -> dict[str, Any]:
    """One checkpoint's adapters, checked against the run's record and checksums."""
    return native.load_tree(
        step_dir / "params", abstract_adapters(config, record.lora), f"the LoRA record {record.lora}"
    )
