"""Remarks for the user on stderr, one line each, so stdout stays clean for samples and --json output.

`note` is for what the user may want to know ("ignoring the Adam slots"), `warn` for what may be wrong ("3 invalid
UTF-8 bytes replaced"). In a run over several processes only the primary process (process 0) speaks, so a remark
appears once, not once per host. `print_utf8` writes text that may not fit the console's encoding (Windows).
"""

from __future__ import annotations

import sys
from typing import TextIO


def is_primary() -> bool:
    """True in process 0 (or the only process): the one that prints and writes shared files."""
    jax = sys.modules.get("jax")  # a process that never imported JAX has joined no cluster: don't start one to ask
    return jax is None or jax.process_index() == 0


def note(message: str) -> None:
    if is_primary():
        print(f"note: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    if is_primary():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def print_utf8(text: str, file: TextIO | None = None) -> None:
    """Print without UnicodeEncodeError on consoles whose encoding is not UTF-8 (Windows)."""
    file = file or sys.stdout
    try:
        print(text, file=file, flush=True)
    except UnicodeEncodeError:
        file.buffer.write((text + "\n").encode("utf-8"))
        file.flush()
