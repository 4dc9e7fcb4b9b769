"""What every command-line entry point shares: user errors as one sentence, no traceback unless --debug.

`run_cli(main)` turns a `UserError` into `error: <sentence>` and its exit code (2 for flags, 1 otherwise), an
`OSError` that escaped the library (a full disk, a read-only folder, a permission) into one sentence naming the
file, and Ctrl-C into exit code 130. `ArgumentParser` makes argparse's own complaints (an unknown flag, a value
that is not a number) one sentence with exit code 2 as well, instead of a usage block.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from gpt2_jax.errors import UsageError, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises `UsageError`: one sentence pointing at --help, exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see {self.prog} --help.")


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)` and exit: a `UserError` prints `error: <sentence>` to stderr and exits with its code.

    `--debug` on the command line (or GPT2_JAX_DEBUG=1) lets the traceback through instead.
    """
    utf8_streams()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("GPT2_JAX_DEBUG") == "1"
    try:
        code = main(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BrokenPipeError:  # `... | head` closed our stdout: nothing left to say, and nowhere to say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        if debug:
            raise
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def utf8_streams() -> None:
    """Output in UTF-8 whatever the console's encoding, with anything unencodable (a lone surrogate in a path from
    argv) replaced rather than raised; undecodable input bytes kept, to be counted where they are read."""
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "replace"), (sys.stderr, "replace")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors=errors)


def describe_os_error(error: OSError) -> str:
    """One sentence for an OSError the library did not expect: what the system said, where, and what to check."""
    reason = error.strerror or str(error) or type(error).__name__
    where = f" for {error.filename}" if error.filename else ""
    return f"{reason}{where}; check the path, the free disk space and the permissions (--debug shows the traceback)."
