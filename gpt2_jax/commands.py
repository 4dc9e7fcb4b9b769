"""The `gpt2-jax` command that `pip install` puts on the PATH (also `python -m gpt2_jax`): one subcommand per script.

    gpt2-jax train ...      = python train.py ...              gpt2-jax download ... = python -m gpt2_jax.download ...
    gpt2-jax sample ...     = python sample.py ...             gpt2-jax evaluate ... = python -m gpt2_jax.evaluate ...
    gpt2-jax convert ...    = python -m gpt2_jax.convert ...   gpt2-jax bench ...    = python -m benchmarks ...
    gpt2-jax serve ...      = python -m gpt2_jax.serve ...     gpt2-jax prepare ...  = python -m gpt2_jax.prepare ...

Everything after the subcommand's name goes to that command's own `main`, unchanged: the same flags, output, exit
codes and `--help`. Each command's module is imported only when it is asked for, so `gpt2-jax --help` is instant.

The benchmark suite is not in the wheel: it is a developer's tool (it times PyTorch, which the package does not
install, and writes into benchmarks/results/), and as the top-level package `benchmarks` it would clash with any
other project's. `bench` runs it from the source checkout that an editable install (`pip install -e .`) points at,
and anywhere else says where it lives.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from gpt2_jax import __version__, hints
from gpt2_jax.cli import run_cli
from gpt2_jax.errors import UsageError, UserError

# name: (module whose `main` runs it, what it does)
COMMANDS = {
    "train": ("gpt2_jax.train", "fine-tune GPT-2 on your text, or train a small one from scratch (the demo)"),
    "sample": ("gpt2_jax.sample", "sample text from a model, or prompt it interactively"),
    "convert": ("gpt2_jax.convert", "convert a model to our native format or to Hugging Face's"),
    "download": ("gpt2_jax.download", "download GPT-2 weights from OpenAI or Hugging Face"),
    "evaluate": ("gpt2_jax.evaluate", "loss and perplexity of a model on a dataset"),
    "prepare": ("gpt2_jax.prepare", "tokenize a corpus into llm.c shards for pretraining (parallel, resumable)"),
    "serve": ("gpt2_jax.serve", "serve a model over OpenAI's completions API (continuous batching)"),
    "bench": ("benchmarks.__main__", "the benchmark suite, against the hardware's limits and PyTorch (source only)"),
}
CHECKOUT = Path(__file__).resolve().parent.parent  # the repository, when the package is used from its source


def usage() -> str:
    lines = [f"usage: gpt2-jax COMMAND [FLAGS...]   (gpt2-jax {__version__})", "", "commands:"]
    lines += [f"  {name:<9} {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "`gpt2-jax COMMAND --help` lists the flags of one command."]
    return "\n".join(lines)


def command_main(name: str):
    """The `main(argv)` of the named command; the benchmarks' is found in the source checkout."""
    module = COMMANDS[name][0]
    if name == "bench":
        if not (CHECKOUT / "benchmarks" / "__main__.py").is_file():
            raise UserError(
                "The benchmark suite is not installed with the package: it lives in benchmarks/ of the source "
                "repository; clone it, `pip install -e .` there and run `gpt2-jax bench` (or `python -m benchmarks`)."
            )
        sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module(module).main


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"gpt2-jax {__version__}")
        return 0
    if args[0] not in COMMANDS:
        raise UsageError(f"gpt2-jax has no command {args[0]!r}; choose one of {', '.join(COMMANDS)} (gpt2-jax --help).")
    command = command_main(args[0])
    hints.invoked_as = f"gpt2-jax {args[0]}"
    try:
        return command(args[1:]) or 0
    finally:
        hints.invoked_as = None


def run() -> None:
    """The console script's entry point (pyproject.toml [project.scripts])."""
    run_cli(main)
