"""File and process helpers shared by every writer and reader.

Nothing is ever left half-written under its final name: a file goes through a temporary name
(`atomic_write_bytes`, or `StreamedFile` for one written piece by piece with its header last); a whole directory (a
converted model) is filled under a temporary name beside its destination and renamed into place
(`atomic_directory`). `pid_alive` tells whether the owner of a lock or of a
temporary file is still running.

Orbax's own failure noise is kept off the user's terminal when a read or write fails (`quiet_orbax_failures`): a
failed orbax save logs a traceback per writer thread through absl, and tensorstore's callbacks then raise 'Event
loop is closed' into threads whose loop is gone; a failed restore leaves its other reading coroutines to raise when
they are collected. Python prints those as "Exception ignored in ..." tracebacks, and asyncio logs a failed task
nobody awaited as "Task exception was never retrieved". The callers (training/checkpoints.py, weights/native.py)
already turn the failure itself into one sentence; this drops the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gpt2_jax.errors import UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, so `path` is never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class StreamedFile:
    """A file written front to back under `temp_path`, its first `header_size` bytes left for a header known only at
    the end: `commit(header)` writes it, fsyncs and renames the file to `path`; `abort()` deletes it. Opening raises
    OSError when the folder is not writable."""

    def __init__(self, path: str, temp_path: str, header_size: int) -> None:
        self.path, self.temp_path, self.header_size = path, temp_path, header_size
        self._file = open(temp_path, "wb")
        self._file.write(b"\0" * header_size)

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self, header: bytes) -> None:
        if len(header) != self.header_size:
            raise ValueError(f"a header of {len(header)} bytes for a place of {self.header_size}")
        self._file.seek(0)
        self._file.write(header)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp_path, self.path)

    def abort(self) -> None:
        self._file.close()
        try:
            os.remove(self.temp_path)
        except OSError:
            pass


class _DropOrbaxTasks(logging.Filter):
    """asyncio's "Task exception was never retrieved" for a task of orbax's (the failed write, reported already)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "orbax" not in record.getMessage()


def quiet_orbax_failures() -> None:
    """Silence absl's per-thread error logs and orbax's leftover-coroutine tracebacks, once per process."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropOrbaxTasks) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropOrbaxTasks())
    previous = sys.unraisablehook
    if getattr(previous, "gpt2_jax_filter", False):
        return

    def hook(unraisable) -> None:
        if not _is_orbax_leftover(unraisable):
            previous(unraisable)

    hook.gpt2_jax_filter = True
    sys.unraisablehook = hook


def _is_orbax_leftover(unraisable) -> bool:
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
        return True
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine of orbax's, collected after a failed read
    return code is not None and "orbax" in code.co_filename


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (someone else's live process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    return True


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success it replaces `out` in one rename.

    A non-empty `out` is refused unless `force`; then it is moved aside first and deleted only after the new
    directory is in place. On failure the temporary directory is removed and `out` is untouched.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is a file; choose a directory name for the output.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty; choose another output directory or pass --force.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():  # a failure: writer threads of a failed save may still be adding to it
            remove_tree(tmp)


def remove_tree(path: Path, *, patience_s: float = 60.0, settle_s: float = 0.5) -> None:
    """Delete a directory that writer threads may still be adding to: after a failed save orbax's background
    threads finish their writes a moment later, so one rmtree can leave a file (and its folder) behind, or a late
    write can bring the folder back. Done when it has stayed gone for `settle_s`; `patience_s` is only a hang guard
    (generous, since a loaded machine runs those threads late)."""
    deadline = time.monotonic() + patience_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            time.sleep(settle_s)
            if not path.exists():
                return
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
