"""A function mapped over a stream in worker processes: results in input order, a bounded number in flight.

`OrderedPool(workers, ...).map(fn, items)` is `map(fn, items)` run by `workers` processes. Input is taken from
`items` only as results are consumed (at most `2 x workers` tasks in flight), so a stream larger than memory goes
through in bounded memory; `multiprocessing.Pool.imap` would read the whole input ahead. One worker runs in this
process.

The processes are forked (where the OS has fork): they start at once and inherit what the parent loaded (the
tokenizer), with nothing pickled. Forking is safe here because nothing on this path imports JAX (whose runtime
threads a fork would not carry over) and the pool is made before this process starts threads of its own (tqdm's
monitor, pyarrow's readers), so that the children copy no lock another thread holds. Where JAX is imported all the
same (prepare called from a program that uses it), the workers are spawned instead: fresh interpreters, slower to
start, given the setup's arguments pickled. Workers ignore Ctrl-C (the parent stops them) and exit by themselves
when the parent dies, even by SIGKILL, instead of waiting forever for work.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")
PARENT_CHECK_S = 1.0


class OrderedPool:
    """`with OrderedPool(workers, setup, args) as pool: pool.map(fn, items)`; `setup(*args)` runs once in each worker
    (and here, for one worker) before any task; `fn` and `setup` must be module-level functions."""

    def __init__(self, workers: int, setup: Callable[..., None], args: tuple = ()) -> None:
        self.workers, self.setup, self.args = workers, setup, args
        self._pool = None

    def __enter__(self) -> OrderedPool:
        if self.workers <= 1:
            self.setup(*self.args)
        else:
            forkable = "fork" in multiprocessing.get_all_start_methods() and "jax" not in sys.modules
            method = "fork" if forkable else "spawn"
            context = multiprocessing.get_context(method)
            self._pool = context.Pool(self.workers, _worker_start, (os.getpid(), self.setup, self.args))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def map(self, fn: Callable[[In], Out], items: Iterable[In]) -> Iterator[Out]:
        """`fn(item)` for each item, in input order."""
        if self._pool is None:
            yield from map(fn, items)
            return
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(self._pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _worker_start(parent: int, setup: Callable[..., None], args: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    setup(*args)


def _exit_with_parent(parent: int) -> None:
    """An orphaned pool worker would block on its task queue forever: leave once the parent is gone."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)
