"""Continuous batching: one background thread drives `rows.py`'s device functions for every request at once.

Requests (one `Job` per choice) wait in a bounded queue. Between decode chunks the thread admits waiting jobs into
free rows (one batch-1 prefill each, which also draws the first token, so it is sent at once), runs one chunk of
`chunk` steps for all rows, and hands each job its new text through its `sink` (called on this thread; the web app
passes it on to its event loop). A job leaves its row when it finishes (eot, a stop string, max_tokens) or is
cancelled (its client went away): the row is free for the next job at the next chunk boundary, and no job waits
for another to finish.

Compiled shapes are a fixed set, all compiled by `warm_up` before the first request: `admit` at each prompt bucket
(powers of two from 16, and the cache size) and `decode_rows` once. Nothing else varies: sampling settings are
arrays; the batch, the chunk and the attended slots (the whole cache, `rows.py` says why) are fixed.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from gpt2_jax.config import GPT2Config
from gpt2_jax.console import warn
from gpt2_jax.model.decode import DecodeWeights
from gpt2_jax.sampling.generate import MIN_PROMPT_BUCKET, left_pad, prompt_bucket
from gpt2_jax.serving import rows as device
from gpt2_jax.serving.choice import ChoiceText, Piece
from gpt2_jax.tokenizers.base import Tokenizer

MAX_TOP_K = 100  # top-k candidates taken per step; a request's top_k may be 1..MAX_TOP_K
CPU_CHUNK, ACCELERATOR_CHUNK = 4, 16  # default decode steps per chunk; see default_chunk


class QueueFull(Exception):
    """The waiting queue has no room for the request's choices."""


class Closed(Exception):
    """The engine takes no new requests: it is draining for shutdown, or its loop failed."""


@dataclasses.dataclass
class Job:
    """One choice of one request. `sink` gets each `Piece` (or an Exception if the engine failed or gave up)."""

    prompt: list[int]
    settings: device.Settings
    stops: Sequence[str]
    sink: Callable[[Piece | Exception], None]
    cancelled: bool = False  # set by the client's side; the engine frees the row at the next chunk boundary
    text: ChoiceText | None = None


def default_chunk() -> int:
    """Decode steps per chunk: a new request waits up to a chunk to join, so a CPU (124M: 40 ms a step at 8 rows
    in benchmarks/README.md) takes short ones; an accelerator's steps take milliseconds, and longer chunks spare it
    host round trips."""
    return CPU_CHUNK if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK


def prompt_buckets(max_len: int) -> list[int]:
    """Prompt widths the prefill compiles for: 16, 32, ... below `max_len`, and `max_len` itself (every width
    `prompt_bucket(n, max_len)` gives)."""
    buckets, width = [], MIN_PROMPT_BUCKET
    while width < max_len:
        buckets.append(width)
        width *= 2
    return [*buckets, max_len]


