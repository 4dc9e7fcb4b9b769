"""A training run's directory: model description, tokenizer, lock, metrics, loss plot and samples.

    runs/NAME/gpt2_jax.json      model config + "training": the run's options (a model directory for sample.py)
                                 + "lora": a LoRA run's adapters and base model (weights/lora_run.py)
    runs/NAME/encoder.json, vocab.bpe | tokenizer.model
    runs/NAME/checkpoints/       see checkpoints.py
    runs/NAME/metrics.jsonl      one JSON object per logged step (step, loss, avg, lr, tokens_per_s, ...) and per
                                 validation (step, val_loss, ...)
    runs/NAME/loss.png           train and validation loss against tokens seen, redrawn as the run goes
    runs/NAME/samples/           samples-STEP.txt
    runs/NAME/tensorboard/       event files, with --tracker tensorboard (tracking.py)
    runs/NAME/tracking.json      the W&B run id, with --tracker wandb (and runs/NAME/wandb/, W&B's local files)
    runs/NAME/train.lock         {"pid", "host"} of the process training in it

Every file is replaced whole through a temporary name (never half-written) except metrics.jsonl, which is appended
one flushed line at a time; a resumed run first drops the records past the step it resumes from (and the
trackers' event files drop them too: tracking.py).

In a run over several processes every process has a RunDir, but only process 0's (`writer=True`) writes, locks or
deletes anything: the others read.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError
from gpt2_jax.io import atomic_write_bytes, pid_alive
from gpt2_jax.tokenizers.base import Tokenizer
from gpt2_jax.training import tracking
from gpt2_jax.weights import native

LOCK_FILE = "train.lock"


class RunLock:
    """`train.lock` holding the pid and host of the one process allowed to train in a run directory."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}  # unreadable: a holder that died while writing (we write it whole, so not a live one)

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock of a dead process was taken over."""
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}")
        try:
            tmp.write_text(record, encoding="utf-8")
        except OSError as e:
            raise UserError(
                f"Cannot write in the run directory {self.path.parent} ({e.strerror or e}); make it writable or "
                "train into another --run_name / --out."
            )
        note = None
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic: fails when the lock exists, never half-written
                    self.held = True
                    return note
                except FileExistsError:
                    holder = self._holder()
                    if holder is None:
                        continue
                    pid, host = holder.get("pid"), holder.get("host")
                    if isinstance(pid, int) and host == socket.gethostname() and pid_alive(pid):
                        raise UserError(
                            f"{self.path.parent} is in use by another train.py (pid {pid}); wait for it to finish, "
                            "stop it, or train into another --run_name."
                        )
                    if isinstance(pid, int) and host not in (None, socket.gethostname()):
                        raise UserError(
                            f"{self.path.parent} is locked by pid {pid} on host {host}; if that run is gone, "
                            f"delete {self.path} and start again."
                        )
                    if self._holder() == holder:  # still the same stale record: take it over
                        self.path.unlink(missing_ok=True)
                        note = f"took over the stale lock of a training process that is gone (pid {pid})"
            raise UserError(f"Could not take the lock {self.path}; another train.py keeps starting in this directory.")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


class RunDir:
    """Paths and small writers of one run directory (writers do nothing unless `writer`)."""

    def __init__(self, path: str | os.PathLike, *, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self.checkpoints = self.path / "checkpoints"
        self.samples = self.path / "samples"
        self.metrics_path = self.path / "metrics.jsonl"
        self.plot_path = self.path / "loss.png"
        self.lock = RunLock(self.path)
        self.logged_until = 0  # the newest step in metrics.jsonl before a resume cut it back (tracking.py)

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"Cannot create the run directory {self.path}: {e.strerror or e}.")

    def write_model(
        self, config: GPT2Config, tokenizer: Tokenizer, training: dict[str, Any], lora: dict[str, Any] | None = None
    ) -> None:
        """gpt2_jax.json (config + training options, and a LoRA run's record: weights/lora_run.py) and the
        tokenizer files: what makes the run a model."""
        if not self.writer:
            return
        tokenizer.save(self.path)
        native.write_model_json(self.path, config, training=training, **({"lora": lora} if lora else {}))

    def read_training_options(self) -> dict[str, Any] | None:
        try:
            record = json.loads((self.path / native.CONFIG_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path / native.CONFIG_FILE} is damaged ({e}); restore it or start fresh.")
        return record.get("training")

    # --- metrics ---------------------------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash
        return records

    def keep_metrics_until(self, step: int) -> list[dict[str, Any]]:
        """Drop records past `step` (a resumed run redoes those steps); returns the kept ones."""
        records = self.read_metrics()
        self.logged_until = max((r.get("step", 0) for r in records), default=0)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records) and self.writer:
            atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept

    def clear_outputs(self) -> None:
        """Forget a previous run's metrics, plot, samples and trackers' records (a fresh start with --overwrite)."""
        if not self.writer:
            return
        self.metrics_path.unlink(missing_ok=True)
        self.plot_path.unlink(missing_ok=True)
        shutil.rmtree(self.samples, ignore_errors=True)
        tracking.forget(self.path)

    # --- plot and samples ------------------------------------------------------------------------------------------
    def plot_loss(self, records: list[dict[str, Any]], title: str = "") -> None:
        """loss.png: training loss (and its moving average) and validation loss against tokens seen."""
        if not self.writer:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg only: no display needed, no global state
        from matplotlib.figure import Figure

        train = [r for r in records if "loss" in r and "tokens" in r]
        val = [r for r in records if "val_loss" in r and "tokens" in r]
        figure = Figure(figsize=(8, 5), dpi=100)
        axes = figure.add_subplot()
        if train:
            axes.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.5, label="train")
            if all("avg" in r for r in train):
                axes.plot([r["tokens"] for r in train], [r["avg"] for r in train], lw=1.5, label="train (avg)")
        if val:
            axes.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", lw=1.5, label="validation")
        axes.set_xlabel("tokens seen")
        axes.set_ylabel("loss (nats per token)")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if train or val:
            axes.legend()
        tmp = self.plot_path.with_name(f".{self.plot_path.name}.tmp-{os.getpid()}.png")
        FigureCanvasAgg(figure).print_png(str(tmp))
        os.replace(tmp, self.plot_path)

    def write_samples(self, step: int, samples: list[str], prompt: str = "") -> Path:
        """samples/samples-STEP.txt, OpenAI's `==== SAMPLE n ====` headers, UTF-8 whatever the platform."""
        if not self.writer:
            return self.samples / f"samples-{step}.txt"
        self.samples.mkdir(parents=True, exist_ok=True)
        path = self.samples / f"samples-{step}.txt"
        atomic_write_bytes(path, format_samples(samples, prompt).encode("utf-8"))
        return path


def format_samples(samples: list[str], prompt: str = "") -> str:
    return "".join(f"==== SAMPLE {i} ====\n{prompt}{text}\n" for i, text in enumerate(samples, start=1))
