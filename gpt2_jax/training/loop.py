"""The training loop: log lines, validation, samples, checkpoints, signals, all around one jitted step.

The host dispatches step n, draws batch n+1 while the device computes, and only then reads step n-1's loss (done by
then), so the device always has the next step queued and the host waits on it only at log, validation, sample and
checkpoint steps. The log line is nshepperd's with rate and MFU:

    [step | elapsed] loss=3.21 avg=3.40 lr=6.00e-04 tok/s=12345 mfu=41.2%

where avg is nshepperd's bias-corrected moving average (decay 0.99). A NaN/Inf (or exploding) loss stops the run at
once with no checkpoint written, and a checkpoint of the weights that produced it is deleted, so the last good one
stays the newest. SIGTERM and Ctrl-C finish the step in flight, write a checkpoint and return 128 + the signal
number (143, 130); a second Ctrl-C interrupts at once. In a run over several processes only process 0 prints, and
a signal to any process stops them all at the next log step (see `stop_agreed`).
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from gpt2_jax.data.batches import BatchSampler, eval_windows
from gpt2_jax.errors import UserError
from gpt2_jax.model.flops import flops_per_token, measure_matmul_flops
from gpt2_jax.training.distributed import global_batch, host_copy, is_primary, local_rows
from gpt2_jax.training.run_dir import format_samples, print_utf8
from gpt2_jax.training.setup import Session, prepare
from gpt2_jax.training.step import all_finite

PLOT_INTERVAL_S = 30.0
# A uniform guess scores ln(n_vocab) (10.8 nats for GPT-2); a loss far above any model's is a run blowing up.
DIVERGED_LOSS = 100.0


class MovingAverage:
    """nshepperd's avg: (sum * 0.99 + loss) / (count * 0.99 + 1), unbiased from the first step."""

    def __init__(self, state: list[float] | None = None) -> None:
        self.total, self.weight = state or (0.0, 0.0)

    def update(self, value: float) -> float:
        self.total, self.weight = self.total * 0.99 + value, self.weight * 0.99 + 1.0
        return self.value

    @property
    def value(self) -> float:
        return self.total / self.weight if self.weight else float("nan")

    def state(self) -> list[float]:
        return [self.total, self.weight]


class Diverged(UserError):
    """The loss blew up: the message names the step and suggests a lower learning rate."""


@contextmanager
def stop_signals() -> Iterator[dict[str, int]]:
    """Turn SIGTERM and the first Ctrl-C into a flag the loop polls; a second Ctrl-C interrupts at once."""
    received: dict[str, int] = {}
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if "signum" in received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received["signum"] = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_training(explicit: dict[str, Any], *, bundled_dataset: str) -> int:
    """train.py's whole job: build the session, train, always release the lock and finish pending saves."""
    session = prepare(explicit, bundled_dataset=bundled_dataset)
    try:
        return Loop(session).run()
    finally:
        session.close()


