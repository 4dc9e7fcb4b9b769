"""Commands named in hints (the end of a training run, a missing model, usage lines) so that they run as printed.

A hint is typed back from the folder the user is in, so it names the command the way this process was started:

    gpt2-jax train ...                  -> gpt2-jax sample ...  (or the script's path when it is not on PATH)
    .venv/bin/python train.py ...       -> .venv/bin/python sample.py ...  (`make demo` runs this)
    python ../gpt2-jax/train.py ...     -> python ../gpt2-jax/sample.py ...
    python -m gpt2_jax.train ...        -> python -m gpt2_jax.sample ...
    python -m gpt2_jax train ...        -> python -m gpt2_jax sample ...

The interpreter is named `python` only when that is what PATH finds; otherwise by its path (relative below the
current folder), since a `python` without the project's dependencies fails at once.
"""

from __future__ import annotations

import os
import shutil
import sys

from gpt2_jax.dependencies import typed_path

# The command `commands.py` is running (`gpt2-jax NAME`), set while it runs; None for a script or `python -m`.
invoked_as: str | None = None
SCRIPTS = ("train", "sample")  # the checkout's top-level scripts; every other command is only a module
MODULES = {"bench": "benchmarks"}  # commands whose module is not gpt2_jax.NAME (the suite lives in the checkout)


def on_path(name: str, path: str) -> bool:
    """Whether typing `name` runs `path` (compared without resolving links: a venv's python links to another)."""
    found = shutil.which(name)
    return found is not None and os.path.abspath(found) == os.path.abspath(path)


def python() -> str:
    """This interpreter as the user can type it here."""
    return "python" if on_path("python", sys.executable) else typed_path(sys.executable, program=True)


def command_for(name: str) -> str:
    """How to run command `name` (train, sample, download, ...) the way this process was started; see above."""
    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if invoked_as is not None:  # gpt2-jax NAME, through the console script or `python -m gpt2_jax NAME`
        if os.path.basename(argv0) == "__main__.py":
            return f"{python()} -m gpt2_jax {name}"
        if argv0 and os.path.basename(argv0) != "gpt2-jax":
            return f"gpt2-jax {name}"  # called in-process (a test, a notebook): the plain name
        return f"{'gpt2-jax' if on_path('gpt2-jax', argv0) else typed_path(argv0, program=True)} {name}"
    checkout = os.path.dirname(argv0)
    if name in SCRIPTS and os.path.basename(argv0) in {f"{s}.py" for s in SCRIPTS}:
        if os.path.basename(checkout) != "gpt2_jax":  # the checkout's train.py/sample.py, not the package's module
            return f"{python()} {typed_path(os.path.join(checkout, f'{name}.py'))}"
    return f"{python()} -m {MODULES.get(name, f'gpt2_jax.{name}')}"
