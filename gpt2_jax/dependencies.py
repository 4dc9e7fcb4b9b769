"""A Python without the project's dependencies gets one sentence saying what is missing and how to get it.

`gpt2_jax/__init__.py` calls `check()` before anything else, so every entry point (the root scripts, `python -m
gpt2_jax.NAME`, `gpt2-jax`, an `import gpt2_jax`) stops the same way: `error: <sentence>` on stderr, exit code 1, no
traceback. Typing `python sample.py ...` with the system Python in a checkout where `make demo` built `.venv/` is the
usual way here, so the sentence then gives the same command with `.venv/bin/python`, which runs as printed.

Plain Python, importing only the standard library, and no syntax newer than 3.6: it must be the one part of the
package that any Python can read, to tell an old one that it is too old.
"""

import importlib.util
import os
import shlex
import sys

MIN_PYTHON = (3, 11)
# The runtime requirements (pyproject.toml's dependencies) by the name they are imported with
# (tests/test_install.py checks that the two lists agree).
IMPORT_NAMES = {
    "jax": "jax",
    "flax": "flax",
    "optax": "optax",
    "orbax-checkpoint": "orbax.checkpoint",
    "numpy": "numpy",
    "tiktoken": "tiktoken",
    "sentencepiece": "sentencepiece",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "tensorboardX": "tensorboardX",
    "huggingface_hub": "huggingface_hub",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
}
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MissingDependencies(ImportError):
    """This Python cannot run gpt2-jax; the message is the one sentence to print."""


def missing() -> list:
    """The distributions whose modules this Python cannot find (nothing is imported)."""
    absent = []
    for distribution, module in IMPORT_NAMES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # `orbax` itself absent, or a broken half-install
            found = False
        if not found:
            absent.append(distribution)
    return absent


def typed_path(path: str, *, program: bool = False) -> str:
    """`path` as typed from the current folder: relative below it, else absolute; a `program` in the current
    folder itself as `./name` (a shell looks for a bare name on PATH). hints.py names commands with it too."""
    relative = os.path.relpath(path)
    if relative.startswith(os.pardir):
        return os.path.abspath(path)
    return "." + os.sep + relative if program and os.sep not in relative else relative


def advice() -> str:
    """How to get a Python that has them: the checkout's .venv when `make demo` built one, else how to build it."""
    venv_python = os.path.join(CHECKOUT, ".venv", "bin", "python")
    if os.path.isfile(venv_python) and os.path.abspath(sys.executable) != venv_python:
        # The command as typed, interpreter flags dropped: `python3 sample.py ...`, `python3 -m gpt2_jax.sample ...`.
        typed_argv = getattr(sys, "orig_argv", [])[1:]
        if typed_argv[:1] == ["-m"] or (typed_argv[:1] and typed_argv[0].endswith(".py")):
            command = " ".join(shlex.quote(a) for a in [typed_path(venv_python, program=True), *typed_argv])
            return "run it with the Python that `make demo` set up: " + command
        return "use the Python that `make demo` set up, " + typed_path(venv_python, program=True)
    if os.path.isfile(os.path.join(CHECKOUT, "Makefile")):
        here = os.path.abspath(os.getcwd()) == CHECKOUT
        where = "" if here else " in " + CHECKOUT
        return "run `make demo`{} (it builds .venv/ with them), or `pip install {}` into this Python".format(
            where, "." if here else CHECKOUT
        )
    return "install them with `pip install gpt2-jax` into this Python (or into a virtual environment)"


def check() -> None:
    """Raise `MissingDependencies` (its message one sentence) unless this Python can run gpt2-jax."""
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info < MIN_PYTHON:
        problem = "gpt2-jax needs Python {}.{} or newer, and {} is {}".format(*MIN_PYTHON, sys.executable, version)
    else:
        absent = missing()
        if not absent:
            return
        named = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
        problem = f"{sys.executable} (Python {version}) does not have {named}, which gpt2-jax needs"
    install_handler()
    raise MissingDependencies(problem + "; " + advice() + ".")


def install_handler() -> None:
    """Print the sentence, not a traceback, when `MissingDependencies` ends the program (scripts, `python -m`)."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if issubclass(kind, MissingDependencies) and os.environ.get("GPT2_JAX_DEBUG") != "1":
            print("error: " + str(value), file=sys.stderr)
        else:
            previous(kind, value, traceback)

    sys.excepthook = hook