class Loop:
    def __init__(self, s: Session) -> None:
        self.s = s
        cfg, meta = s.cfg, s.meta
        self.step = s.start_step
        self.sampler = BatchSampler(s.dataset.train, cfg.batch_size, s.seq_len, cfg.seed)
        self.rows = local_rows(s.mesh, cfg.batch_size)  # this process's share of every global batch
        if meta:
            self.sampler.restore(meta["data"])
        self.tokens_per_step = cfg.batch_size * s.seq_len
        self.tokens_seen = int(meta.get("tokens_seen", self.step * self.tokens_per_step)) if meta else 0
        self.elapsed_before = float(meta.get("elapsed", 0.0)) if meta else 0.0
        self.avg = MovingAverage(meta.get("avg") if meta else None)
        self.records = s.records
        self.flops_per_token = flops_per_token(s.model_config, s.seq_len)
        self.start = time.perf_counter()
        self.last_plot = 0.0

    # --- helpers ---------------------------------------------------------------------------------------------------
    def next_batch(self) -> jax.Array:
        """The next global batch, of which this process reads and sends only its own rows."""
        return global_batch(self.sampler.next_batch(self.rows), self.s.mesh, self.s.cfg.batch_size)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def read(self, step: int, metrics: dict[str, jax.Array]) -> dict[str, float]:
        """Host copy of one step's metrics; a NaN/Inf or exploding loss stops the run here."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        loss, grad_norm = values["loss"], values["grad_norm"]
        if not (math.isfinite(loss) and loss < DIVERGED_LOSS and math.isfinite(grad_norm)):
            what, bad = ("gradient norm", grad_norm) if loss < DIVERGED_LOSS else ("loss", loss)
            self.diverged(step, what, bad, values["lr"])
        values["avg"] = self.avg.update(loss)
        return values

    def diverged(self, step: int, what: str, bad: float, lr: float) -> None:
        # Step n's loss judges the weights after update n-1: a checkpoint of those (or later ones) is not good.
        self.s.checkpoints.wait()
        dropped = self.s.checkpoints.delete_after(step - 2)
        latest = self.s.checkpoints.latest_step()
        kept = f"the last good checkpoint, step {latest}, stays the newest" if latest else "no good checkpoint exists"
        if dropped:
            kept += f" (deleted {', '.join(map(str, dropped))}, saved from the diverging weights)"
        raise Diverged(
            f"Training diverged: the {what} became {bad:.3g} at step {step} (learning rate {lr:.3g}); {kept}; "
            f"lower --learning_rate (try {self.s.cfg.learning_rate / 10:.3g}) and resume with --restore_from latest."
        )

    def meta(self, data_state: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": self.step,
            "rng": [int(x) for x in np.asarray(jax.device_get(self.s.state.rng)).ravel()],
            "data": data_state,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed(),
            "avg": self.avg.state(),
            "seq_len": self.s.seq_len,
            "batch_size": self.s.cfg.batch_size,
        }

    def save(self, data_state: dict[str, Any]) -> None:
        if not bool(all_finite(self.s.state.params)):
            raise Diverged(f"The params hold NaN/Inf at step {self.step}; lower --learning_rate and resume.")
        self.s.checkpoints.save(self.step, self.s.state.params, self.s.state.opt_state, self.meta(data_state))

    def log(self, values: dict[str, float], interval_tokens: int, interval_s: float) -> None:
        s = self.s
        tokens_per_s = interval_tokens / max(interval_s, 1e-9)
        mfu = 100.0 * tokens_per_s * self.flops_per_token / s.peak_flops
        elapsed = self.elapsed()
        tqdm.write(
            f"[{self.step} | {elapsed:.2f}] loss={values['loss']:.2f} avg={values['avg']:.2f} "
            f"lr={values['lr']:.2e} tok/s={tokens_per_s:.0f} mfu={mfu:.1f}%",
            file=sys.stdout,
        )
        record = {"step": self.step, "loss": values["loss"], "avg": values["avg"], "lr": values["lr"]}
        record.update(grad_norm=values["grad_norm"], tokens=self.tokens_seen, tokens_per_s=tokens_per_s)
        record.update(mfu=mfu, elapsed=elapsed)
        self.add_record(record)
        if time.perf_counter() - self.last_plot > PLOT_INTERVAL_S:
            self.plot()

    def add_record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.s.run.append_metrics(record)

    def plot(self) -> None:
        self.s.run.plot_loss(self.records, title=f"{self.s.run.path.name}: {self.s.description}")
        self.last_plot = time.perf_counter()

    def validate(self) -> None:
        s = self.s
        if s.dataset.val is None:
            return
        batch = s.cfg.batch_size // s.cfg.accumulate_gradients
        windows = eval_windows(s.dataset.val, batch, s.seq_len)
        total = count = 0.0
        mine = local_rows(s.mesh, batch)
        for rows in islice(windows, s.cfg.val_batches or None):
            weight = np.zeros(batch, np.float32)
            weight[: len(rows)] = 1.0
            if len(rows) < batch:  # pad the last batch to the compiled shape; padded rows weigh nothing
                rows = np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows), axis=0)])
            rows_array = global_batch(rows[mine], s.mesh, batch)
            loss_sum, n = s.eval_step(s.state.params, rows_array, global_batch(weight[mine], s.mesh, batch))
            total, count = total + loss_sum, count + n
        val_loss = float(total) / max(float(count), 1.0)
        tqdm.write(f"[{self.step} | {self.elapsed():.2f}] validation loss={val_loss:.3f}", file=sys.stdout)
        if s.mesh.devices.flat[0].platform == "cpu":
            # A CPU's peak is a matmul measured while other programs may share the cores: keep the best seen.
            s.peak_flops = max(s.peak_flops, measure_matmul_flops(s.model_config.dtype, repeats=3))
        self.add_record(
            {"step": self.step, "val_loss": val_loss, "tokens": self.tokens_seen, "elapsed": self.elapsed()}
        )
        self.plot()

    def sample(self) -> None:
        s, cfg = self.s, self.s.cfg
        if cfg.sample_num < 1:
            return
        from gpt2_jax.sampling.generate import generate_text  # imported late: a run without samples never needs it

        seed = int(np.asarray(jax.device_get(s.state.rng)).ravel()[-1]) + self.step
        params = s.state.params
        if s.sharding != "replicated" or jax.process_count() > 1:
            # The sampler runs on one process's devices: gather the sharded weights (every process takes part).
            params = host_copy(params)
        if not is_primary():
            return
        texts = generate_text(
            params, s.model_config, s.tokenizer, [cfg.sample_prompt],
            nsamples_per_prompt=cfg.sample_num, length=cfg.sample_length, seed=seed,
        )[0]  # fmt: skip
        path = s.run.write_samples(self.step, texts, cfg.sample_prompt)
        tqdm.write(f"[{self.step} | {self.elapsed():.2f}] samples (also in {path}):", file=sys.stdout)
        print_utf8(format_samples(texts, cfg.sample_prompt).rstrip("\n"))

    def stop_agreed(self, stop: dict[str, int], *, at_log_step: bool) -> bool:
        """Whether to save and stop after this step. One process decides alone at once; several processes must
        agree, since saving is collective, so they compare their signal flags at log steps (where the host waits
        anyway): a run over several hosts stops within --log_every steps of a signal to any of them."""
        if jax.process_count() == 1:
            return "signum" in stop
        if not at_log_step:
            return False
        return bool(np.any(host_copy(np.array(["signum" in stop]))))

    # --- the loop --------------------------------------------------------------------------------------------------
    def run(self) -> int:
        s, cfg = self.s, self.s.cfg
        if self.step >= cfg.steps:
            print(f"{s.run.path} is already at step {self.step} of --steps {cfg.steps}; pass a larger --steps.")
            return 0
        every = lambda n: n > 0 and self.step % n == 0
        batch = self.next_batch()
        pending = None  # (step, metrics) dispatched but not read yet
        last_log_step, last_log_time, first = self.step, time.perf_counter(), True
        with (
            stop_signals() as stop,
            tqdm(total=cfg.steps, initial=self.step, unit="step", disable=None if is_primary() else True) as bar,
        ):
            while self.step < cfg.steps:
                s.state, metrics = s.train_step(s.state, batch)
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                data_state = self.sampler.state()  # the data position that goes with this step
                if self.step < cfg.steps:
                    batch = self.next_batch()  # overlaps the device's work
                if pending is not None:
                    self.read(*pending)
                pending = (self.step, metrics)
                bar.update(1)
                stopping = self.stop_agreed(stop, at_log_step=every(cfg.log_every))
                boundary = (
                    every(cfg.log_every) or every(cfg.val_every) or every(cfg.sample_every)
                    or every(cfg.save_every) or self.step == cfg.steps or stopping
                )  # fmt: skip
                if first:  # the first step includes compiling: say how long, and time the others without it
                    values, pending, first = self.read(*pending), None, False
                    tqdm.write(f"compiled and ran the first step in {time.perf_counter() - self.start:.1f} s")
                    if not boundary:
                        last_log_step, last_log_time = self.step, time.perf_counter()
                        continue
                elif not boundary:
                    continue
                else:
                    values, pending = self.read(*pending), None
                if every(cfg.log_every) or self.step == cfg.steps:
                    s.checkpoints.check()  # a save that failed in the background stops the run now
                    now = time.perf_counter()
                    self.log(values, (self.step - last_log_step) * self.tokens_per_step, now - last_log_time)
                    last_log_step, last_log_time = self.step, now
                if every(cfg.save_every) or self.step == cfg.steps or stopping:
                    self.save(data_state)
                if stopping:
                    s.checkpoints.wait()
                    signum = stop.get("signum", signal.SIGTERM)  # a peer process was signalled: stop as it does
                    name = signal.Signals(signum).name
                    print(f"stopped by {name} at step {self.step}; checkpoint saved in {s.run.checkpoints}")
                    return 128 + signum
                paused = False  # time spent validating or sampling is not training time
                if every(cfg.val_every) or self.step == cfg.steps:
                    self.validate()
                    paused = True
                if every(cfg.sample_every) and self.step < cfg.steps:
                    self.sample()
                    paused = True
                if paused:
                    last_log_step, last_log_time = self.step, time.perf_counter()
        s.checkpoints.wait()
        self.sample()
        self.plot()
        print(f"done: step {self.step} saved in {s.run.path}; sample it with: python sample.py --model {s.run.path}")
        return 0
