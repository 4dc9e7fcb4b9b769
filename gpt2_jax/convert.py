"""Convert any model `load_model` reads into our native directory, Hugging Face safetensors, or OpenAI's TF layout.

    python -m gpt2_jax.convert models/124M models/124M-jax                 # native: loads several times faster
    python -m gpt2_jax.convert checkpoint/run1 out/run1-hf --to hf --dtype bfloat16
    python -m gpt2_jax.convert runs/shakespeare out/shakespeare-tf --to openai   # for OpenAI's / gpt-2-simple's code
    python -m gpt2_jax.convert runs/lora8 out/lora8-peft --to peft         # a LoRA run's adapters for HF PEFT

The output directory is built under a temporary name beside OUT and renamed into place when complete; a non-empty
OUT is refused unless --force. TF checkpoints have every tensor's crc32c verified (a one-off cost, unlike loading).

`--to hf` is a complete transformers model: weights and config.json, the tokenizer files AutoTokenizer loads,
generation_config.json with sample.py's defaults, and a model card whose metadata says what the run knows: the model
it started from, its data, steps and newest validation loss (weights/hf_export.py).

A LoRA run (train.py --lora_rank) converts like any run: its adapters are merged into its base model once on load, so
`--to hf` (or native, openai) writes the merged model. `--to peft` writes the adapters alone as Hugging Face PEFT reads
them (adapter_model.safetensors + adapter_config.json: weights/peft_export.py), to load onto the base model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError

from gpt2_jax.cli import ArgumentParser, run_cli
from gpt2_jax.config import ALIASES, DTYPES, PRESETS, GPT2Config, is_scratch, preset_names
from gpt2_jax.console import note
from gpt2_jax.errors import UsageError, UserError, short_reason
from gpt2_jax.hints import command_for
from gpt2_jax.io import atomic_directory
from gpt2_jax.model.lora import adapter_count
from gpt2_jax.model.params import count_params
from gpt2_jax.sampling.processors import SamplingConfig
from gpt2_jax.tokenizers.sentencepiece import SentencePieceTokenizer
from gpt2_jax.training.run_dir import RunDir
from gpt2_jax.weights import hf_export, hub, peft_export
from gpt2_jax.weights.loading import LoadedModel, load_model
from gpt2_jax.weights.native import save_native_model
from gpt2_jax.weights.openai import write_openai_checkpoint
from gpt2_jax.weights.releases import HF_NAMES
from gpt2_jax.weights.safetensors_io import write_safetensors_model

TARGETS = ("native", "hf", "openai", "peft")
# How a failed write surfaces: OSError from Python, ValueError/RuntimeError from orbax's tensorstore, SafetensorError.
WRITE_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog=command_for("convert"),
        description="Convert GPT-2 weights (OpenAI, gpt-2-simple, Hugging Face, gpt2-jax model or training run).",
    )
    parser.add_argument("src", help="a model as sample.py takes it (a path, gpt2/124M/..., a Hub id, scratch:NAME)")
    parser.add_argument("out", help="output directory (created; must be empty unless --force)")
    parser.add_argument("--to", choices=TARGETS, default="native", help="output format (default: %(default)s)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="stored dtype for --to hf (default: %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.dtype != "float32" and args.to != "hf":  # PEFT's adapters: float32 as trained
        raise UsageError(f"--dtype {args.dtype} applies to --to hf only; {args.to} models store float32 params.")
    src, out = Path(args.src).resolve(), Path(args.out).resolve()
    if src == out or out in src.parents:
        raise UsageError(f"OUT {args.out} would replace the source {args.src}; write the conversion somewhere else.")
    return args


def write(directory: Path, model: LoadedModel, to: str, dtype: str, name: str) -> None:
    """Fill `directory` (to become OUT, named `name`) with `model` in format `to`, its tokenizer included."""
    if to == "native":
        save_native_model(directory, model.params, model.config, model.tokenizer)
    elif to == "hf":
        write_hf(directory, model, dtype, name)
    else:
        write_openai_checkpoint(directory, model.params, model.config)
        model.tokenizer.save(directory)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.to == "peft":
        return convert_to_peft(args)
    start = time.perf_counter()
    with atomic_directory(args.out, force=args.force) as tmp:
        print(f"reading {args.src}", file=sys.stderr, flush=True)
        model = load_model(args.src, dtype="float32", verify_crc=True)
        read_s = time.perf_counter() - start
        print(f"read {model.source} in {read_s:.1f} s; writing {args.to} to {args.out}", file=sys.stderr, flush=True)
        try:
            write(tmp, model, args.to, args.dtype, Path(args.out).name)
        except WRITE_ERRORS as e:  # the temporary directory is removed on the way out: nothing half-written stays
            raise UserError(
                f"Could not write {args.out} ({short_reason(e)}); nothing was written there: free disk space "
                "or choose another OUT, then convert again."
            )
    elapsed = time.perf_counter() - start
    print(f"converted {count_params(model.config):,} parameters to {args.out} ({args.to}) in {elapsed:.1f} s")
    return 0


def convert_to_peft(args: argparse.Namespace) -> int:
    """A LoRA run's adapters, unmerged, as a PEFT adapter naming its base model."""
    config, record, adapters, step = peft_export.read_run_adapters(args.src)
    spec = record.base["model"]
    base = base_model(spec, config) or spec
    with atomic_directory(args.out, force=args.force) as tmp:
        try:
            peft_export.write_peft_adapter(tmp, adapters, record.lora, base)
        except WRITE_ERRORS as e:
            raise UserError(f"Could not write {args.out} ({short_reason(e)}); nothing was written there.")
    n = adapter_count(config, record.lora)
    print(f"wrote the LoRA adapters of {args.src} at step {step} ({n:,} parameters, base {base}) to {args.out} (peft)")
    return 0


