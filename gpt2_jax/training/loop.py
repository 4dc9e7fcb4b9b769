"""The training loop: one jitted step after another, and after each whatever is due (events.py): a log line, a
checkpoint, a stop, validation, samples.

The host dispatches step n, draws batch n+1 while the device computes, and only then reads step n-1's loss (done by
then), so the device always has the next step queued; the host waits for the device only after the first step (to
time the compile) and at steps where something is due. The log line is nshepperd's with rate and MFU:

    [step | elapsed] loss=3.21 avg=3.40 lr=6.00e-04 tok/s=12345 mfu=41.2%

where avg is nshepperd's bias-corrected moving average (decay 0.99). A float16 run adds its loss scale and the steps
skipped so far (`scale=32768 skipped=0`, loss_scale.py); an accelerator without a known peak shows `mfu=n/a`. A
skipped float16 step is the loss scaler's business, not a divergence, unless it overflowed at the smallest scale.
A NaN/Inf (or exploding) loss stops the run at once with no checkpoint written, and a checkpoint of the weights that
produced it is deleted, so the last good one stays the newest. SIGTERM and Ctrl-C finish the step in flight, write a
checkpoint and return 128 + the signal number (143, 130); a second Ctrl-C interrupts at once. In a run over several
processes only process 0 prints, and a signal to any process stops them all at the next log step (events.py). Every
record metrics.jsonl gets, and every sample, also goes to the trackers `--tracker` names (tracking.py).
"""

from __future__ import annotations

import math
import shlex
import signal
import sys
import time
from itertools import islice
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from gpt2_jax.console import is_primary, print_utf8
from gpt2_jax.data.batches import BatchSampler, eval_windows
from gpt2_jax.errors import UserError
from gpt2_jax.hints import command_for
from gpt2_jax.model.flops import flops_per_token
from gpt2_jax.model.lora import adapter_count, merge
from gpt2_jax.model.params import count_params
from gpt2_jax.training.distributed import global_batch, host_copy, local_rows
from gpt2_jax.training.events import Due, due_at, periodic, stop_agreed, stop_signals
from gpt2_jax.training.loss_scale import MIN_SCALE
from gpt2_jax.training.run_dir import format_samples
from gpt2_jax.training.setup import Session, prepare
from gpt2_jax.training.step import all_finite
from gpt2_jax.training.tracking import Trackers, open_trackers

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


def step_flops_per_token(s: Session) -> float:
    """The train step's model FLOPs per token: 6N + attention, and with LoRA 2N fewer, since the frozen base's
    weight gradients (a third of the matmul work) are never computed, plus 6 per adapter parameter."""
    flops = flops_per_token(s.model_config, s.seq_len)
    lora_config = s.cfg.lora()
    if lora_config is None:
        return flops
    mc = s.model_config
    return flops - 2 * (count_params(mc) - mc.n_ctx * mc.n_embd) + 6 * adapter_count(mc, lora_config)


class Diverged(UserError):
    """The loss blew up: the message names the step and suggests a lower learning rate."""


def run_training(explicit: dict[str, Any], *, bundled_dataset: str) -> int:
    """train.py's whole job: build the session, train, always release the lock and finish pending saves."""
    session = prepare(explicit, bundled_dataset=bundled_dataset)
    try:
        with session_trackers(session) as trackers:
            return Loop(session, trackers).run()
    finally:
        session.close()


def session_trackers(s: Session) -> Trackers:
    """The --tracker trackers, in process 0 only (the one that writes the run directory)."""
    if not s.run.writer:
        return Trackers([])
    return open_trackers(
        s.cfg.tracker, s.run.path, start_step=s.start_step, logged_until=s.run.logged_until, options=s.cfg.to_json()
    )


