"""Experiment trackers: the records of metrics.jsonl (and the samples) sent on to TensorBoard and/or W&B.

`--tracker` names them: `none` (the default), `tensorboard`, `wandb`, or a comma list. Each gets every record the
loop appends to metrics.jsonl, as it appends it, under these chart names:

    loss avg lr grad_norm        train/loss train/loss_avg train/lr train/grad_norm
    loss_scale skipped_steps     train/loss_scale train/skipped_steps   (float16 runs: loss_scale.py)
    tokens_per_s mfu             perf/tokens_per_s perf/mfu_percent
    tokens elapsed               progress/tokens progress/elapsed_s
    val_loss                     val/loss   (a validation record's tokens and elapsed repeat its log line's)
    the samples' text            samples

TensorBoard: tensorboardX's writer (no TensorFlow), event files in `RUN/tensorboard/`, one file per session of the
run. W&B: `wandb` is imported only when asked for and honours its own environment (WANDB_MODE=offline, WANDB_DIR,
WANDB_PROJECT, ...); its local files go to `RUN/wandb/` unless WANDB_DIR says otherwise, and the run's id is kept
in `RUN/tracking.json` so a resumed training run continues the same W&B run.

A resume never shows a step twice or a step going back. A run resumed from step S redoes the steps after S that
the stopped session may already have logged: metrics.jsonl drops them (run_dir.py), the event files are cut back
to S the same way (so any reader, TensorBoard's Rust loader included, sees one value per step) and the new file
starts with TensorBoard's purge marker at S + 1 (for a TensorBoard that is already watching). W&B's steps only go
forward, so it keeps what it already holds for those steps and takes records again after them.

Only process 0 tracks. A missing package is one sentence at start-up (`check_trackers`, from the flag checks),
before anything is built or compiled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from gpt2_jax.console import note
from gpt2_jax.errors import UsageError, UserError, short_reason
from gpt2_jax.io import atomic_write_bytes

TRACKERS = {"tensorboard": "tensorboardX", "wandb": "wandb"}  # name -> the package it needs
TENSORBOARD_DIR = "tensorboard"
STATE_FILE = "tracking.json"
PROJECT = "gpt2-jax"  # the W&B project unless WANDB_PROJECT names one
TRAIN_CHARTS = {
    "loss": "train/loss",
    "avg": "train/loss_avg",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "loss_scale": "train/loss_scale",
    "skipped_steps": "train/skipped_steps",
    "tokens_per_s": "perf/tokens_per_s",
    "mfu": "perf/mfu_percent",
    "tokens": "progress/tokens",
    "elapsed": "progress/elapsed_s",
}
VAL_CHARTS = {"val_loss": "val/loss"}
SAMPLES_CHART = "samples"


def tracker_names(value: str) -> list[str]:
    """The trackers a --tracker value names ('none' and '' name none)."""
    names = [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]
    return list(dict.fromkeys(names))


def check_trackers(value: str) -> None:
    """Known names whose packages are installed, or one sentence (exit code 2); imports nothing."""
    for name in tracker_names(value):
        if name not in TRACKERS:
            raise UsageError(
                f"--tracker {value}: unknown tracker {name!r}; choose none, tensorboard, wandb or a comma list."
            )
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise UsageError(
                f"--tracker {name} needs the {package} package, which is not installed; run `pip install {package}` "
                f"or drop {name} from --tracker."
            )


def charts(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's values under their chart names."""
    names = VAL_CHARTS if "val_loss" in record else TRAIN_CHARTS
    return {names[k]: float(v) for k, v in record.items() if k in names}


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def samples(self, step: int, text: str) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class Trackers:
    """Every tracker asked for, as one; empty when none was (or on processes other than 0)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, record: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def samples(self, step: int, text: str) -> None:
        for tracker in self.trackers:
            tracker.samples(step, text)

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close(failed=exc_type is not None)


def open_trackers(
    value: str, run_path: Path, *, start_step: int, logged_until: int, options: dict[str, Any]
) -> Trackers:
    """The trackers --tracker names, for a session of the run in `run_path` that starts after `start_step`.

    logged_until: the last step the run's earlier sessions logged (metrics.jsonl's newest record before this
    session cut it back to `start_step`); options: the run's options, shown by W&B as the run's config.
    """
    trackers = Trackers([])
    try:
        for name in tracker_names(value):
            if name == "tensorboard":
                trackers.trackers.append(TensorBoard(run_path / TENSORBOARD_DIR, start_step))
            else:
                trackers.trackers.append(WandB(run_path, start_step, logged_until, options))
    except BaseException:
        trackers.close(failed=True)  # the ones already open
        raise
    return trackers


def forget(run_path: Path) -> None:
    """Drop the trackers' record of the run in `run_path` (a fresh start over it): its events and W&B run id."""
    for events in event_files(run_path / TENSORBOARD_DIR):
        events.unlink()
    (run_path / STATE_FILE).unlink(missing_ok=True)