def write_hf(directory: Path, model: LoadedModel, dtype: str, name: str) -> None:
    """A transformers model: weights, config, tokenizer files, generation defaults and a model card."""
    eot = hf_export.special_id(model.tokenizer, model.config)
    if eot is None:
        note(
            f"the model's vocabulary ({model.config.n_vocab} ids) does not hold its tokenizer's end-of-text id "
            f"{model.tokenizer.eot_id}, so the export names no end-of-text token"
        )
    write_safetensors_model(directory, model.params, model.config, dtype=dtype, eot_id=eot)
    model.tokenizer.save(directory)
    defaults = SamplingConfig()
    sampling = {k: getattr(defaults, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty")}
    files = {
        **hf_export.tokenizer_files(model.tokenizer, model.config),
        # sample.py's default --length: half the context
        "generation_config.json": hf_export.generation_config(sampling, model.config.n_ctx // 2, eot),
        "README.md": hf_export.model_card(card_facts(model, name)),
    }
    for file, data in files.items():
        (directory / file).write_bytes(data)


def card_facts(model: LoadedModel, name: str) -> hf_export.CardFacts:
    """What the model card can say: the model, and for a training run's checkpoint, how it was trained."""
    tokenizer = model.tokenizer
    vocab = f"a {tokenizer.n_vocab}-piece SentencePiece vocabulary"
    facts = hf_export.CardFacts(
        name=name, source=model.source, config=model.config, n_params=count_params(model.config),
        tokenizer=vocab if isinstance(tokenizer, SentencePieceTokenizer) else "GPT-2's byte-level BPE",
    )  # fmt: skip
    run = RunDir(model.directory, writer=False) if model.step is not None and model.directory else None
    training = run.read_training_options() if run else None
    if not training:
        return facts
    records = [r for r in run.read_metrics() if r.get("step", 0) <= model.step]
    validated = [r for r in records if "val_loss" in r]
    dataset = Path(training["dataset"]).name if training.get("dataset") else "gpt2-jax's bundled Shakespeare corpus"
    return dataclasses.replace(
        facts,
        base_model=base_model(training.get("init"), model.config),
        from_scratch=random_start(training.get("init")),
        dataset=dataset,
        steps=model.step,
        tokens=next((r["tokens"] for r in reversed(records) if "tokens" in r), None),
        val_loss=(validated[-1]["step"], validated[-1]["val_loss"]) if validated else None,
        lora=lora_summary(training),
    )


def lora_summary(training: dict) -> str | None:
    """'rank R, alpha A, on TARGETS' for a LoRA run's saved training options; None for full fine-tuning."""
    rank = training.get("lora_rank")
    if not rank:
        return None
    alpha = training.get("lora_alpha")
    return f"rank {rank}, alpha {alpha if alpha is not None else rank:g}, on {training.get('lora_targets', 'c_attn')}"


def random_start(init: str | None) -> bool:
    """Whether a run's --init was random weights: scratch:PRESET, or (in runs from before a bare `gpt2` meant the
    released weights) a preset name that is no release."""
    if not init:
        return False
    return is_scratch(init) or (init in preset_names() and ALIASES.get(init, init) not in HF_NAMES)


def base_model(init: str | None, config: GPT2Config) -> str | None:
    """The Hub id of the model a run started from, where its --init tells: a Hub id, or a released GPT-2's folder
    (models/124M, models/gpt2-medium, ...) of the same shape."""
    if not init or random_start(init):
        return None
    release = ALIASES.get(Path(init).name, Path(init).name)
    if release in HF_NAMES and PRESETS[release].to_hparams() == config.to_hparams():
        return f"openai-community/{HF_NAMES[release]}"
    if hub.is_hub_id(init) and not Path(init).exists():
        return init
    return None


if __name__ == "__main__":
    run_cli(main)
