"""llm.c token shards (gpt2_jax/data/shards.py): shards written by llm.c's own `write_datafile` (transcribed in
llmc_reference.py) are read by the training and evaluation path, memory-mapped, a glob of them end to end in sorted
order; batches that cross from one shard into the next equal those of the same tokens as one array; a damaged
shard is one sentence naming it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from llmc_reference import write_datafile

from gpt2_jax.data import shards
from gpt2_jax.data.batches import BatchSampler, eval_windows
from gpt2_jax.data.dataset import load_dataset, read_token_stream
from gpt2_jax.errors import UserError
from gpt2_jax.tokenizers.gpt2_bpe import PACKAGED_GPT2_DIR, gpt2_tokenizer
from gpt2_jax.tokenizers.sentencepiece import train_sentencepiece

ROOT = Path(__file__).resolve().parent.parent
EOT = 50256


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def random_tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50257, size=n).astype(np.uint16)


@pytest.fixture
def three_shards(tmp_path) -> tuple[Path, np.ndarray]:
    """Three shards of different lengths, written in an order their names do not sort in; the stream they make."""
    sizes = {"corpus_train_000002.bin": 700, "corpus_train_000001.bin": 1000, "corpus_train_000003.bin": 300}
    for seed, (name, n) in enumerate(sizes.items()):
        write_datafile(tmp_path / name, random_tokens(n, seed).tolist())
    in_order = [random_tokens(sizes[name], list(sizes).index(name)) for name in sorted(sizes)]
    return tmp_path, np.concatenate(in_order)


def test_a_shard_llmc_wrote_is_memory_mapped_by_the_training_path(tok, tmp_path):
    tokens = random_tokens(5000, 0)
    write_datafile(tmp_path / "fineweb_train_000001.bin", tokens.tolist())
    ds = load_dataset(str(tmp_path / "fineweb_train_000001.bin"), tok, val_fraction=0.1, progress=False)
    assert isinstance(ds.train, np.memmap) and ds.train.dtype == np.uint16 and ds.cache_path is None
    np.testing.assert_array_equal(np.concatenate([ds.train, ds.val]), tokens)  # the header is not read as tokens
    assert len(ds.val) == 500
    assert os.listdir(tmp_path) == ["fineweb_train_000001.bin"]  # no token cache: the shard is used in place


def test_a_glob_of_shards_is_one_stream_in_sorted_order(tok, three_shards):
    folder, expected = three_shards
    stream = read_token_stream(str(folder / "corpus_train_*.bin"), tok, progress=False)
    assert isinstance(stream.tokens, shards.TokenShards) and len(stream.tokens) == 2000
    assert all(isinstance(p, np.memmap) for p in stream.tokens.parts)
    np.testing.assert_array_equal(np.asarray(stream.tokens), expected)
    np.testing.assert_array_equal(np.asarray(read_token_stream(str(folder), tok, progress=False).tokens), expected)
    assert stream.tokens.max() == expected.max() and stream.n_documents == 3
    assert sorted(os.listdir(folder)) == [f"corpus_train_00000{i}.bin" for i in (1, 2, 3)]  # nothing copied


def test_batches_across_shard_boundaries_equal_those_of_one_array(three_shards):
    folder, expected = three_shards
    parts = [shards.open_shard(str(p)) for p in sorted(folder.glob("*.bin"))]
    sharded = shards.TokenShards(parts)
    for a, b in ((0, 2000), (950, 1750), (1699, 1701), (1000, 1000)):  # slices within, across and at boundaries
        np.testing.assert_array_equal(np.asarray(sharded[a:b]), expected[a:b])
    # The same seed draws the same starts over the same length, so every batch must be the plain array's.
    one, many = BatchSampler(expected, 16, 64, seed=5), BatchSampler(sharded, 16, 64, seed=5)
    crossed = 0
    for _ in range(20):
        starts = one.starts(one.step)
        crossed += int(np.sum((starts < 1000) & (starts + 65 > 1000)) + np.sum((starts < 1700) & (starts + 65 > 1700)))
        batch = many.next_batch()
        np.testing.assert_array_equal(batch, one.next_batch())
        assert batch.dtype == np.int32
    assert crossed > 0  # some windows really ran from one shard into the next
    np.testing.assert_array_equal(many.next_batch(slice(4, 8)), one.next_batch(slice(4, 8)))  # one process's rows
    held_out = sharded[1500:]
    np.testing.assert_array_equal(
        np.concatenate(list(eval_windows(held_out, 3, 32))), np.concatenate(list(eval_windows(expected[1500:], 3, 32)))
    )


def test_validation_from_named_shards(tok, tmp_path):
    train, val = random_tokens(3000, 1), random_tokens(800, 2)
    write_datafile(tmp_path / "fw_val_000000.bin", val.tolist())
    write_datafile(tmp_path / "fw_train_000001.bin", train[:2000].tolist())
    write_datafile(tmp_path / "fw_train_000002.bin", train[2000:].tolist())
    ds = load_dataset(
        str(tmp_path / "fw_train_*.bin"), tok, val_path=str(tmp_path / "fw_val_*.bin"), seq_len=64, progress=False
    )
    np.testing.assert_array_equal(np.asarray(ds.train), train)
    np.testing.assert_array_equal(ds.val, val)


def damage(path: Path, how: str) -> None:
    header = np.frombuffer(path.read_bytes()[:1024], "<i4").copy()
    body = path.read_bytes()[1024:]
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
        return
    if how == "empty":
        header[2], body = 0, b""
    elif how == "count_too_small":
        header[2] -= 1
    elif how == "version":
        header[1] = 2
    else:  # another llm.c magic
        header[0] = {"eval_magic": 20240522, "llama3": 20240801}[how]
    path.write_bytes(header.tobytes() + body)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", r"llm.c shard .*bad_000001.bin is truncated or damaged: its header counts 500 tokens, which"),
        ("count_too_small", r"llm.c shard .*bad_000001.bin is truncated or damaged: its header counts 499 tokens"),
        ("empty", r"llm.c shard .*bad_000001.bin holds no tokens"),
        ("version", r"bad_000001.bin is an llm.c shard of version 2; only version 1"),
        ("eval_magic", r"bad_000001.bin begins with llm.c's evaluation-file magic 20240522, not 20240520"),
        ("llama3", r"bad_000001.bin is an llm.c shard of Llama 3 tokens"),
    ],
)
def test_a_damaged_shard_is_one_sentence_naming_it(tok, tmp_path, how, message):
    write_datafile(tmp_path / "good_000000.bin", random_tokens(500, 0).tolist())
    write_datafile(tmp_path / "bad_000001.bin", random_tokens(500, 1).tolist())
    damage(tmp_path / "bad_000001.bin", how)
    with pytest.raises(UserError, match=message) as info:
        read_token_stream(str(tmp_path / "*.bin"), tok, progress=False)
    assert "\n" not in str(info.value)


def test_shards_mixed_with_other_files_are_refused(tok, tmp_path):
    write_datafile(tmp_path / "a_train_000001.bin", random_tokens(100, 0).tolist())
    (tmp_path / "notes.txt").write_text("some text")
    with pytest.raises(UserError, match=r"--dataset names llm.c shards and other files \(.*notes.txt\)"):
        read_token_stream(str(tmp_path), tok, progress=False)


def test_shards_need_gpt2s_vocabulary(tmp_path):
    write_datafile(tmp_path / "a_train_000001.bin", random_tokens(100, 0).tolist())
    corpus = (ROOT / "data" / "shakespeare" / "macbeth_gut.txt").read_text(encoding="utf-8")[:200_000]
    pieces = train_sentencepiece([corpus], 512, tmp_path / "spm")
    with pytest.raises(UserError, match=r"llm.c shard of GPT-2 token ids, but this model's tokenizer is sentencepiece"):
        read_token_stream(str(tmp_path / "*.bin"), pieces, progress=False)
    # GPT-2's BPE under Hugging Face's file names is the same vocabulary: accepted.
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(PACKAGED_GPT2_DIR / "encoder.json", hf / "vocab.json")
    shutil.copy(PACKAGED_GPT2_DIR / "vocab.bpe", hf / "merges.txt")
    assert len(read_token_stream(str(tmp_path / "*.bin"), gpt2_tokenizer(hf), progress=False).tokens) == 100


def test_a_sentencepiece_vocabulary_cannot_be_learned_from_shards(tmp_path):
    from gpt2_jax.errors import UsageError
    from gpt2_jax.training.setup import _dataset_texts

    write_datafile(tmp_path / "a_train_000001.bin", random_tokens(100, 0).tolist())
    with pytest.raises(UsageError, match=r"--dataset names llm.c shards, which hold GPT-2's token ids already; leave"):
        _dataset_texts(str(tmp_path / "*.bin"), None)


def test_our_header_is_llmcs(tmp_path):
    tokens = random_tokens(321, 3)
    write_datafile(tmp_path / "theirs.bin", tokens.tolist())
    ours = shards.ShardFile(str(tmp_path / "ours.bin"))
    ours.write(tokens[:300])
    ours.write(tokens[300:])
    assert not (tmp_path / "ours.bin").exists()  # under its temporary name until complete
    digest = ours.commit()
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    assert digest == shards.file_sha256(str(tmp_path / "theirs.bin")) and not (tmp_path / "ours.bin.tmp").exists()


def test_train_py_trains_on_shards_with_validation_shards(tmp_path):
    from gpt2_jax.training.loop import run_training

    text = (ROOT / "data" / "shakespeare" / "macbeth_gut.txt").read_text(encoding="utf-8")[:30_000]
    tokens = [EOT, *gpt2_tokenizer().encode(text)]
    write_datafile(tmp_path / "macbeth_val_000000.bin", tokens[:1500])
    write_datafile(tmp_path / "macbeth_train_000001.bin", tokens[1500:5000])
    write_datafile(tmp_path / "macbeth_train_000002.bin", tokens[5000:])
    flags = dict(
        init="scratch:tiny", dataset=str(tmp_path / "macbeth_train_*.bin"),
        val_dataset=str(tmp_path / "macbeth_val_*.bin"), seq_len=32, batch_size=8, steps=2, log_every=1,
        val_every=2, val_batches=2, save_every=2, sample_num=0, out=str(tmp_path / "run"),
    )  # fmt: skip
    assert run_training(flags, bundled_dataset=str(ROOT / "data" / "shakespeare")) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["step"] for r in records if "val_loss" in r] == [2]
    assert all(np.isfinite(r.get("loss", r.get("val_loss"))) for r in records)
