"""Parquet datasets (gpt2_jax/data/parquet.py), on files made here with pyarrow in FineWeb's layout: the same
documents give exactly the numbers they give as jsonl, read one row group at a time, the text column by flag, null
texts skipped and counted, invalid UTF-8 replaced and counted, and a wrong column one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt2_jax.data.dataset import load_dataset, read_token_stream
from gpt2_jax.errors import UserError
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer

EOT = 50256
DOCUMENTS = [
    "Posted by mattsmith on 20th April 2012\nStraight from the source: the ferry runs at noon.",
    "Une phrase en français, avec des accents: é, è, ç.",
    "短い日本語の文書です。",
    "Tabs\tand  double  spaces, and a literal <|endoftext|> that stays text.",
    "",  # an empty document adds nothing, as an empty jsonl text does
    "The last document " * 40,
]


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def fineweb_table(texts: list[str | None], text_column: str = "text") -> pa.Table:
    """FineWeb's columns (HuggingFaceFW/fineweb), with made-up values."""
    n = len(texts)
    return pa.table(
        {
            text_column: pa.array(texts, pa.string()),
            "id": [f"<urn:uuid:{i:08d}-0000-4000-8000-000000000000>" for i in range(n)],
            "dump": ["CC-MAIN-2013-20"] * n,
            "url": [f"http://example.com/{i}" for i in range(n)],
            "language": ["en"] * n,
            "language_score": np.linspace(0.65, 0.99, n),
            "token_count": np.arange(n, dtype=np.int64) * 7,
        }
    )


def write_parquet(path: Path, texts: list[str | None], row_group_size: int = 2, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(fineweb_table(texts, **kw), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_parquet_gives_the_numbers_the_same_documents_give_as_jsonl(tok, tmp_path):
    parquet = write_parquet(tmp_path / "p" / "train-00000.parquet", DOCUMENTS)
    jsonl = write_jsonl(tmp_path / "j" / "train-00000.jsonl", DOCUMENTS)
    a = read_token_stream(str(parquet), tok, progress=False)
    b = read_token_stream(str(jsonl), tok, progress=False)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.n_documents == b.n_documents == 5 and a.n_replaced_bytes == b.n_replaced_bytes == 0
    expected = [t for d in DOCUMENTS if d for t in [EOT, *tok.encode(d)]][1:]
    np.testing.assert_array_equal(a.tokens, expected)
    assert a.cache_path.endswith(".cache") and Path(a.cache_path).parent == parquet.parent  # cached beside the data
    split_a = load_dataset(str(parquet), tok, val_fraction=0.1, progress=False)
    split_b = load_dataset(str(jsonl), tok, val_fraction=0.1, progress=False)
    assert (len(split_a.train), len(split_a.val)) == (len(split_b.train), len(split_b.val))
    np.testing.assert_array_equal(split_a.val, split_b.val)


def test_a_folder_or_glob_of_parquet_files(tok, tmp_path):
    write_parquet(tmp_path / "d" / "b.parquet", DOCUMENTS[3:])
    write_parquet(tmp_path / "d" / "a.parquet", DOCUMENTS[:3])
    whole = write_jsonl(tmp_path / "all.jsonl", DOCUMENTS)
    expected = read_token_stream(str(whole), tok, progress=False).tokens
    for path in (tmp_path / "d", tmp_path / "d" / "*.parquet"):
        np.testing.assert_array_equal(read_token_stream(str(path), tok, progress=False).tokens, expected)


def test_read_one_row_group_at_a_time_and_only_the_text_column(tok, tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "f.parquet", DOCUMENTS, row_group_size=2)
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append((kwargs.get("row_groups"), kwargs.get("columns")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("the whole file was read"))
    read_token_stream(str(path), tok, progress=False)
    assert calls == [([0], ["text"]), ([1], ["text"]), ([2], ["text"])]


def test_the_text_column_is_chosen_by_flag(tok, tmp_path):
    path = write_parquet(tmp_path / "f.parquet", DOCUMENTS, text_column="content")
    with pytest.raises(UserError, match=r"has no column 'text' \(its columns: content, id, dump, url, .*--text_column"):
        read_token_stream(str(path), tok, progress=False)
    got = read_token_stream(str(path), tok, progress=False, text_column="content")
    expected = read_token_stream(str(write_jsonl(tmp_path / "j.jsonl", DOCUMENTS)), tok, progress=False)
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    # The same flag names a jsonl field and a csv column.
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "hello there", "text": 3}) + "\n", encoding="utf-8")
    (tmp_path / "c.csv").write_text("text,content\nignored,hello there\n", encoding="utf-8")
    for name in ("c.jsonl", "c.csv"):
        stream = read_token_stream(str(tmp_path / name), tok, progress=False, text_column="content")
        np.testing.assert_array_equal(stream.tokens, tok.encode("hello there"))
    with pytest.raises(UserError, match=r"CSV file .*c.csv has no column 'body' \(its header: text, content\)"):
        read_token_stream(str(tmp_path / "c.csv"), tok, progress=False, text_column="body")


def test_a_column_of_non_strings_is_one_sentence(tok, tmp_path):
    path = write_parquet(tmp_path / "f.parquet", DOCUMENTS)
    with pytest.raises(UserError, match=r"Column 'token_count' of parquet file .* holds int64 values, not text"):
        read_token_stream(str(path), tok, progress=False, text_column="token_count")
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(UserError, match=r"junk.parquet is not a readable parquet file"):
        read_token_stream(str(tmp_path / "junk.parquet"), tok, progress=False)


def test_null_texts_are_skipped_and_counted(tok, tmp_path, capsys):
    path = write_parquet(tmp_path / "f.parquet", [DOCUMENTS[0], None, DOCUMENTS[1], None])
    ds = load_dataset(str(path), tok, val_fraction=0.0)
    np.testing.assert_array_equal(ds.train, [*tok.encode(DOCUMENTS[0]), EOT, *tok.encode(DOCUMENTS[1])])
    assert ds.n_documents == 2 and ds.n_null_texts == 2
    assert "2 null texts skipped" in capsys.readouterr().err
    assert load_dataset(str(path), tok, val_fraction=0.0, progress=False).n_null_texts == 2  # from the cache


def test_invalid_utf8_in_a_string_column_is_replaced_and_counted(tok, tmp_path):
    data = b"caf\xe9 cr\xe8me, fine"  # latin-1 bytes, which a careless writer put in a string column
    offsets = pa.py_buffer(np.array([0, len(data)], np.int32).tobytes())
    column = pa.Array.from_buffers(pa.string(), 1, [None, offsets, pa.py_buffer(data)])
    pq.write_table(pa.table({"text": column}), tmp_path / "f.parquet")
    stream = read_token_stream(str(tmp_path / "f.parquet"), tok, progress=False)
    np.testing.assert_array_equal(stream.tokens, tok.encode("caf\ufffd cr\ufffdme, fine"))
    assert stream.n_replaced_bytes == 2
