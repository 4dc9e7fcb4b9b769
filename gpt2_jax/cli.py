"""What every command-line entry point shares: user errors as one sentence, no traceback unless --debug."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from gpt2_jax.errors import UserError


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)` and exit: a `UserError` prints `error: <sentence>` to stderr and exits with its code.

    `--debug` on the command line (or GPT2_JAX_DEBUG=1) lets the traceback through instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("GPT2_JAX_DEBUG") == "1"
    try:
        code = main(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
