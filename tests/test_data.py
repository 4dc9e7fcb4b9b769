"""Datasets (gpt2_jax.data.dataset, gpt2_jax.data.cache) and batches (gpt2_jax.data.batches).

Every expected token stream is built independently from the tokenizer's own `encode` of each document, joined by
the end-of-text id, and compared with what `load_dataset` returns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from gpt2_jax.data import cache as token_cache
from gpt2_jax.data import dataset as data
from gpt2_jax.data import files as data_files
from gpt2_jax.data.batches import BatchSampler, eval_windows
from gpt2_jax.data.dataset import load_dataset
from gpt2_jax.errors import UserError
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer
from gpt2_jax.tokenizers.sentencepiece import train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 50256


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


class CountingTokenizer:
    """The GPT-2 tokenizer, counting encode_batch calls (to prove a cache hit tokenizes nothing)."""

    def __init__(self, inner, n_vocab: int | None = None):
        self.inner, self.calls = inner, 0
        self.name, self.eot_id, self.fingerprint = inner.name, inner.eot_id, inner.fingerprint
        self.n_vocab = n_vocab or inner.n_vocab

    def encode(self, text, allow_special=False):
        return self.inner.encode(text, allow_special=allow_special)

    def decode(self, ids):
        return self.inner.decode(ids)

    def encode_batch(self, texts, allow_special=False, num_threads=8):
        self.calls += 1
        return self.inner.encode_batch(texts, allow_special=allow_special, num_threads=num_threads)


def joined(tok, *docs: str) -> np.ndarray:
    out: list[int] = []
    for i, doc in enumerate(docs):
        out += ([EOT] if i else []) + tok.encode(doc)
    return np.array(out)


def stream(ds) -> np.ndarray:
    return np.concatenate([ds.train, ds.val]) if ds.val is not None else np.asarray(ds.train)


def load(path, tok, **kw):
    kw.setdefault("val_fraction", 0.0)
    return load_dataset(str(path), tok, progress=False, **kw)


def write(path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


# --- formats ------------------------------------------------------------------------------------------------
def test_text_and_markdown_files(tok, tmp_path):
    for name in ("a.txt", "b.md"):
        ds = load(write(tmp_path / name, "Hello world.\n\n# Heading\n"), tok)
        np.testing.assert_array_equal(ds.train, joined(tok, "Hello world.\n\n# Heading\n"))
        assert ds.train.dtype == np.uint16 and ds.n_documents == 1 and ds.val is None


def test_jsonl_one_document_per_line(tok, tmp_path):
    lines = [json.dumps({"text": "first doc", "id": 1}), "", json.dumps({"text": "second\ndoc"})]
    ds = load(write(tmp_path / "d.jsonl", "\n".join(lines) + "\n"), tok)
    np.testing.assert_array_equal(ds.train, joined(tok, "first doc", "second\ndoc"))
    assert ds.n_documents == 2


def test_csv_text_column_or_first_column(tok, tmp_path):
    ds = load(write(tmp_path / "t.csv", 'id,Text\n1,"one, with comma"\n2,"two\nlines"\n'), tok)
    np.testing.assert_array_equal(ds.train, joined(tok, "one, with comma", "two\nlines"))
    ds = load(write(tmp_path / "f.csv", "quote,author\nfirst,x\nsecond,y\n"), tok)
    np.testing.assert_array_equal(ds.train, joined(tok, "first", "second"))


def test_pretokenized_npy_and_bin(tok, tmp_path):
    ids = np.array([15496, 995, EOT, 40, 716], np.int64)
    np.save(tmp_path / "t.npy", ids)
    ds = load(tmp_path / "t.npy", tok)
    np.testing.assert_array_equal(ds.train, ids)
    assert ds.train.dtype == np.uint16 and ds.cache_path is not None  # int64 converted through the cache
    (tmp_path / "t.bin").write_bytes(ids.astype("<u2").tobytes())
    ds = load(tmp_path / "t.bin", tok)
    assert isinstance(ds.train, np.memmap) and ds.cache_path is None  # right dtype already: mapped directly
    np.testing.assert_array_equal(ds.train, ids)


def test_token_files_are_read_chunk_by_chunk(tok, tmp_path, monkeypatch):
    """Through the cache, token files are read in chunks (not mapped whole); every chunk is checked."""
    monkeypatch.setattr(data_files, "TOKEN_CHUNK", 7)
    ids = np.random.default_rng(0).integers(0, 50257, size=100)
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "a.npy", ids.astype(">i8"))  # big-endian int64: converted, 15 chunks
    (tmp_path / "d" / "b.bin").write_bytes(ids[:30].astype("<u2").tobytes())
    np.testing.assert_array_equal(load(tmp_path / "d", tok).train, [*ids, EOT, *ids[:30]])
    bad = ids.copy()
    bad[95] = 60000
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(UserError, match="holds token id 60000"):
        load(tmp_path / "bad.npy", tok)


def test_large_vocabulary_uses_uint32(tok, tmp_path):
    ds = load(write(tmp_path / "a.txt", "wide ids"), CountingTokenizer(tok, n_vocab=70_000))
    assert ds.train.dtype == np.uint32
    np.testing.assert_array_equal(ds.train, tok.encode("wide ids"))


def test_folder_recursive_sorted_and_glob(tok, tmp_path):
    write(tmp_path / "corpus" / "b.txt", "bee")
    write(tmp_path / "corpus" / "a" / "z.md", "zed")
    write(tmp_path / "corpus" / "c.jsonl", json.dumps({"text": "sea"}))
    write(tmp_path / "corpus" / "notes.pdf", "not read")
    write(tmp_path / "corpus" / ".hidden.txt", "not read")
    write(tmp_path / "corpus" / ".git" / "x.txt", "not read")
    ds = load(tmp_path / "corpus", tok)
    np.testing.assert_array_equal(ds.train, joined(tok, "zed", "bee", "sea"))  # a/z.md < b.txt < c.jsonl
    assert ds.n_documents == 3 and "3 files" in ds.source
    ds = load(tmp_path / "corpus" / "**" / "*.txt", tok)
    np.testing.assert_array_equal(ds.train, joined(tok, "bee"))
    ds = load(tmp_path / "corpus" / "**" / "*.*", tok)  # the folder's own cache file is never read as data
    np.testing.assert_array_equal(ds.train, joined(tok, "zed", "bee", "sea"))


def test_end_of_text_joins_documents_and_literal_stays_text(tok, tmp_path):
    write(tmp_path / "d" / "1.txt", "First story. <|endoftext|> still the first")
    write(tmp_path / "d" / "2.txt", "Second story.")
    ds = load(tmp_path / "d", tok)
    expected = [*tok.encode("First story. <|endoftext|> still the first"), EOT, *tok.encode("Second story.")]
    np.testing.assert_array_equal(ds.train, expected)
    assert list(ds.train).count(EOT) == 1  # only the real boundary; the literal became ordinary tokens
    assert tok.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]  # the 7 tokens the docstring promises


def test_pretokenized_file_ending_in_eot_gets_no_second_separator(tok, tmp_path):
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "a.npy", np.array([40, EOT]))
    write(tmp_path / "d" / "b.txt", "next")
    np.testing.assert_array_equal(load(tmp_path / "d", tok).train, [40, EOT, *tok.encode("next")])


def test_invalid_utf8_is_replaced_and_counted(tok, tmp_path):
    write(tmp_path / "bad.txt", b"\xef\xbb\xbfcaf\xc3\xa9 \xff\xfe ok \xe2\x82")  # BOM, 2 bad bytes, cut-off euro sign
    ds = load(tmp_path / "bad.txt", tok)
    assert ds.n_replaced_bytes == 4
    np.testing.assert_array_equal(ds.train, tok.encode("café \ufffd\ufffd ok \ufffd"))
    assert load(tmp_path / "bad.txt", tok).n_replaced_bytes == 4  # remembered by the cache


def test_lone_surrogates_in_jsonl_are_replaced_and_counted(tok, tmp_path):
    """A "\\ud800" escape is valid JSON that no tokenizer can encode: U+FFFD, counted with the bad bytes."""
    write(tmp_path / "s.jsonl", b'{"text": "a\\ud800b \\udfff"}\n{"text": "caf\\u00e9 \xff"}\n')
    ds = load(tmp_path / "s.jsonl", tok)
    assert ds.n_replaced_bytes == 3
    np.testing.assert_array_equal(ds.train, [*tok.encode("a\ufffdb \ufffd"), EOT, *tok.encode("café \ufffd")])


def test_long_documents_cut_for_threads_give_the_same_tokens(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "CHUNK_CHARS", 50)
    monkeypatch.setattr(data_files, "READ_BYTES", 64)
    monkeypatch.setattr(data, "GROUP_CHARS", 300)
    text = open(os.path.join(ROOT, "data", "shakespeare", "macbeth_gut.txt"), encoding="utf-8").read()[:6000]
    text += " don't  stop\t\there\n\n\n  ünïcode 東京\u3000nbsp\xa0here!\x1c.\x1d " + "x" * 120 + " end  "
    counting = CountingTokenizer(tok)
    ds = load(write(tmp_path / "long.txt", text), counting)
    np.testing.assert_array_equal(ds.train, tok.encode(text))
    assert counting.calls > 3  # really cut and grouped


def test_sentencepiece_dataset_matches_whole_document_encoding(tmp_path, monkeypatch):
    text = open(os.path.join(ROOT, "data", "shakespeare", "hamlet_gut.txt"), encoding="utf-8").read()[:20000]
    sp = train_sentencepiece(text, 400, tmp_path / "sp")
    monkeypatch.setattr(data_files, "CHUNK_CHARS", 500)
    ds = load(write(tmp_path / "h.txt", text), sp)
    np.testing.assert_array_equal(ds.train, sp.encode(text))


# --- cache ---------------------------------------------------------------------------------------------------
def test_cache_is_reused_and_invalidated_by_an_edit(tok, tmp_path):
    counting = CountingTokenizer(tok)
    path = write(tmp_path / "d" / "a.txt", "the same length")
    first = load(tmp_path / "d", counting)
    calls = counting.calls
    assert calls >= 1 and os.path.dirname(first.cache_path) == str(tmp_path / "d")
    second = load(tmp_path / "d", counting)
    assert counting.calls == calls and second.cache_path == first.cache_path  # nothing tokenized again
    np.testing.assert_array_equal(second.train, first.train)
    stat = os.stat(path)
    write(tmp_path / "d" / "a.txt", "the other words")  # same size, and the old mtime put back: content decides
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    third = load(tmp_path / "d", counting)
    assert counting.calls > calls
    np.testing.assert_array_equal(third.train, tok.encode("the other words"))
    assert not os.path.exists(first.cache_path)  # the stale cache was removed


def test_truncated_cache_and_leftover_temp_are_ignored(tok, tmp_path):
    counting = CountingTokenizer(tok)
    write(tmp_path / "a.txt", "some words to cache " * 20)
    cache = load(tmp_path / "a.txt", counting).cache_path
    with open(cache, "r+b") as f:
        f.truncate(os.path.getsize(cache) - 2)
    dead_temp = f"{cache}.tmp-999999999"
    write(tmp_path / os.path.basename(dead_temp), b"GPT2JAX-TOKENS1\n half-written garbage")
    calls = counting.calls
    ds = load(tmp_path / "a.txt", counting)
    assert counting.calls > calls  # rebuilt, not read back
    np.testing.assert_array_equal(ds.train, tok.encode("some words to cache " * 20))
    assert not os.path.exists(dead_temp)


def test_interrupted_tokenizing_leaves_no_cache(tok, tmp_path):
    class Interrupting(CountingTokenizer):
        def encode_batch(self, texts, allow_special=False, num_threads=8):
            raise KeyboardInterrupt

    write(tmp_path / "a.txt", "words")
    with pytest.raises(KeyboardInterrupt):
        load(tmp_path / "a.txt", Interrupting(tok))
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_cache_written_by_a_killed_process_is_never_read(tok, tmp_path):
    """kill -9 in the middle of writing the cache: the next load rebuilds it from the data."""
    write(tmp_path / "d" / "a.txt", "first document")
    write(tmp_path / "d" / "b.txt", "second document")
    script = textwrap.dedent(f"""
        import time
        from gpt2_jax.data import dataset as data
        from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer
        tok = gpt2_tokenizer()
        class Slow:
            name, n_vocab, eot_id, fingerprint = tok.name, tok.n_vocab, tok.eot_id, tok.fingerprint
            encode = staticmethod(tok.encode)
            calls = 0
            def encode_batch(self, texts, **kw):
                print("encoding", flush=True)
                self.calls += 1
                if self.calls > 1:
                    time.sleep(3600)  # killed long before: it only has to outlast the kill
                return tok.encode_batch(texts, **kw)
        data.GROUP_CHARS = 1  # one group per document: the first is written, the second never finishes
        data.load_dataset({str(tmp_path / "d")!r}, Slow(), progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "encoding"
        assert proc.stdout.readline().strip() == "encoding"  # in the second group, the first one written
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert len([n for n in os.listdir(tmp_path / "d") if ".tmp-" in n]) == 1  # the killed writer's temp file
    ds = load(tmp_path / "d", tok)
    np.testing.assert_array_equal(ds.train, joined(tok, "first document", "second document"))
    assert not any(".tmp-" in n for n in os.listdir(tmp_path / "d"))  # the dead process's temp was tidied


def test_tokenizer_without_fingerprint_is_identified_by_its_vocabulary(tok, tmp_path):
    plain, again, other = CountingTokenizer(tok), CountingTokenizer(tok), CountingTokenizer(tok)
    plain.fingerprint = again.fingerprint = other.fingerprint = None
    other.decode = lambda ids: tok.decode(ids).replace("e", "E")  # another vocabulary, same name and size
    assert token_cache.tokenizer_fingerprint(plain) == token_cache.tokenizer_fingerprint(again)
    assert token_cache.tokenizer_tag(plain) != token_cache.tokenizer_tag(other) != token_cache.tokenizer_tag(tok)
    first = load(write(tmp_path / "a.txt", "some text"), plain).cache_path
    assert load(tmp_path / "a.txt", other).cache_path != first


def test_unwritable_data_folder_falls_back_to_the_user_cache(tok, tmp_path, monkeypatch):
    write(tmp_path / "ro" / "a.txt", "read-only data")
    real_writer = token_cache.CacheWriter

    def refuse_beside_data(path, key, dtype):
        if path.startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied")
        return real_writer(path, key, dtype)

    monkeypatch.setattr(token_cache, "CacheWriter", refuse_beside_data)
    monkeypatch.setenv("GPT2_JAX_CACHE", str(tmp_path / "user_cache"))
    counting = CountingTokenizer(tok)
    ds = load(tmp_path / "ro", counting)
    assert ds.cache_path.startswith(str(tmp_path / "user_cache"))
    calls = counting.calls
    assert load(tmp_path / "ro", counting).cache_path == ds.cache_path and counting.calls == calls
    assert load(tmp_path / "ro", tok, cache_dir=str(tmp_path / "mine")).cache_path.startswith(str(tmp_path / "mine"))


# --- validation split -----------------------------------------------------------------------------------------
def test_validation_is_the_contiguous_tail(tok, tmp_path):
    text = open(os.path.join(ROOT, "data", "shakespeare", "lear_gut.txt"), encoding="utf-8").read()[:20000]
    write(tmp_path / "a.txt", text)
    full = tok.encode(text)
    ds = load(tmp_path / "a.txt", tok, val_fraction=0.1, seq_len=64)
    n_val = round(len(full) * 0.1)
    np.testing.assert_array_equal(ds.val, full[-n_val:])
    np.testing.assert_array_equal(ds.train, full[:-n_val])
    write(tmp_path / "v.txt", text[:3000])
    ds = load(tmp_path / "a.txt", tok, val_fraction=0.1, val_path=str(tmp_path / "v.txt"))
    np.testing.assert_array_equal(ds.train, full)
    np.testing.assert_array_equal(ds.val, tok.encode(text[:3000]))


# --- errors ------------------------------------------------------------------------------------------------
def error(path, tok, **kw) -> str:
    with pytest.raises(UserError) as info:
        load(path, tok, **kw)
    return str(info.value)


def test_errors_say_what_was_wrong_and_what_to_do(tok, tmp_path):
    assert "does not exist" in error(tmp_path / "nope.txt", tok)
    assert "extension" in error(write(tmp_path / "x.pdf", "x"), tok)
    write(tmp_path / "only_pdf" / "x.pdf", "x")
    assert "no readable dataset files" in error(tmp_path / "only_pdf", tok)
    assert "matches nothing" in error(tmp_path / "*.nothing", tok)
    write(tmp_path / "empty" / "a.txt", "")
    assert "holds no text" in error(tmp_path / "empty", tok)
    assert os.listdir(tmp_path / "empty") == ["a.txt"]  # no cache for an empty dataset
    write(tmp_path / "short.txt", "only a few tokens here")
    message = error(tmp_path / "short.txt", tok, seq_len=64)
    assert "has 5 tokens" in message and "seq_len + 1 = 65" in message and "--seq_len" in message
    write(tmp_path / "mid.txt", "word " * 200)
    message = error(tmp_path / "mid.txt", tok, seq_len=64, val_fraction=0.05)
    assert "validation split" in message and "has 10 tokens" in message and "--val_fraction" in message
    assert "Line 2" in error(write(tmp_path / "b.jsonl", '{"text": "ok"}\n{"txt": "no"}\n'), tok)
    assert "not valid JSON" in error(write(tmp_path / "c.jsonl", "{oops\n"), tok)
    np.save(tmp_path / "big.npy", np.array([1, 60000]))
    assert "60000" in error(tmp_path / "big.npy", tok)
    assert "odd number of bytes" in error(write(tmp_path / "odd.bin", b"abc"), tok)


# --- batches -----------------------------------------------------------------------------------------------
@pytest.fixture
def memmap_tokens(tmp_path) -> np.ndarray:
    np.arange(5000, dtype="<u2").tofile(tmp_path / "t.bin")  # token i at position i: windows are easy to check
    return np.memmap(tmp_path / "t.bin", dtype="<u2", mode="r")


def test_sampler_windows_are_slices_and_reproducible(memmap_tokens):
    a, b = BatchSampler(memmap_tokens, 4, 16, seed=3), BatchSampler(memmap_tokens, 4, 16, seed=3)
    batches = [a.next_batch() for _ in range(5)]
    for batch in batches:
        assert batch.shape == (4, 17) and batch.dtype == np.int32
        np.testing.assert_array_equal(batch, batch[:, :1] + np.arange(17))  # contiguous windows
        assert batch.min() >= 0 and batch.max() < 5000
    for batch in batches:
        np.testing.assert_array_equal(batch, b.next_batch())
    other = BatchSampler(memmap_tokens, 4, 16, seed=4).next_batch()
    assert not np.array_equal(other, batches[0])


def test_sampler_restore_continues_exactly(memmap_tokens):
    straight = BatchSampler(memmap_tokens, 8, 32, seed=11)
    for _ in range(7):
        straight.next_batch()
    state = json.loads(json.dumps(straight.state()))
    expected = [straight.next_batch() for _ in range(3)]
    resumed = BatchSampler(memmap_tokens, 8, 32, seed=999)
    resumed.next_batch()
    resumed.restore(state)
    for batch in expected:
        np.testing.assert_array_equal(resumed.next_batch(), batch)
    with pytest.warns(UserWarning, match="differ"):
        BatchSampler(memmap_tokens[:4000], 8, 32, seed=11).restore(state)


def test_sampler_reaches_both_ends(memmap_tokens):
    tokens = memmap_tokens[:20]
    sampler = BatchSampler(tokens, 64, 15, seed=0)
    starts = np.concatenate([sampler.next_batch()[:, 0] for _ in range(10)])
    assert set(starts) == set(range(5))  # every start 0..n-(seq_len+1)


def test_eval_windows_cover_every_target_once(memmap_tokens):
    batches = list(eval_windows(memmap_tokens[:1000], 4, 64))
    windows = np.concatenate(batches)
    assert [len(b) for b in batches] == [4, 4, 4, 3]  # (1000 - 1) // 64 = 15 windows
    np.testing.assert_array_equal(windows[:, 1:].ravel(), np.arange(1, 15 * 64 + 1))
    assert all(b.dtype == np.int32 for b in batches)
    again = np.concatenate(list(eval_windows(memmap_tokens[:1000], 4, 64)))
    np.testing.assert_array_equal(again, windows)


def test_sampler_errors(memmap_tokens):
    with pytest.raises(UserError, match="fewer than one window"):
        BatchSampler(memmap_tokens[:10], 2, 10, seed=0)
    with pytest.raises(UserError, match="seed"):
        BatchSampler(memmap_tokens, 2, 10, seed=-1)


def test_bundled_corpus_loads(tok, tmp_path):
    """The default dataset, copied so its cache lands in tmp_path: every play a document, val held out."""
    import shutil

    shutil.copytree(os.path.join(ROOT, "data", "shakespeare"), tmp_path / "shakespeare")
    start = time.perf_counter()
    ds = load_dataset(str(tmp_path / "shakespeare"), tok, seq_len=1024, progress=False)
    first = time.perf_counter() - start
    assert ds.n_documents == 11 and ds.n_replaced_bytes == 0 and len(ds.val) > 1025
    assert np.count_nonzero(stream(ds) == EOT) == 10
    start = time.perf_counter()
    load_dataset(str(tmp_path / "shakespeare"), tok, seq_len=1024, progress=False)
    print(f"shakespeare: first load {first:.2f} s, cached {time.perf_counter() - start:.3f} s")
