"""`train.py --tracker`: TensorBoard event files and an offline W&B run hold metrics.jsonl's records, once per step,
also after a resume that redoes logged steps; a tracker that is unknown or not installed stops train.py at once.

TensorBoard's files are read back with TensorBoard's own loaders, W&B's offline run file (LevelDB's log format
around `wandb_internal_pb2.Record`s) with a few lines here.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

from gpt2_jax.errors import UsageError
from gpt2_jax.train import main as train_main
from gpt2_jax.training import tracking
from gpt2_jax.training.config import resolve
from gpt2_jax.training.loop import run_training

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = str(ROOT / "data" / "shakespeare")


@pytest.fixture(scope="module")
def flags(corpus) -> dict:
    return dict(
        init="scratch:tiny", dataset=str(corpus), seq_len=32, batch_size=8, steps=8, learning_rate=3e-3,
        warmup_steps=2, log_every=1, val_every=4, val_batches=2, save_every=4, keep=5, sample_every=0, sample_num=1,
        sample_length=4,
    )  # fmt: skip


def train(out: Path, **flags) -> int:
    return run_training(dict(flags, out=str(out)), bundled_dataset=BUNDLED)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def charted(out: Path) -> dict[str, dict[int, float]]:
    """chart -> {step: value} as metrics.jsonl has them, under the trackers' chart names."""
    series: dict[str, dict[int, float]] = {}
    for record in metrics(out):
        for chart, value in tracking.charts(record).items():
            series.setdefault(chart, {})[record["step"]] = value
    return series


def crash_after_logging(run: Path) -> None:
    """As a run killed after logging step 8 but before its checkpoint: the newest checkpoint is step 4's."""
    shutil.rmtree(run / "checkpoints" / "8")


def test_a_float16_runs_loss_scale_and_skips_are_charted():
    """A float16 log record (loop.py) carries its loss scale and skipped steps; the trackers chart both. A skipped
    step's record has no grad_norm (its Inf cannot go into JSON) and no mfu where the device has no known peak."""
    record = {"step": 3, "loss": 5.0, "avg": 5.1, "lr": 1e-4, "loss_scale": 16384.0, "skipped_steps": 1, "tokens": 96,
              "tokens_per_s": 10.0, "elapsed": 1.0}  # fmt: skip
    charts = tracking.charts(record)
    assert charts["train/loss_scale"] == 16384.0 and charts["train/skipped_steps"] == 1.0
    assert "train/grad_norm" not in charts and "perf/mfu_percent" not in charts


