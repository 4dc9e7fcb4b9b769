"""`gpt2-jax prepare INPUT OUT_DIR` (gpt2_jax/prepare.py, data/shard_corpus.py, data/manifest.py): the shards hold
train.py's token stream for the same input with an end-of-text in front, pass llm.c's own loader check, are the
same bytes with 1 worker or 2 and after a kill and a restart, go through a corpus many shards long in bounded
memory without importing JAX, and bad input leaves nothing that looks complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from llmc_reference import load_shard, write_datafile

from gpt2_jax import prepare
from gpt2_jax.cli import run_cli
from gpt2_jax.data import shard_corpus, shards
from gpt2_jax.data.dataset import read_token_stream
from gpt2_jax.errors import UserError
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer

ROOT = Path(__file__).resolve().parent.parent
EOT = 50256
SHARD = 150_000  # tokens: the corpus below makes 11 shards, and groups of text (1M characters) cross shards


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "of", "and", "ferry", "harbour", "naïve", "café", "12", "345", "don't", "Zürich", "東京", "\n\n"]
    return [" ".join(rng.choice(words, size=int(rng.integers(20, 1500)))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """jsonl, parquet (FineWeb's text column) and plain text: about 5 MB, 1.5M tokens."""
    folder = tmp_path_factory.mktemp("corpus")
    with open(folder / "a.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents(800, 0))
    texts = documents(400, 1)
    table = pa.table({"text": texts, "id": [str(i) for i in range(len(texts))], "language": ["en"] * len(texts)})
    pq.write_table(table, folder / "b.parquet", row_group_size=64)
    macbeth = (ROOT / "data" / "shakespeare" / "macbeth_gut.txt").read_text(encoding="utf-8")
    (folder / "c.txt").write_text(macbeth[:150_000], encoding="utf-8")
    return folder


def run_prepare(corpus: Path, out: Path, *flags: str) -> int:
    """In this process, with one worker unless `flags` say otherwise (then they are spawned: JAX may be imported)."""
    argv = [str(corpus), str(out), "--name", "corpus", "--shard_size", str(SHARD), "--workers", "1", "--quiet"]
    return prepare.main([*argv, *flags])


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "out"
    assert run_prepare(corpus, out, "--workers", "1") == 0
    return out


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shards_hold_train_pys_stream_with_an_end_of_text_in_front(corpus, straight):
    names = sorted(p.name for p in straight.glob("*.bin"))
    assert names[-1] == "corpus_val_000000.bin" and names[0] == "corpus_train_000001.bin"
    in_order = [straight / "corpus_val_000000.bin", *(straight / n for n in names[:-1])]
    counts = [load_shard(p) for p in in_order]  # llm.c's own check: magic, version 1, size = 1024 + 2 x count
    assert counts[:-1] == [SHARD] * (len(counts) - 1) and 0 < counts[-1] <= SHARD and len(counts) >= 6
    stream = np.concatenate([shards.open_shard(str(p)) for p in in_order])
    expected = read_token_stream(str(corpus), gpt2_tokenizer(), progress=False)
    np.testing.assert_array_equal(stream, np.concatenate([[EOT], expected.tokens]))
    record = json.loads((straight / "manifest.json").read_text(encoding="utf-8"))
    assert record["complete"] and [s["file"] for s in record["shards"]] == [p.name for p in in_order]
    assert [s["split"] for s in record["shards"]] == ["val"] + ["train"] * (len(in_order) - 1)
    assert all(s["sha256"] == shards.file_sha256(str(straight / s["file"])) for s in record["shards"])
    totals = record["totals"]
    assert totals["tokens"] == len(stream) and totals["val_tokens"] == SHARD
    assert totals["documents"] == expected.n_documents == 1201
    assert totals["input_bytes"] == sum((corpus / name).stat().st_size for name in ("a.jsonl", "b.parquet", "c.txt"))
    assert record["settings"]["tokenizer"] == {"name": "gpt2-bpe", "n_vocab": 50257, "eot_id": EOT}


def test_one_worker_or_two_give_the_same_bytes(corpus, straight, tmp_path):
    out = tmp_path / "out"
    flags = ["--name", "corpus", "--shard_size", str(SHARD), "--workers", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "gpt2_jax", "prepare", str(corpus), str(out), *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wrote 11 shards: 11 in all (1 validation)" in done.stdout
    assert f"--dataset '{out}/corpus_train_*.bin' --val_dataset '{out}/corpus_val_*.bin'" in done.stdout
    assert "tok/s" in done.stderr and "B/s" in done.stderr  # the progress bar's two rates
    assert contents(out) == contents(straight)


def test_workers_are_spawned_where_jax_is_imported(corpus, straight, tmp_path, monkeypatch):
    """A fork would copy JAX's threads' locks: with JAX imported, the same bytes come from spawned workers."""
    monkeypatch.setitem(sys.modules, "jax", sys.modules.get("jax") or types.ModuleType("jax"))
    forks = []
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or pytest.fail("a worker was forked"))
    assert run_prepare(corpus, tmp_path / "out", "--workers", "2") == 0
    assert contents(tmp_path / "out") == contents(straight) and not forks


KILLED = """
import sys, time
from gpt2_jax import prepare
from gpt2_jax.data import shards

write = shards.ShardFile.write


def write_then_hang(self, tokens):
    write(self, tokens)
    if self.path.endswith("_000003.bin"):  # the fourth shard is being written: stop here until killed
        open(sys.argv[3], "w").close()
        time.sleep(3600)


shards.ShardFile.write = write_then_hang
prepare.main([sys.argv[1], sys.argv[2], "--name", "corpus", "--shard_size", "{shard}", "--workers", "2", "--quiet"])
"""


def test_a_killed_run_resumes_to_the_same_bytes(corpus, straight, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "writing-shard-3"
    script = KILLED.replace("{shard}", str(SHARD))
    proc = subprocess.Popen([sys.executable, "-c", script, str(corpus), str(out), str(marker)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 300  # a hang guard only: it returns as soon as the marker appears
        while not marker.exists():
            assert proc.poll() is None, "prepare ended before it was killed"
            assert time.monotonic() < deadline, "prepare never reached its fourth shard"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    record = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert not record["complete"] and len(record["shards"]) == 3
    assert record["shards"][-1]["next"][0] >= 1  # the restart skips a whole group, and starts inside the next one
    assert (out / "corpus_train_000003.bin.tmp").exists() and not (out / "corpus_train_000003.bin").exists()
    finished = {name: data for name, data in contents(out).items() if name.endswith(".bin")}

    with pytest.MonkeyPatch.context() as patch:  # the restart must not tokenize what the finished shards hold
        encoded, real = [], shard_corpus._encode
        patch.setattr(shard_corpus, "_encode", lambda task: encoded.append(task[0]) or real(task))
        assert run_prepare(corpus, out, "--workers", "1") == 0
    assert min(encoded) == record["shards"][-1]["next"][0]
    assert contents(out) == contents(straight)
    assert {name: contents(out)[name] for name in finished} == finished  # kept, not rewritten


# The peak resident set of this process image: /proc's VmHWM, since getrusage's ru_maxrss outlives exec and would
# report the size of the pytest process that forked this one. Taken before, once the ninth shard is written (both
# the text and the pre-tokenized reader have run by then), and at the end, after 60M more tokens.
MEASURED = """
import sys
from gpt2_jax import prepare
from gpt2_jax.data import files, shards
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer
import pyarrow.parquet


def peak_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


commit, peaks = shards.ShardFile.commit, []


def commit_and_measure(self):
    if self.path.endswith("_000008.bin"):
        peaks.append(peak_bytes())
    return commit(self)


shards.ShardFile.commit = commit_and_measure
files.TOKEN_CHUNK = 1 << 20  # pre-tokenized input is read 1M tokens at a time (16M by default)
gpt2_tokenizer().encode("warm up")
before = peak_bytes()
prepare.main([sys.argv[1], sys.argv[2], "--shard_size", "1000000", "--workers", "2", "--quiet"])
print(before, peaks[0], peak_bytes(), "jax" in sys.modules)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak resident set from Linux's /proc")
def test_a_corpus_many_shards_long_goes_through_in_bounded_memory_without_jax(corpus, tmp_path):
    """4.6 MB of text, then a 128 MB pre-tokenized file: the peak resident memory grows by less than the corpus, and
    once the readers have run it stays put while most of the corpus still flows through (the bounds are generous:
    allocators keep what they freed); nothing imports JAX on the way."""
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "tokens.npy", np.random.default_rng(0).integers(0, 50257, size=64 << 20).astype(np.uint16))
    for name in ("a.jsonl", "b.parquet"):
        os.link(corpus / name, data / name)
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, str(data), str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    *peaks, jax_imported = done.stdout.splitlines()[-1].split()
    before, early, end = (int(p) >> 20 for p in peaks)
    assert jax_imported == "False"
    assert end - before < 96, f"the peak grew by {end - before} MiB while preparing a 133 MB corpus"
    assert end - early < 16, f"the peak grew by {end - early} MiB after the ninth shard"
    assert len(list((tmp_path / "out").glob("*.bin"))) == 69  # 1.5M + 67.1M tokens in shards of 1M


def test_an_output_folder_with_other_shards_is_refused_or_overwritten(corpus, straight, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_datafile(out / "old_train_000001.bin", [1, 2, 3])
    (out / "README.txt").write_text("not ours")
    with pytest.raises(
        UserError, match=r"already holds llm.c shards \(old_train_000001.bin\) that no prepare manifest"
    ):
        run_prepare(corpus, out)
    assert run_prepare(corpus, out, "--overwrite") == 0
    assert not (out / "old_train_000001.bin").exists() and (out / "README.txt").exists()
    with pytest.raises(UserError, match=r"holds the shards of another prepare run \(made with a different shard_size"):
        prepare.main([str(corpus), str(out), "--name", "corpus", "--shard_size", "200000", "--quiet"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run_prepare(corpus, out) == 0  # finished already: nothing is redone
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_bad_input_leaves_nothing_that_looks_complete(corpus, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    os.link(corpus / "a.jsonl", data / "a.jsonl")
    pq.write_table(pa.table({"body": ["a text in the wrong column"]}), data / "z.parquet")
    with pytest.raises(SystemExit) as info:
        run_cli(
            prepare.main, [str(data), str(tmp_path / "out"), "--shard_size", str(SHARD), "--workers", "1", "--quiet"]
        )
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and "has no column 'text' (its columns: body)" in err
    record = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert not record["complete"] and record["shards"]  # what a.jsonl made is kept, and not called complete
    assert not list((tmp_path / "out").glob("*.tmp"))  # the shard being written is removed
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "nothing.txt").write_text("")
    with pytest.raises(UserError, match=r"holds no text: 1 file\(s\) read, 0 tokens"):
        run_prepare(tmp_path / "empty", tmp_path / "out2")
    assert os.listdir(tmp_path / "out2") == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard_size", "0"], "--shard_size must lie in 1 .. 2,147,483,647 tokens, got 0."),
        (["--workers", "0"], "--workers must be at least 1, got 0."),
        (["--val_shards", "-1"], "--val_shards must be 0 (no validation shard) or more, got -1."),
        (["--name", "a/b"], "--name 'a/b' must be letters, digits, '.', '_' or '-' (it starts file names)."),
    ],
)
def test_bad_flags_exit_2_in_one_sentence(corpus, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        run_cli(prepare.main, [str(corpus), str(tmp_path / "out"), *flags])
    assert info.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()
