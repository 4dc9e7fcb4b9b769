"""Loss and perplexity of a model on a dataset, as the standard GPT-2 evaluation computes them.

    python -m gpt2_jax.evaluate --model models/124M --data data/shakespeare [--json] [--batch_size 8]

The data is read as `train.py --dataset` reads it (`gpt2_jax.data`: a file, folder or glob of .txt/.md, .jsonl,
.csv, .parquet or pre-tokenized .npy/.bin, llm.c shards included; documents joined by `<|endoftext|>`; tokenized
once into a cache), whole, nothing held out. That token stream is cut into consecutive non-overlapping windows of
n_ctx tokens (the last one shorter). In each window the first token is unpredicted and every other token is
predicted from those before it in the window; the loss is the mean negative log-likelihood (nats) over all
predicted tokens, computed by the training loss (`training.step.token_losses`), and perplexity is its exponential.

Axes: W windows in the stream, B windows per forward pass (--batch_size), T = n_ctx tokens per window.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt2_jax.cli import ArgumentParser, run_cli
from gpt2_jax.config import DTYPES, GPT2Config
from gpt2_jax.console import note
from gpt2_jax.data.dataset import read_token_stream
from gpt2_jax.data.files import find_dataset_files
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.hints import command_for
from gpt2_jax.precision import DEFAULT_DTYPE_HELP, resolve_compute_dtype
from gpt2_jax.training.step import token_losses
from gpt2_jax.weights.loading import load_model


def windows(tokens: np.ndarray, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive windows of n_ctx tokens, the last one zero-padded: (tokens [W, n_ctx] int32, real [W, n_ctx])."""
    n_windows = -(-tokens.size // n_ctx)
    padded = np.zeros(n_windows * n_ctx, np.int32)
    padded[: tokens.size] = tokens
    real = np.arange(n_windows * n_ctx) < tokens.size
    return padded.reshape(n_windows, n_ctx), real.reshape(n_windows, n_ctx)


@partial(jax.jit, static_argnames="config")
def window_nll(params, config: GPT2Config, tokens_BT: jax.Array, real_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood (float32) and count of the predicted tokens (all but each window's first).

    One window at a time (`lax.map`): the float32 logits of a whole batch are n_vocab floats per token, and
    materialising them for 8 windows made this twice as slow on a CPU as looping over windows inside the jit.
    """

    def one_window(window):
        tokens_T, real_T = window
        nll_T = token_losses(params, config, tokens_T[None])[0]  # T - 1 losses: the targets are tokens_T[1:]
        return jnp.where(real_T[1:], nll_T, 0.0).sum()

    return jax.lax.map(one_window, (tokens_BT, real_BT)).sum(), real_BT[:, 1:].sum()


def evaluate(params, config: GPT2Config, tokens: np.ndarray, *, batch_size: int = 8, progress: bool = True) -> dict:
    """{'loss', 'perplexity', 'tokens', 'windows'} over `tokens` with the windowing in the module docstring."""
    tokens_WT, real_WT = windows(tokens, config.n_ctx)
    n_windows = tokens_WT.shape[0]
    totals = []
    bar = tqdm(range(0, n_windows, batch_size), desc="evaluating", unit="batch", disable=not progress, file=sys.stderr)
    for start in bar:
        batch_t, batch_r = tokens_WT[start : start + batch_size], real_WT[start : start + batch_size]
        short = batch_size - batch_t.shape[0]
        if short:  # pad the last batch with unpredicted rows so the jitted shape never changes
            batch_t = np.concatenate([batch_t, np.zeros((short, config.n_ctx), np.int32)])
            batch_r = np.concatenate([batch_r, np.zeros((short, config.n_ctx), bool)])
        totals.append(window_nll(params, config, batch_t, batch_r))  # no host sync: summed at the end
    nll = sum(float(s) for s, _ in totals)
    count = sum(int(c) for _, c in totals)
    if count == 0:
        raise UserError("The data holds fewer than 2 tokens, so nothing can be predicted; give a longer text.")
    loss = nll / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "windows": n_windows}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog=command_for("evaluate"), description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="a model as sample.py takes it (a path, gpt2/124M/..., a Hub id, scratch:NAME)"
    )
    parser.add_argument(
        "--data",
        required=True,
        help="dataset: a file, folder or glob of .txt/.md, .jsonl, .csv, .parquet, .npy or .bin (llm.c shards) files",
    )
    parser.add_argument(
        "--text_column", help="field or column that holds the text in .jsonl, .csv and .parquet files (default: text)"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help=f"compute dtype (default: {DEFAULT_DTYPE_HELP})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    find_dataset_files(args.data)  # a wrong --data fails before the model is read
    model = load_model(args.model, dtype=resolve_compute_dtype(args.dtype).dtype)
    stream = read_token_stream(args.data, model.tokenizer, flag="--data", text_column=args.text_column)
    if stream.n_replaced_bytes:
        note(f"replaced {stream.n_replaced_bytes} invalid UTF-8 bytes in the data with U+FFFD")
    tokens = stream.tokens
    if tokens.size and tokens.max() >= model.config.n_vocab:
        raise UserError(
            f"The tokenizer gives ids up to {tokens.max()} but {model.source} has only {model.config.n_vocab} "
            "tokens; put the model's own vocabulary files (encoder.json + vocab.bpe or tokenizer.model) beside it."
        )
    result = evaluate(model.params, model.config, tokens, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({**result, "model": model.source, "data": os.fspath(args.data)}))
    else:
        print(
            f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f} "
            f"over {result['tokens']:,} predicted tokens ({result['windows']} windows of {model.config.n_ctx})"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