# --- TensorBoard ----------------------------------------------------------------------------------------------------
def scalar_events(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event in every event file, in file order: what a loader without purging would show."""
    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    found.setdefault(value.tag, []).append((event.step, float(tensor_util.make_ndarray(value.tensor))))
    return found


def test_tensorboard_holds_the_metrics_once_per_step_across_a_resume(tmp_path, flags):
    run = tmp_path / "run"
    assert train(run, **flags, tracker="tensorboard") == 0
    crash_after_logging(run)
    assert train(run, restore_from="latest") == 0  # the tracker is one of the run's options: it stays on

    expected = charted(run)
    assert sorted(expected["train/loss"]) == list(range(1, 9)) and sorted(expected["val/loss"]) == [4, 8]
    events = scalar_events(run / "tensorboard")
    assert set(events) == set(expected)
    for chart, points in events.items():  # steps 5-8 were logged twice; the first session's copies are gone
        assert [step for step, _ in points] == sorted(expected[chart]), chart
        for step, value in points:
            # TensorBoard keeps scalars as float32: the logged double rounded once, half an eps (1e-6 is 8 eps).
            assert value == pytest.approx(expected[chart][step], rel=1e-6), (chart, step)

    viewer = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    viewer.Reload()
    assert [e.step for e in viewer.Scalars("train/loss")] == list(range(1, 9))
    samples = {e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in viewer.Tensors(
        "samples/text_summary")}  # fmt: skip
    written = (run / "samples" / "samples-8.txt").read_text(encoding="utf-8")
    assert list(samples) == [8] and samples[8] == "\n".join("    " + line for line in written.splitlines())


def test_a_fresh_start_over_a_run_forgets_its_tracking(tmp_path, flags):
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.1.old").write_bytes(b"")
    (run / tracking.STATE_FILE).write_text('{"wandb_run_id": "old"}')
    tracking.forget(run)
    assert not list((run / "tensorboard").iterdir()) and not (run / tracking.STATE_FILE).exists()


# --- W&B ------------------------------------------------------------------------------------------------------------
LOG_BLOCK = 32768  # LevelDB's log format: 32 KiB blocks of records, each behind a 7-byte header
FULL, FIRST, LAST = 1, 2, 4


def log_records(data: bytes) -> list[bytes]:
    records, position, pending = [], 7, b""  # the file opens with W&B's own 7-byte header
    while position + 7 <= len(data):
        if LOG_BLOCK - position % LOG_BLOCK < 7:  # a block's tail too short for a header is padding
            position += LOG_BLOCK - position % LOG_BLOCK
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            records.append(pending)
    return records


def wandb_history(wandb_dir: Path) -> tuple[set[str], dict[int, dict]]:
    """(the run ids, step -> {key: value}) of every offline run under `wandb_dir`; a step seen twice fails."""
    from wandb.proto import wandb_internal_pb2 as pb

    ids, rows = set(), {}
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for data in log_records(path.read_bytes()):
            record = pb.Record.FromString(data)
            if record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
            elif record.WhichOneof("record_type") == "history":
                step = record.history.step.num
                assert step not in rows, f"step {step} logged twice"
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows[step] = {k: v for k, v in items.items() if not k.startswith("_")}
    return ids, rows


def test_wandb_offline_run_holds_the_metrics_and_continues_after_a_resume(tmp_path, flags, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert train(run, **flags, tracker="wandb") == 0
    run_id = json.loads((run / tracking.STATE_FILE).read_text())["wandb_run_id"]
    crash_after_logging(run)
    assert train(run, restore_from="latest", steps=10) == 0
    import wandb

    wandb.teardown()  # W&B's service writes the run's file behind `finish`: wait for it, as a process exit does

    ids, rows = wandb_history(tmp_path)
    assert ids == {run_id}  # one W&B run over both sessions
    assert sorted(rows) == list(range(1, 11))  # steps 5-8, redone after the resume, were not sent again
    expected = charted(run)
    for chart, values in expected.items():
        for step, value in values.items():
            if step <= 4 or step > 8:  # what W&B holds for 5-8 is the first session's, as it logged them
                assert rows[step][chart] == pytest.approx(value, rel=1e-6), (chart, step)
    assert rows[8]["samples/nrows"] == rows[10]["samples/nrows"] == 1  # a table each time the run sampled
    table = next(tmp_path.glob("wandb/offline-run-*/files/media/table/samples_10_*.table.json"))
    written = (run / "samples" / "samples-10.txt").read_text(encoding="utf-8")
    assert json.loads(table.read_text())["data"] == [[10, written]]


# --- start-up checks ------------------------------------------------------------------------------------------------
def test_unknown_or_missing_tracker_is_one_sentence_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match=r"unknown tracker 'tb'; choose none, tensorboard, wandb") as info:
        train_main(["--tracker", "tensorboard,tb", "--out", str(tmp_path / "run")])
    assert info.value.exit_code == 2

    real_find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name)
    )
    sentence = r"--tracker wandb needs the wandb package, which is not installed; run `pip install wandb`"
    with pytest.raises(UsageError, match=sentence):
        train_main(["--tracker", "wandb", "--out", str(tmp_path / "run")])
    with pytest.raises(UsageError, match=sentence):  # a resumed run that tracked with W&B, on a machine without it
        resolve({}, saved={"tracker": "wandb"})
    assert not (tmp_path / "run").exists()
    resolve({"tracker": "none"}, saved={"tracker": "wandb"})  # turning it off works without the package
