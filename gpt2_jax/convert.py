"""Convert any model `load_model` reads into our native directory, Hugging Face safetensors, or OpenAI's TF layout.

    python -m gpt2_jax.convert models/124M models/124M-jax                 # native: loads several times faster
    python -m gpt2_jax.convert checkpoint/run1 out/run1-hf --to hf --dtype bfloat16
    python -m gpt2_jax.convert runs/shakespeare out/shakespeare-tf --to openai   # for OpenAI's / gpt-2-simple's code

The output directory is built under a temporary name beside OUT and renamed into place when complete; a non-empty
OUT is refused unless --force. TF checkpoints have every tensor's crc32c verified (a one-off cost, unlike loading).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError

from gpt2_jax.cli import ArgumentParser, run_cli
from gpt2_jax.config import DTYPES
from gpt2_jax.errors import UsageError, UserError, short_reason
from gpt2_jax.io import atomic_directory
from gpt2_jax.model.params import count_params
from gpt2_jax.weights.loading import LoadedModel, load_model
from gpt2_jax.weights.native import save_native_model
from gpt2_jax.weights.openai import write_openai_checkpoint
from gpt2_jax.weights.safetensors_io import write_safetensors_model

TARGETS = ("native", "hf", "openai")
# How a failed write surfaces: OSError from Python, ValueError/RuntimeError from orbax's tensorstore, SafetensorError.
WRITE_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m gpt2_jax.convert",
        description="Convert GPT-2 weights (OpenAI, gpt-2-simple, Hugging Face, gpt2-jax model or training run).",
    )
    parser.add_argument("src", help="model path (any format sample.py --model accepts) or a preset name")
    parser.add_argument("out", help="output directory (created; must be empty unless --force)")
    parser.add_argument("--to", choices=TARGETS, default="native", help="output format (default: %(default)s)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="stored dtype for --to hf (default: %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.dtype != "float32" and args.to != "hf":
        raise UsageError(f"--dtype {args.dtype} applies to --to hf only; {args.to} models store float32 params.")
    src, out = Path(args.src).resolve(), Path(args.out).resolve()
    if src == out or out in src.parents:
        raise UsageError(f"OUT {args.out} would replace the source {args.src}; write the conversion somewhere else.")
    return args


def _write_hf_tokenizer_names(directory: Path) -> None:
    """Hugging Face's names for GPT-2's vocabulary files (same content), so its tokenizers load OUT too."""
    for ours, theirs in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        if (directory / ours).is_file():
            shutil.copyfile(directory / ours, directory / theirs)


def write(directory: Path, model: LoadedModel, to: str, dtype: str) -> None:
    """Fill `directory` with `model` in format `to` (its tokenizer included)."""
    if to == "native":
        save_native_model(directory, model.params, model.config, model.tokenizer)
    elif to == "hf":
        write_safetensors_model(directory, model.params, model.config, dtype=dtype)
        model.tokenizer.save(directory)
        _write_hf_tokenizer_names(directory)
    else:
        write_openai_checkpoint(directory, model.params, model.config)
        model.tokenizer.save(directory)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    with atomic_directory(args.out, force=args.force) as tmp:
        print(f"reading {args.src}", file=sys.stderr, flush=True)
        model = load_model(args.src, dtype="float32", verify_crc=True)
        read_s = time.perf_counter() - start
        print(f"read {model.source} in {read_s:.1f} s; writing {args.to} to {args.out}", file=sys.stderr, flush=True)
        try:
            write(tmp, model, args.to, args.dtype)
        except WRITE_ERRORS as e:  # the temporary directory is removed on the way out: nothing half-written stays
            raise UserError(
                f"Could not write {args.out} ({short_reason(e)}); nothing was written there: free disk space "
                "or choose another OUT, then convert again."
            )
    elapsed = time.perf_counter() - start
    print(f"converted {count_params(model.config):,} parameters to {args.out} ({args.to}) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
