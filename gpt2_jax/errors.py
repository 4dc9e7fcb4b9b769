"""The one exception type that reaches users as a sentence, not a traceback.

Library code raises `UserError` when the cause is something the user gave us (a path, a flag, a file) and the
message says what was wrong and what to do. Command-line entry points catch it, print the message to stderr and
exit non-zero; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message is one sentence saying what was wrong and what to do."""

    exit_code: int = 1

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(UserError):
    """A command-line flag or argument out of range (exit code 2, like argparse)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)
