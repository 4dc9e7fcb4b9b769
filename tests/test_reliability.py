"""Issue 8's rows that no other test file covers: each fault really caused, each bad input given to the command.

Faults: a real Ctrl-C (SIGINT) during training, a damaged newest checkpoint, a read-only checkpoint folder or run
directory, a full disk under convert, download and the token cache. Bad input: train.py's --init, --dataset,
--seq_len and --restore_from; impossible sizes in each format's config file; undecodable prompt bytes; flags every
command's parser rejects (one sentence, exit code 2); --debug. The commands that need a process of their own start
together in one fixture so that their start-up times overlap; the rest run in-process through `run_cli`, the code
the scripts run. The other rows of the README's "What happens when..." table point at their tests elsewhere.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpt2_jax import convert, evaluate, sample
from gpt2_jax.cli import run_cli
from gpt2_jax.data.dataset import load_dataset
from gpt2_jax.download import OPENAI_FILES, download
from gpt2_jax.errors import UserError
from gpt2_jax.tokenizers.gpt2_bpe import PACKAGED_GPT2_DIR, gpt2_tokenizer
from gpt2_jax.training import loop as trainer
from gpt2_jax.training.checkpoints import complete_steps
from gpt2_jax.weights.checksums import write_checksums
from gpt2_jax.weights.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "gpt2-tiny"
BUNDLED = str(ROOT / "data" / "shakespeare")
sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402  (the script itself, for the in-process runs)

HANG_S = 900  # a command still running after this is hung: a loaded machine may be ten times slower, not this
INVALID_UTF8 = "caf\xe9 cr\xe8me".encode("latin-1") + b" \xff "  # 3 bytes that are not UTF-8


# --- helpers -----------------------------------------------------------------------------------------------------
def run_in_process(main, args: list, capsys) -> tuple[int, str, str]:
    """`main` under run_cli, as `python SCRIPT ARGS` runs it: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        run_cli(main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def assert_one_error(err: str, pattern: str) -> None:
    """The command's last word is one `error: ` line matching `pattern`; no traceback anywhere."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err[-3000:]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err[-3000:]
    assert re.search(pattern, lines[-1]), lines[-1]


@contextlib.contextmanager
def file_size_limit(n_bytes: int) -> Iterator[None]:
    """Writes past `n_bytes` fail with EFBIG, the way a full disk fails them with ENOSPC."""
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """No new files in `path`: mode 555, or (root ignores modes) the immutable attribute."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i here: no way to make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def copy_config(src: Path, dst: Path, name: str, **changes) -> Path:
    shutil.copytree(src, dst)
    record = json.loads((dst / name).read_text())
    (dst / name).write_text(json.dumps({**record, **changes}))
    return dst


# --- the commands that run as processes of their own, started together ----------------------------------------


@pytest.fixture(scope="module")
def processes(tmp_path_factory, corpus) -> dict[str, tuple[int, str, str]]:
    tmp = tmp_path_factory.mktemp("commands")
    (tmp / "tokens.npz").write_bytes(b"PK\x03\x04 not text")
    commands = {
        "sample_garbage_interactive": [
            "sample.py",
            "--model",
            "scratch:tiny",
            "--seed",
            "3",
            "--length",
            "4",
            "--interactive",
        ],
        "train_batch_vs_devices": [
            "train.py",
            "--out",
            tmp / "two",
            "--init",
            "scratch:tiny",
            "--dataset",
            corpus,
            "--batch_size",
            "3",
        ],
        "train_unparsable_flag": ["train.py", "--steps", "abc"],
        "convert_bad_flag": ["-m", "gpt2_jax.convert", FIXTURE / "hf", tmp / "out", "--to", "onnx"],
        "evaluate_unknown_format": ["-m", "gpt2_jax.evaluate", "--model", "scratch:tiny", "--data", tmp / "tokens.npz"],
        "download_bad_flag": ["-m", "gpt2_jax.download", "124M", "--source", "ftp"],
        "download_debug": ["-m", "gpt2_jax.download", "999M", "--debug"],
        "benchmarks_bad_flag": ["-m", "benchmarks", "--batch", "x"],
    }
    stdin = {"sample_garbage_interactive": b"ab\xff\xfe\x00\x01cd\n"}
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    env.pop("GPT2_JAX_DEBUG", None)
    two_devices = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = {
        name: subprocess.Popen(
            [sys.executable, *map(str, args)],
            cwd=ROOT,
            env=two_devices if "devices" in name else env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, args in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(stdin.get(name, b""), timeout=HANG_S)
        results[name] = (proc.returncode, out.decode("utf-8"), err.decode("utf-8"))
    return results


@pytest.mark.parametrize(
    ("name", "code", "pattern"),
    [
        ("train_batch_vs_devices", 2, r"--batch_size 3 must be divisible by devices x accumulate_gradients = 2 x 1"),
        ("train_unparsable_flag", 2, r"argument --steps: invalid int value: 'abc'; see \S+ train.py --help\."),
        ("convert_bad_flag", 2, r"argument --to: invalid choice: 'onnx'.*; see \S+ -m gpt2_jax.convert --help\."),
        ("evaluate_unknown_format", 1, r"tokens\.npz has an extension this reader does not know; use \.txt"),
        ("download_bad_flag", 2, r"argument --source: invalid choice: 'ftp'"),
        ("benchmarks_bad_flag", 2, r"argument --batch: expected comma-separated whole numbers"),
    ],
)
def test_real_commands_refuse_bad_input_in_one_sentence(processes, name, code, pattern):
    returncode, out, err = processes[name]
    assert returncode == code, err[-3000:]
    assert out == ""
    assert_one_error(err, pattern)


def test_debug_shows_the_traceback(processes):
    code, _, err = processes["download_debug"]
    assert code == 1
    assert "Traceback" in err and "gpt2_jax.errors.UsageError: Unknown GPT-2 release '999M'" in err


def test_binary_garbage_typed_at_the_interactive_prompt_is_replaced_and_counted(processes):
    code, out, err = processes["sample_garbage_interactive"]
    assert code == 0, err[-3000:]
    assert "warning: 2 invalid UTF-8 byte(s) in the prompt were replaced by U+FFFD." in err
    assert out.count("SAMPLE 1") == 1 and out.endswith("Model prompt >>> \n")


def test_undecodable_prompt_bytes_from_argv_are_replaced_and_counted(capsys):
    # Python hands argv bytes that are not UTF-8 over as lone surrogates (surrogateescape).
    assert sample.repaired("ab\udcff\udcfecd", "--prompt") == "ab\ufffd\ufffdcd"
    assert "2 invalid UTF-8 byte(s) in --prompt were replaced" in capsys.readouterr().err
    assert sample.repaired("plain café", "--prompt") == "plain café"
    assert capsys.readouterr().err == ""


# --- train.py: bad --init, --dataset, --seq_len, --restore_from --------------------------------------------------
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("just a few words")
    (tmp / "slides.pdf").write_bytes(b"%PDF-1.4")
    (tmp / "no_text").mkdir()
    (tmp / "no_text" / "slides.pdf").write_bytes(b"%PDF-1.4")
    (tmp / "weights.npz").write_bytes(b"PK\x03\x04")
    (tmp / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    copy_config(FIXTURE / "hf", tmp / "hf_ctx0", "config.json", n_positions=0, n_ctx=0)
    copy_config(FIXTURE / "openai", tmp / "openai_head5", "hparams.json", n_head=5)
    (tmp / "native_ctx_negative" / "params").mkdir(parents=True)
    native = {"format": "gpt2-jax", "version": 1, "config": {"n_vocab": 1000, "n_ctx": -1, "n_embd": 64,
                                                              "n_head": 4, "n_layer": 2}}  # fmt: skip
    (tmp / "native_ctx_negative" / "gpt2_jax.json").write_text(json.dumps(native))
    shutil.copytree(FIXTURE / "hf", tmp / "hf_config_list")
    (tmp / "hf_config_list" / "config.json").write_text("[1, 2]")
    return tmp


TRAIN_BAD_INPUTS = {  # name -> (flags, exit code, the error line)
    "init_missing": (["--init", "{bad}/nope"], 1, r"No model at .*nope: no such file or directory"),
    "init_unknown_format": (["--init", "{bad}/weights.npz"], 1, "is not a model file this loader knows"),
    "init_pickle": (["--init", "{bad}/pytorch_model.bin"], 1, "pickled PyTorch file, which could run arbitrary"),
    "init_impossible_config": (["--init", "{bad}/hf_ctx0"], 1, r"config\.json: Model config field n_ctx=0 must"),
    "dataset_missing": (["--dataset", "{bad}/nope.txt"], 1, r"Dataset path .*nope\.txt does not exist"),
    "dataset_unknown_format": (["--dataset", "{bad}/slides.pdf"], 1, "has an extension this reader does not know"),
    "dataset_empty": (["--dataset", "{bad}/empty.txt"], 1, r"holds no text: 1 file\(s\) read, 0 tokens"),
    "dataset_shorter_than_a_window": (["--dataset", "{bad}/short.txt"], 1, "fewer than one window of seq_len"),
    "dataset_without_text_files": (["--dataset", "{bad}/no_text"], 1, "holds no readable dataset files"),
    "seq_len_over_n_ctx": (["--seq_len", "500"], 2, r"--seq_len 500 is longer than the model's context n_ctx=128"),
    "restore_from_not_a_run": (["--restore_from", "{bad}/nope"], 1, "is neither a training run directory nor"),
}


@pytest.mark.parametrize("name", sorted(TRAIN_BAD_INPUTS))
def test_train_bad_input_is_one_sentence(name, bad_inputs, corpus, tmp_path, capsys):
    flags, code, pattern = TRAIN_BAD_INPUTS[name]
    base = ["--out", tmp_path / "run", "--init", "scratch:tiny", "--dataset", corpus, "--seq_len", "16"]
    args = base + ["--steps", "2", "--batch_size", "2", "--sample_num", "0", "--warmup_steps", "0"]
    returncode, _, err = run_in_process(train_script.main, args + [f.format(bad=bad_inputs) for f in flags], capsys)
    assert returncode == code
    assert_one_error(err, pattern)
    assert not (tmp_path / "run" / "train.lock").exists() and not (tmp_path / "run" / "checkpoints").exists()


# --- impossible model configs, in each format's own file, through the commands that read models ------------------
@pytest.mark.parametrize(
    ("command", "model", "pattern"),
    [
        (sample.main, "hf_ctx0", r"hf_ctx0/config\.json: Model config field n_ctx=0 must be a positive integer"),
        (sample.main, "openai_head5", r"openai_head5/hparams\.json: Model config has n_embd=64 not divisible by n_h"),
        (sample.main, "native_ctx_negative", r"gpt2_jax\.json: Model config field n_ctx=-1 must be a positive"),
        (sample.main, "hf_config_list", r"config\.json: A Hugging Face config must be a JSON object, got a list"),
        (evaluate.main, "openai_head5", r"hparams\.json: Model config has n_embd=64 not divisible by n_head=5"),
        (convert.main, "native_ctx_negative", r"gpt2_jax\.json: Model config field n_ctx=-1 must be a positive"),
    ],
    ids=["sample-hf", "sample-openai", "sample-native", "sample-not-an-object", "evaluate", "convert"],
)
def test_impossible_model_config_names_its_file(command, model, pattern, bad_inputs, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("Some words to evaluate on.")
    args = {
        sample.main: ["--model", bad_inputs / model, "--length", "3"],
        evaluate.main: ["--model", bad_inputs / model, "--data", tmp_path / "text.txt"],
        convert.main: [bad_inputs / model, tmp_path / "out"],
    }[command]
    returncode, out, err = run_in_process(command, args, capsys)
    assert returncode == 1 and out == ""
    assert_one_error(err, pattern)
    assert not (tmp_path / "out").exists()


def test_a_bad_prompt_file_is_refused_before_the_model_is_read(bad_inputs, capsys):
    args = ["--model", bad_inputs / "nope", "--prompt_file", bad_inputs / "nope.txt"]
    returncode, _, err = run_in_process(sample.main, args, capsys)
    assert returncode == 1
    assert_one_error(err, r"Cannot read --prompt_file .*nope\.txt: No such file or directory")


def test_evaluate_checks_its_data_before_reading_the_model(bad_inputs, capsys):
    args = ["--model", bad_inputs / "nope", "--data", bad_inputs / "nope.txt"]
    returncode, _, err = run_in_process(evaluate.main, args, capsys)
    assert returncode == 1
    assert_one_error(err, r"Dataset path .*nope\.txt does not exist")


# --- full disk ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("to", ["native", "hf", "openai"])
def test_convert_onto_a_full_disk_is_one_sentence_and_leaves_nothing(to, tmp_path, capsys):
    with file_size_limit(400_000):  # below tiny's 12.9 MB embedding
        returncode, out, err = run_in_process(convert.main, ["scratch:tiny", tmp_path / "out", "--to", to], capsys)
    assert returncode == 1 and out == ""
    assert_one_error(err, r"Could not write .*out \(File too large\); nothing was written there: free disk space")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither OUT nor its temporary directory


FULL_DISK_CONVERT = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, resource.RLIM_INFINITY))
sys.argv = ["convert", "scratch:tiny", sys.argv[1], "--to", "native"]
runpy.run_module("gpt2_jax.convert", run_name="__main__")
"""


def test_convert_onto_a_full_disk_in_a_real_process_prints_no_orbax_noise(tmp_path):
    """orbax's writer threads log tracebacks and tensorstore raises 'Event loop is closed' into dead loops when a
    write fails; a real process (not pytest's capture) must still show the one sentence alone."""
    done = subprocess.run([sys.executable, "-c", FULL_DISK_CONVERT, str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_S)  # fmt: skip
    assert done.returncode == 1
    assert_one_error(done.stderr, r"Could not write .*out \(File too large\); nothing was written there")
    assert "Event loop is closed" not in done.stderr and "ERROR:absl" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_download_onto_a_full_disk_keeps_the_part_file_and_resumes(tmp_path):
    release = tmp_path / "www" / "124M"
    shutil.copytree(FIXTURE / "openai", release)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(PACKAGED_GPT2_DIR / name, release)
    (release / "model.ckpt.meta").write_bytes(b"\0" * 3000)
    base_url, models = (tmp_path / "www").as_uri(), str(tmp_path / "models")
    with file_size_limit(400_000), pytest.raises(UserError) as info:  # encoder.json is 1 MB
        download("124M", base_url=base_url, models_dir=models)
    assert re.fullmatch(
        r"Cannot write .*encoder\.json\.part: File too large; free disk space there and run the same command "
        r"again to resume\.",
        str(info.value),
    )
    assert not (tmp_path / "models" / "124M" / "encoder.json").exists()
    directory = download("124M", base_url=base_url, models_dir=models)
    for name in OPENAI_FILES:
        assert (directory / name).read_bytes() == (release / name).read_bytes(), name
    assert not list(directory.glob("*.part"))


def test_token_cache_on_a_full_disk_is_one_sentence_and_leaves_no_file(corpus, tmp_path):
    data = tmp_path / "data" / "macbeth.txt"
    data.parent.mkdir()
    shutil.copy(corpus, data)
    tokenizer = gpt2_tokenizer()
    with file_size_limit(8_000), pytest.raises(UserError, match=r"Cannot write the token cache .*: File too large"):
        load_dataset(str(data), tokenizer, cache_dir=str(tmp_path / "cache"), progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # no cache and no temporary file
    tokens = load_dataset(str(data), tokenizer, cache_dir=str(tmp_path / "cache"), progress=False)
    assert len(tokens.train) > 8_000


# --- training: Ctrl-C, a damaged checkpoint, read-only folders ---------------------------------------------------
@pytest.fixture(scope="module")
def flags(corpus, tmp_path_factory) -> dict:
    """Six tiny steps, a checkpoint every two, on text with bytes that are not UTF-8 (replaced, never fatal)."""
    text = corpus.read_text(encoding="utf-8")[:20_000]
    data = tmp_path_factory.mktemp("bad_bytes") / "macbeth.txt"
    data.write_bytes(text[:5000].encode() + INVALID_UTF8 + text[5000:].encode())
    return dict(
        init="scratch:tiny", dataset=str(data), seq_len=16, batch_size=4, steps=6, learning_rate=1e-3,
        warmup_steps=2, log_every=1, val_every=0, val_batches=1, save_every=2, keep=5, sample_num=0,
    )  # fmt: skip


def train(out: Path, **flags) -> int:
    return trainer.run_training(dict(flags, out=str(out)), bundled_dataset=BUNDLED)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flags) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert train(out, **flags) == 0
    assert complete_steps(out / "checkpoints") == [2, 4, 6]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_ctrl_c_writes_a_checkpoint_exits_130_and_resumes_exactly(trained, flags, tmp_path, capsys, monkeypatch):
    """A real SIGINT arrives while step 3 runs: step 3 is saved, the run returns 130, and resuming ends as the
    straight run did. The data's 3 undecodable bytes are replaced and counted, not fatal."""
    real_prepare = trainer.prepare

    def prepare_then_interrupt_at_step_3(*args, **kwargs):
        session = real_prepare(*args, **kwargs)
        step_fn, steps = session.train_step, itertools.count(session.start_step + 1)

        def train_step(state, batch):
            result = step_fn(state, batch)
            if next(steps) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return result

        session.train_step = train_step
        return session

    monkeypatch.setattr(trainer, "prepare", prepare_then_interrupt_at_step_3)
    run = tmp_path / "run"
    assert train(run, **flags) == 130
    out, err = capsys.readouterr()
    assert "stopped by SIGINT at step 3; checkpoint saved" in out and "SIGINT: saving a checkpoint" in err
    assert "3 invalid UTF-8 bytes replaced" in err
    assert complete_steps(run / "checkpoints") == [2, 3] and not (run / "train.lock").exists()
    monkeypatch.undo()
    assert train(run, restore_from="latest") == 0
    assert losses(run) == losses(trained)


def damage(step_dir: Path, how: str) -> Path:
    """Cut the biggest params file (the embedding) short, or overwrite 4 KiB in its middle with zeros."""
    biggest = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    else:
        middle = len(data) // 2
        data[middle : middle + 4096] = bytes(4096)
    biggest.write_bytes(bytes(data))
    return biggest


# orbax leaves an asyncio callback behind when a restore fails; it is collected after its event loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_a_damaged_newest_checkpoint_is_skipped_by_every_model_reader(trained, tmp_path, capsys, how):
    """sample.py, evaluate and convert read a run's newest checkpoint that reads back. Overwritten bytes read back
    silently (orbax keeps no checksum) unless the step has checksums, which the trainer is to write (see the
    report); written here as it would."""
    run = copy_run(trained, tmp_path / "run")
    write_checksums(run / "checkpoints" / "6", ["params", "opt_state"])
    damage(run / "checkpoints" / "6", how)
    assert load_model(run).source == f"training run {run} at step 4"
    note = re.escape(f"note: skipping checkpoint {run}/checkpoints/6: ")
    assert re.search(note + r".*(is damaged|does not match the checksum)", capsys.readouterr().err)


def test_a_converted_model_with_overwritten_bytes_is_refused(tmp_path, capsys):
    assert run_in_process(convert.main, ["scratch:tiny", tmp_path / "native"], capsys)[0] == 0
    assert load_model(tmp_path / "native").config.n_embd == 64  # intact: its checksums agree
    damage(tmp_path / "native", "overwritten")
    with pytest.raises(UserError, match=r"native is damaged: params/.* does not match the checksum saved with it"):
        load_model(tmp_path / "native")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_a_damaged_newest_checkpoint_is_named_and_training_resumes_from_the_one_before(trained, tmp_path, capsys, how):
    run = copy_run(trained, tmp_path / "run")
    damage(run / "checkpoints" / "6", how)
    assert train(run, restore_from="latest") == 0
    err = capsys.readouterr().err
    assert re.search(rf"warning: (Checkpoint )?{re.escape(str(run.absolute()))}/checkpoints/6 is damaged", err), err
    assert "Falling back to the checkpoint before it" in err
    assert losses(run) == losses(trained)


def orbax_threads_waiting() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if type(t).__name__ == "_SignalingThread" and t.is_alive()]


def release(threads: list[threading.Thread]) -> None:
    """Wake orbax's writer threads that wait (5 minutes, then the process can exit) for a save that never began."""
    from orbax.checkpoint._src.futures import future as orbax_future

    for thread in threads:
        thread.cancel()
        orbax_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
    for thread in threads:
        threading.Thread.join(thread, timeout=30)  # orbax's own join raises CancelledError for a cancelled thread


@pytest.fixture(scope="module")
def read_only_save(trained, tmp_path_factory) -> tuple[Path, str, int]:
    """Resume a run whose checkpoints/ is read-only, so that the save at step 6 fails: (run, error, threads left)."""
    run = copy_run(trained, tmp_path_factory.mktemp("read_only") / "run")
    shutil.rmtree(run / "checkpoints" / "6")
    with read_only(run / "checkpoints"), pytest.raises(UserError) as info:
        train(run, restore_from="latest")
    waiting = orbax_threads_waiting()
    release(waiting)
    return run, str(info.value), len(waiting)


def test_a_read_only_checkpoint_folder_fails_the_save_in_one_sentence_and_keeps_the_others(read_only_save):
    run, message, _ = read_only_save
    assert re.search(r"Could not write checkpoint step 6 .*; the previous checkpoints \(2, 4\) are untouched", message)
    assert complete_steps(run / "checkpoints") == [2, 4] and not (run / "train.lock").exists()


def test_a_failed_save_leaves_no_writer_thread_that_delays_the_exit(read_only_save):
    assert read_only_save[2] == 0


def test_a_read_only_run_directory_is_one_sentence(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    with read_only(run):
        returncode, _, err = run_in_process(train_script.main, ["--out", run, "--restore_from", "latest"], capsys)
    assert returncode == 1
    assert_one_error(err, r"Operation not permitted|Permission denied|Read-only file system")
    assert complete_steps(run / "checkpoints") == [2, 4, 6]
