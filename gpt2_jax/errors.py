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


# Phrases the OS puts in an I/O failure, found as they are inside the longer messages that orbax, tensorstore and
# safetensors wrap them in.
DISK_REASONS = (
    "No space left on device",
    "File too large",
    "Disk quota exceeded",
    "Read-only file system",
    "Permission denied",
)


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a `raise ... from ...` chain: the library's own message, not its wrappers'."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def short_reason(error: BaseException) -> str:
    """What went wrong in a few words, for the end of a one-sentence error: the OS's own reason where there is one
    ('No space left on device'), else the first line of the innermost message, at most 200 characters."""
    for e in (error, root_cause(error)):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        for reason in DISK_REASONS:
            if reason in str(e):
                return reason
    return first_line(root_cause(error))[:200]