class Engine:
    """The decode loop's thread and its rows; see the module docstring."""

    def __init__(
        self,
        weights: DecodeWeights,
        config: GPT2Config,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 16,
        max_len: int | None = None,
        chunk: int | None = None,
        max_queue: int = 256,
    ) -> None:
        self.weights, self.config, self.tokenizer = weights, config, tokenizer
        self.max_len, self.chunk, self.max_queue = max_len or config.n_ctx, chunk or default_chunk(), max_queue
        self.buckets = prompt_buckets(self.max_len)
        self.rows = device.init_rows(config, max_batch, self.max_len)
        self.jobs: list[Job | None] = [None] * max_batch
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.closing = False
        self.cancelled = 0  # jobs dropped because their client went away, before they finished
        self.failed: Exception | None = None
        self.eot = np.int32(tokenizer.eot_id)
        self.static = dict(config=config, max_top_k=min(MAX_TOP_K, config.n_vocab))
        self.thread = threading.Thread(target=self._loop, name="gpt2-jax-engine", daemon=True)

    # --- the client's side (any thread) ------------------------------------------------------------------------
    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue a request's jobs, all or none: `QueueFull` if they do not fit, `Closed` while shutting down."""
        with self.cond:
            if self.failed:
                raise Closed(f"The decode loop stopped ({self.failed}); restart the server")
            if self.closing:
                raise Closed("The server is shutting down")
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull()
            self.waiting.extend(jobs)
            self.cond.notify()

    def stats(self) -> dict[str, int]:
        with self.cond:
            active = sum(j is not None for j in self.jobs)
            waiting, cancelled = len(self.waiting), self.cancelled
            return {"active_rows": active, "waiting": waiting, "max_batch": len(self.jobs), "cancelled": cancelled}

    def compiled(self) -> int:
        """Compiled versions of the device functions in this process (unchanged after warm-up: no recompiles)."""
        return sum(getattr(f, "_cache_size", lambda: 0)() for f in (device.admit, device.decode_rows))

    def start(self) -> None:
        self.thread.start()

    def close(self, timeout: float) -> bool:
        """Take no new jobs, finish the queued and running ones within `timeout` seconds, then stop the thread;
        jobs still unfinished then get an error. True if everything finished."""
        if self.thread.ident is None:  # never started (a test of the app alone)
            return True
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join(timeout)
        finished = not self.thread.is_alive()
        if not finished:
            with self.cond:
                self.failed = TimeoutError("the server shut down before this request finished")
                self.cond.notify()
            self.thread.join()
        return finished

    # --- warm-up ----------------------------------------------------------------------------------------------
    def warm_up(self) -> tuple[float, str]:
        """Compile every shape the loop will use; returns the seconds taken and what was compiled."""
        start = time.perf_counter()
        settings = device.settings_arrays(device.Settings(1, 1.0, 1, 1.0, 0, 0))
        for width in self.buckets:
            tokens = np.full((1, width), self.eot, np.int32)
            self.rows, _, _ = device.admit(
                self.weights, self.rows, np.int32(0), tokens, np.int32(1), settings, self.eot, **self.static
            )
        keep = np.zeros(len(self.jobs), bool)
        self.rows, tokens, _ = device.decode_rows(
            self.weights, self.rows, keep, self.eot, steps=self.chunk, **self.static
        )
        jax.block_until_ready(tokens)
        shapes = (
            f"prefill at batch 1 for prompts of {', '.join(map(str, self.buckets))} tokens; decode {len(self.jobs)} "
            f"rows x {self.chunk} steps over {self.max_len} cache slots"
        )
        return time.perf_counter() - start, shapes

    # --- the engine's thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while self._next_round():
                pass
        except Exception as e:  # a device or library failure: every waiting client hears of it, nobody hangs
            warn(f"the decode loop failed: {type(e).__name__}: {e}")
            with self.cond:
                self.failed = e
        self._fail_all(self.failed)

    def _next_round(self) -> bool:
        """Admit what fits, run one chunk; False once closing and nothing is left (or the close timed out)."""
        with self.cond:
            while not (self.waiting or self._busy() or self.closing or self.failed):
                self.cond.wait()
            if self.failed or (self.closing and not self.waiting and not self._busy()):
                return False
        # Jobs that arrive while others are prefilled join before the chunk too, not a chunk later (clients that
        # all finished together send their next requests together), until the rows are full or nobody waits.
        while admitted := self._seat_waiting():
            for row in admitted:
                self._admit(row)
        if self._busy():
            self._decode()
        return True

    def _seat_waiting(self) -> list[int]:
        """Free the rows of cancelled jobs, give free rows to waiting jobs; the rows given."""
        seated = []
        with self.cond:
            for row in range(len(self.jobs)):
                job = self.jobs[row]
                if job is not None and job.cancelled:
                    self.jobs[row] = job = None
                    self.cancelled += 1
                while job is None and self.waiting:
                    job = self.waiting.popleft()
                    if job.cancelled:
                        job = None
                        self.cancelled += 1
                    else:
                        self.jobs[row] = job
                        seated.append(row)
        return seated

    def _busy(self) -> bool:
        return any(job is not None for job in self.jobs)

    def _admit(self, row: int) -> None:
        job = self.jobs[row]
        n = len(job.prompt)
        tokens, _ = left_pad([job.prompt], prompt_bucket(n, self.max_len), self.eot)  # the sampler's shapes
        settings = device.settings_arrays(job.settings)
        self.rows, token, logprob = device.admit(
            self.weights, self.rows, np.int32(row), tokens, np.int32(n), settings, self.eot, **self.static
        )
        job.text = ChoiceText(self.tokenizer, job.stops, job.settings.max_tokens)
        self._deliver(row, np.asarray(token).tolist(), np.asarray(logprob).tolist())

    def _decode(self) -> None:
        keep = np.asarray([job is not None and not job.cancelled for job in self.jobs])
        self.rows, tokens_BC, logprobs_BC = device.decode_rows(
            self.weights, self.rows, keep, self.eot, steps=self.chunk, **self.static
        )
        tokens_BC, logprobs_BC = np.asarray(tokens_BC), np.asarray(logprobs_BC)
        for row, job in enumerate(self.jobs):
            if job is not None and keep[row]:
                drawn = tokens_BC[row] >= 0
                self._deliver(row, tokens_BC[row][drawn].tolist(), logprobs_BC[row][drawn].tolist())

    def _deliver(self, row: int, tokens: list[int], logprobs: list[float]) -> None:
        job = self.jobs[row]
        piece = job.text.add(tokens, logprobs)
        if piece.finish_reason is not None:
            with self.cond:
                self.jobs[row] = None  # the device row stops itself (eot, max_tokens) or at the next keep mask
        if piece.text or piece.tokens or piece.finish_reason:
            job.sink(piece)

    def _fail_all(self, error: Exception | None) -> None:
        with self.cond:
            jobs = [j for j in self.jobs if j is not None] + list(self.waiting)
            self.jobs = [None] * len(self.jobs)
            self.waiting.clear()
        for job in jobs:
            job.sink(error or Closed("The server stopped"))
