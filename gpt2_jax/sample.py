"""The sample command: `python sample.py` (or `python -m gpt2_jax.sample`); `--help` lists every flag.

    python sample.py --model models/124M --prompt "Hello, I'm a language model,"   # conditional
    python sample.py --model runs/run1 --interactive                                # OpenAI's `Model prompt >>>` loop
    python sample.py --model gpt2 --nsamples 4 --format jsonl                       # unconditional, JSON lines

Output follows OpenAI's scripts: a `==== SAMPLE n ====` header before each sample (and a line of 80 '=' after a
prompt's samples), or `--format jsonl` with one object per sample. The flags are checked and the prompt read
before JAX is imported and the model loaded, so a mistake costs no start-up time. The sampling itself is
`gpt2_jax.sampling.Sampler`'s.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2_jax.cli import ArgumentParser, run_cli
from gpt2_jax.compile_cache import use_compile_cache
from gpt2_jax.console import warn
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.hints import command_for
from gpt2_jax.precision import DEFAULT_DTYPE_HELP, resolve_compute_dtype
from gpt2_jax.unicode import repair_decoded

if TYPE_CHECKING:
    from gpt2_jax.sampling.sampler import Sample, Sampler

DEFAULT_MODEL = "models/124M"
PROMPT = "Model prompt >>> "


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=command_for("sample"), description="Sample text from a GPT-2 model.", allow_abbrev=False)
    p.add_argument(
        "--model",
        default=None,
        help="a model: a path of any supported format, a released GPT-2's name (gpt2, 124M, ...), a Hugging Face Hub "
        f"id, or scratch:NAME for random weights (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--prompt", default=None, help="text to continue (default: unconditional, from <|endoftext|>)")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this file (UTF-8)")
    p.add_argument("--interactive", action="store_true", help="ask for prompts in a loop (Ctrl-D leaves)")
    p.add_argument("--nsamples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--batch_size", type=int, default=None, help="samples decoded at once (default: all, at most 16)")
    p.add_argument("--length", type=int, default=None, help="new tokens per sample (default: half the context)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1)")
    p.add_argument(
        "--top_k", type=int, default=40, help="sample from the k likeliest tokens; 0 turns it off (default 40)"
    )
    p.add_argument(
        "--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 turns it off (default 1)"
    )
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one each run)")
    p.add_argument("--stop", action="append", default=[], help="stop a sample at this string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help=f"compute dtype (default: by the device: {DEFAULT_DTYPE_HELP})",
    )
    p.add_argument("--format", choices=("text", "jsonl"), default="text", help="text (OpenAI's layout) or jsonl")
    p.add_argument(
        "--no_compile_cache",
        action="store_true",
        help="compile anew instead of reusing the persistent JAX compilation cache (default: on, in "
        "$GPT2_JAX_CACHE/jax_cache or ~/.cache/gpt2_jax/jax_cache)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def check_flags(args: argparse.Namespace) -> None:
    for name in ("nsamples", "batch_size", "length"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be at least 1, got {value}.")
    if sum(x is not None for x in (args.prompt, args.prompt_file)) + args.interactive > 1:
        raise UsageError("--prompt, --prompt_file and --interactive each give the prompt; use only one.")
    if args.stream and args.format == "jsonl":
        raise UsageError("--stream prints text as it is generated; it does not combine with --format jsonl.")


def repaired(text: str, where: str) -> str:
    """`text` with each byte that was not UTF-8 (kept as a lone surrogate from argv, stdin or a file) as U+FFFD,
    counted."""
    text, bad = repair_decoded(text)
    if bad:
        warn(f"{bad} invalid UTF-8 byte(s) in {where} were replaced by U+FFFD.")
    return text


def read_prompt_file(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"Cannot read --prompt_file {path}: {e.strerror or e}.")
    return repaired(data.decode("utf-8", errors="surrogateescape"), path)


class Printer:
    """Writes samples as OpenAI's scripts do, or as JSON lines; streams the first sample of each batch."""

    def __init__(self, fmt: str, seed: int) -> None:
        self.fmt, self.seed, self.streaming = fmt, seed, None

    def header(self, index: int) -> None:
        print("=" * 40 + f" SAMPLE {index + 1} " + "=" * 40)

    def stream(self, index: int, text: str) -> None:
        if self.streaming != index:
            self.streaming = index
            self.header(index)
        print(text, end="", flush=True)

    def sample(self, s: Sample) -> None:
        if self.fmt == "jsonl":
            record = {"prompt": s.prompt, "text": s.text, "tokens": s.tokens, "stop_reason": s.stop_reason}
            print(json.dumps({**record, "sample": s.index + 1, "seed": self.seed}, ensure_ascii=False), flush=True)
        elif self.streaming == s.index:
            print(flush=True)  # its text is already out
        else:
            self.header(s.index)
            print(s.text, flush=True)


def load_sampler(model: str | None, dtype: str | None) -> Sampler:
    from gpt2_jax.sampling.sampler import Sampler  # JAX is imported here, after the flags are known to be good
    from gpt2_jax.weights.loading import load_model

    if model is None and not os.path.isdir(DEFAULT_MODEL):
        raise UserError(f"No {DEFAULT_MODEL}; download it (`{command_for('download')} 124M`) or pass --model.")
    return Sampler.from_model(load_model(model or DEFAULT_MODEL, dtype=resolve_compute_dtype(dtype).dtype))


def prompt_sampler(args: argparse.Namespace) -> Callable[[str], None]:
    """Load the model and return a function that writes the samples of one prompt."""
    from gpt2_jax.sampling.processors import SamplingConfig

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)  # flag ranges
    use_compile_cache(not args.no_compile_cache)
    sampler = load_sampler(args.model, args.dtype)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    printer = Printer(args.format, seed)

    def run(prompt: str) -> None:
        printer.streaming = None
        samples = sampler.samples(
            [prompt],
            nsamples=args.nsamples,
            batch_size=args.batch_size or min(args.nsamples, 16),
            length=args.length or sampler.config.n_ctx // 2,
            sampling=sampling,
            seed=seed,
            stop=args.stop,
            on_text=printer.stream if args.stream else None,
        )
        for s in samples:
            printer.sample(s)
        if prompt and args.format == "text":
            print("=" * 80, flush=True)

    return run


def interactive(run: Callable[[str], None]) -> None:
    """OpenAI's loop: ask, re-ask on an empty prompt, sample; Ctrl-D or Ctrl-C at the prompt leaves."""
    try:
        while True:
            prompt = input(PROMPT)
            while not prompt:
                print("Prompt should not be empty!")
                prompt = input(PROMPT)
            run(repaired(prompt, "the prompt"))
    except (EOFError, KeyboardInterrupt):
        print()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)
    # The prompt is read (and a bad --prompt_file refused) before the model, which can take a while to load.
    prompt = read_prompt_file(args.prompt_file) if args.prompt_file else repaired(args.prompt or "", "--prompt")
    run = prompt_sampler(args)
    if args.interactive:
        interactive(run)
    else:
        run(prompt)
    return 0


if __name__ == "__main__":
    run_cli(main)