# --- TensorBoard ----------------------------------------------------------------------------------------------------
class TensorBoard:
    def __init__(self, directory: Path, start_step: int) -> None:
        from tensorboardX import SummaryWriter

        for events in event_files(directory):
            keep_events_until(events, start_step)
        # A file of its own per session (tensorboardX names files by the second: a quick resume would reuse one),
        # flushed every 10 s for a TensorBoard that is watching.
        self.writer = SummaryWriter(
            str(directory),
            purge_step=start_step + 1 if start_step else None,
            flush_secs=10,
            filename_suffix=f".{start_step}",
        )

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in charts(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def samples(self, step: int, text: str) -> None:
        # TensorBoard renders text as Markdown: an indented block keeps the sample's lines and characters as written.
        self.writer.add_text(SAMPLES_CHART, "\n".join("    " + line for line in text.splitlines()), step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def event_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("events.out.tfevents.*")) if directory.is_dir() else []


def records(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(the whole record, its payload) for each complete record of a TFRecord file; a torn tail ends it."""
    position = 0
    while position + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, position)
        end = position + 12 + length + 4  # length, its crc, the payload, the payload's crc
        if end > len(data):
            return
        yield data[position:end], data[position + 12 : end - 4]
        position = end


def keep_events_until(path: Path, step: int) -> None:
    """Cut an event file back to the events of steps up to `step` (the file's header event is step 0)."""
    from tensorboardX.proto.event_pb2 import Event

    data = path.read_bytes()
    kept = [whole for whole, payload in records(data) if Event.FromString(payload).step <= step]
    if sum(map(len, kept)) != len(data):
        atomic_write_bytes(path, b"".join(kept))


# --- Weights & Biases -----------------------------------------------------------------------------------------------
class WandB:
    def __init__(self, run_path: Path, start_step: int, logged_until: int, options: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.state_path = run_path / STATE_FILE
        run_id = self._read_state().get("wandb_run_id")
        try:
            self.run = wandb.init(
                project=None if os.environ.get("WANDB_PROJECT") else PROJECT,
                dir=None if os.environ.get("WANDB_DIR") else str(run_path),
                name=run_path.name,
                id=run_id,
                resume="allow",
                config=options,
            )
        except Exception as e:  # wandb's own errors (no API key, no network) have no common base class
            raise UserError(
                f"W&B could not start a run ({short_reason(e)}); run `wandb login`, or set WANDB_MODE=offline to log "
                "locally (and `wandb sync` later), or drop wandb from --tracker."
            )
        if run_id is None:
            atomic_write_bytes(self.state_path, (json.dumps({"wandb_run_id": self.run.id}) + "\n").encode())
        # W&B keeps the values it already has for the steps this session redoes: its steps only go forward.
        self.after = max(start_step, logged_until)
        if logged_until > start_step:
            note(f"W&B keeps its values for steps {start_step + 1}-{logged_until}, logged before this resume")

    def _read_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError):
            note(f"{self.state_path} is unreadable: this session starts a new W&B run")
            return {}

    def log(self, record: dict[str, Any]) -> None:
        if record["step"] > self.after:
            self.run.log(charts(record), step=record["step"])

    def samples(self, step: int, text: str) -> None:
        if step > self.after:
            table = self.wandb.Table(columns=["step", "text"], data=[[step, text]])
            self.run.log({SAMPLES_CHART: table}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B marks a run that ended in an error as failed