class Loop:
    def __init__(self, s: Session, trackers: Trackers) -> None:
        self.s = s
        self.trackers = trackers
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
        scaler = s.state.loss_scale
        self.skipped_steps = int(jax.device_get(scaler.skipped)) if scaler is not None else 0
        self.records = s.records
        self.flops_per_token = step_flops_per_token(s)
        self.start = time.perf_counter()
        self.window_step, self.window_start = self.step, self.start  # what the next log line's rate measures
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
        skipped = self.scaler_skipped(step, values)
        if not (math.isfinite(loss) and loss < DIVERGED_LOSS and (skipped or math.isfinite(grad_norm))):
            what, bad = ("gradient norm", grad_norm) if loss < DIVERGED_LOSS else ("loss", loss)
            self.diverged(step, what, bad, values["lr"])
        values["avg"] = self.avg.update(loss)
        return values

    def scaler_skipped(self, step: int, values: dict[str, float]) -> bool:
        """Whether float16's loss scaler dropped this step's update for non-finite gradients; at the smallest scale
        that is a diverging run (gradients too large for float16 unscaled), which stops here."""
        if "skipped_steps" not in values:
            return False
        skipped = int(values["skipped_steps"]) > self.skipped_steps
        self.skipped_steps = int(values["skipped_steps"])
        if skipped and values["loss_scale"] <= MIN_SCALE:
            self.diverged(step, f"gradient norm at float16's smallest loss scale ({MIN_SCALE:g})", values["grad_norm"],
                          values["lr"])  # fmt: skip
        return skipped

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
            **({"loss_scale": self.s.state.loss_scale.to_json()} if self.s.state.loss_scale is not None else {}),
        }

    def save(self, data_state: dict[str, Any]) -> None:
        if not bool(all_finite(self.s.state.params)):
            raise Diverged(f"The params hold NaN/Inf at step {self.step}; lower --learning_rate and resume.")
        self.s.checkpoints.save(self.step, self.s.state.params, self.s.state.opt_state, self.meta(data_state))

    def restart_window(self) -> None:
        """Start the interval over which the next log line measures tok/s and MFU."""
        self.window_step, self.window_start = self.step, time.perf_counter()

    def log(self, values: dict[str, float]) -> None:
        s = self.s
        now = time.perf_counter()
        tokens_per_s = (self.step - self.window_step) * self.tokens_per_step / max(now - self.window_start, 1e-9)
        self.window_step, self.window_start = self.step, now
        mfu = None if s.peak_flops is None else 100.0 * tokens_per_s * self.flops_per_token / s.peak_flops
        elapsed = self.elapsed()
        # A loss scale is a power of two, at least 1: a whole number.
        scaling = f"scale={values['loss_scale']:.0f} skipped={self.skipped_steps} " if "loss_scale" in values else ""
        tqdm.write(
            f"[{self.step} | {elapsed:.2f}] loss={values['loss']:.2f} avg={values['avg']:.2f} "
            f"lr={values['lr']:.2e} {scaling}tok/s={tokens_per_s:.0f} mfu={'n/a' if mfu is None else f'{mfu:.1f}%'}",
            file=sys.stdout,
        )
        record = {"step": self.step, "loss": values["loss"], "avg": values["avg"], "lr": values["lr"]}
        if math.isfinite(values["grad_norm"]):  # a skipped float16 step's is Inf or NaN, which JSON cannot hold
            record["grad_norm"] = values["grad_norm"]
        if "loss_scale" in values:
            record.update(loss_scale=values["loss_scale"], skipped_steps=self.skipped_steps)
        record.update(tokens=self.tokens_seen, tokens_per_s=tokens_per_s)
        record.update({"mfu": mfu} if mfu is not None else {}, elapsed=elapsed)
        self.add_record(record)
        if time.perf_counter() - self.last_plot > PLOT_INTERVAL_S:
            self.plot()

    def add_record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.s.run.append_metrics(record)
        self.trackers.log(record)

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
            loss_sum, n = s.eval_step(s.state.model_params(), rows_array, global_batch(weight[mine], s.mesh, batch))
            # Read each batch's sums before the next is sent (a host sync per batch, outside the training steps):
            # XLA:CPU runs every device's part of a program on one shared thread pool, and with several programs
            # holding collectives in flight it can start the next one's part before this one's other part, so both
            # wait at their all-reduce until its 40 s abort (seen 1 in 24 kill -9/resume trials on 2 devices; the
            # eval steps, unlike the train steps, do not depend on each other). One such program at a time.
            total, count = total + float(loss_sum), count + float(n)
        val_loss = total / max(count, 1.0)
        tqdm.write(f"[{self.step} | {self.elapsed():.2f}] validation loss={val_loss:.3f}", file=sys.stdout)
        self.add_record(
            {"step": self.step, "val_loss": val_loss, "tokens": self.tokens_seen, "elapsed": self.elapsed()}
        )
        self.plot()

    def sample(self) -> None:
        s, cfg = self.s, self.s.cfg
        if cfg.sample_num < 1:
            return
        from gpt2_jax.sampling.sampler import generate_text  # imported late: a run without samples never needs it

        seed = int(np.asarray(jax.device_get(s.state.rng)).ravel()[-1]) + self.step
        params = s.state.params
        if s.state.frozen is not None:  # the sampler's forward reads plain GPT-2 weights: merge the adapters in
            params = merge(s.state.frozen, params, s.cfg.lora())
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
        self.trackers.samples(self.step, format_samples(texts, cfg.sample_prompt))
        tqdm.write(f"[{self.step} | {self.elapsed():.2f}] samples (also in {path}):", file=sys.stdout)
        print_utf8(format_samples(texts, cfg.sample_prompt).rstrip("\n"))

    # --- the loop --------------------------------------------------------------------------------------------------
    def run(self) -> int:
        s, cfg = self.s, self.s.cfg
        if self.step >= cfg.steps:
            print(f"{s.run.path} is already at step {self.step} of --steps {cfg.steps}; pass a larger --steps.")
            return 0
        first_step = self.step + 1  # it includes the compile
        batch = self.next_batch()
        pending = None  # (step, metrics) dispatched but not read yet
        self.restart_window()
        with (
            stop_signals() as stop,
            tqdm(total=cfg.steps, initial=self.step, unit="step", disable=None if is_primary() else True) as bar,
        ):
            while self.step < cfg.steps:
                metrics, data_state, batch = self.dispatch(batch)
                if pending is not None:
                    self.read(*pending)  # the step before: finished by now, so reading it costs no wait
                pending = (self.step, metrics)
                bar.update(1)
                stopping = stop_agreed(stop, at_log_step=periodic(self.step, cfg.log_every))
                due = due_at(self.step, cfg, stopping=stopping)
                if not due.anything and self.step != first_step:
                    continue  # no host sync: the device already has the next step queued
                values, pending = self.read(*pending), None
                if self.step == first_step:
                    self.report_compile()
                exit_code = self.run_due(due, values, data_state, stop)
                if exit_code is not None:
                    return exit_code
                if self.step == first_step:
                    self.restart_window()  # the other steps are timed without the compile
        return self.finish()

    def dispatch(self, batch: jax.Array) -> tuple[dict[str, jax.Array], dict[str, Any], jax.Array | None]:
        """Queue one step on the device, then draw the next batch while it computes; returns (the step's metrics,
        unread; the data position that goes with it; the next batch, None after the last step)."""
        s = self.s
        s.state, metrics = s.train_step(s.state, batch)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        data_state = self.sampler.state()
        return metrics, data_state, self.next_batch() if self.step < s.cfg.steps else None

    def run_due(
        self, due: Due, values: dict[str, float], data_state: dict[str, Any], stop: dict[str, int]
    ) -> int | None:
        """Whatever `due` holds, in this order; returns the exit code when the run stops here."""
        if due.log:
            self.s.checkpoints.check()  # a save that failed in the background stops the run now
            self.log(values)
        if due.save:
            self.save(data_state)
        if due.stop:
            return self.stopped(stop)
        if due.validate:
            self.validate()
        if due.sample:
            self.sample()
        if due.validate or due.sample:
            self.restart_window()  # time spent validating or sampling is not training time
        return None

    def report_compile(self) -> None:
        """The first step's time, compile included (its metrics have been read: it has finished)."""
        tqdm.write(f"compiled and ran the first step in {time.perf_counter() - self.start:.1f} s")

    def stopped(self, stop: dict[str, int]) -> int:
        """128 + the signal's number, once the checkpoint saved for it is complete."""
        self.s.checkpoints.wait()
        signum = stop.get("signum", signal.SIGTERM)  # a peer process was signalled: stop as it does
        name = signal.Signals(signum).name
        print(f"stopped by {name} at step {self.step}; checkpoint saved in {self.s.run.checkpoints}")
        return 128 + signum

    def finish(self) -> int:
        s = self.s
        s.checkpoints.wait()
        self.sample()
        self.plot()
        sample = f"{command_for('sample')} --model {shlex.quote(str(s.run.path))}"
        print(f"done: step {self.step} saved in {s.run.path}; sample it with: {sample}")
        return 0
