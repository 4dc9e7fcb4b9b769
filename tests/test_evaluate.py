"""`python -m gpt2_jax.evaluate`: the same loss as Hugging Face's PyTorch GPT-2 computes with the same windowing."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from llmc_reference import write_datafile
from reference import hf_model_from_params
from tolerance import ulps

from gpt2_jax import evaluate
from gpt2_jax.cli import run_cli
from gpt2_jax.config import get_config
from gpt2_jax.data.dataset import read_token_stream
from gpt2_jax.errors import UserError
from gpt2_jax.io import atomic_directory
from gpt2_jax.model.transformer import GPT2, init_params
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer
from gpt2_jax.weights.native import save_native_model

REPO = Path(__file__).parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "gpt2-tiny"
CONFIG = get_config("tiny")  # GPT-2's vocabulary, n_ctx 128


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    shakespeare = sorted((REPO / "data" / "shakespeare").glob("*.txt"))[0]
    path = tmp_path_factory.mktemp("data") / "sample.txt"
    path.write_text(shakespeare.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, 0)  # initialising a 50257-token model costs seconds here: once per module


def pytorch_loss(params, tokens: np.ndarray) -> tuple[float, int]:
    """Mean next-token NLL over consecutive n_ctx windows (first token of each unpredicted), by transformers."""
    model = hf_model_from_params(params, CONFIG)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens), CONFIG.n_ctx):
            window = torch.from_numpy(tokens[start : start + CONFIG.n_ctx].astype(np.int64))[None]
            if window.shape[1] < 2:
                continue
            logits = model(window).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    return total / count, count


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, params) -> Path:
    out = tmp_path_factory.mktemp("model") / "model"
    with atomic_directory(out) as tmp:
        save_native_model(tmp, params, CONFIG, gpt2_tokenizer())
    return out


@pytest.fixture(scope="module")
def result(text_file, params) -> dict:
    tokens = read_token_stream(str(text_file), gpt2_tokenizer(), progress=False).tokens
    return evaluate.evaluate(params, CONFIG, tokens, batch_size=5, progress=False)  # the last batch is padded


def numpy_loss(params, tokens: list[int]) -> float:
    """The same windowing scored from the model's logits with a float64 numpy log-softmax."""
    total, count = 0.0, 0
    for start in range(0, len(tokens), CONFIG.n_ctx):
        window = np.asarray(tokens[start : start + CONFIG.n_ctx], np.int32)
        logits_TV = np.asarray(GPT2(CONFIG).apply({"params": params}, window[None])[0, :-1], np.float64)
        shifted_TV = logits_TV - logits_TV.max(axis=-1, keepdims=True)
        log_probs_TV = shifted_TV - np.log(np.exp(shifted_TV).sum(axis=-1, keepdims=True))
        total -= log_probs_TV[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    return total / count


def run_json(capsys, model_dir: Path, data: Path) -> tuple[dict, str]:
    """evaluate's --json record and what it printed on stderr."""
    assert evaluate.main(["--model", str(model_dir), "--data", str(data), "--json"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def test_text_file_loss_equals_pytorch_reference_with_identical_windowing(text_file, params, result):
    tokens = gpt2_tokenizer().encode(text_file.read_text(encoding="utf-8"))
    assert read_token_stream(str(text_file), gpt2_tokenizer(), progress=False).tokens.tolist() == tokens
    assert len(tokens) % CONFIG.n_ctx > 1 and len(tokens) > 5 * CONFIG.n_ctx  # short last window, padded batch
    loss, count = pytorch_loss(params, np.asarray(tokens))
    n_windows = -(-len(tokens) // CONFIG.n_ctx)
    assert result["tokens"] == count == len(tokens) - n_windows and result["windows"] == n_windows
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


DOCUMENTS = ["To be, or not to be, that is the question: " * 16, "Whether 'tis nobler in the mind to suffer " * 12]


@pytest.mark.parametrize("extension", [".jsonl", ".csv", ".parquet", ".npy", ".bin", "llm.c shards"])
def test_every_dataset_format_train_takes_evaluates(tmp_path, capsys, params, model_dir, extension):
    tokenizer = gpt2_tokenizer()
    tokens = tokenizer.encode(DOCUMENTS[0]) + [tokenizer.eot_id] + tokenizer.encode(DOCUMENTS[1])
    data = tmp_path / f"docs{extension}"
    if extension == "llm.c shards":  # a glob of two, read end to end as one stream
        write_datafile(tmp_path / "docs_val_000000.bin", tokens[:100])
        write_datafile(tmp_path / "docs_val_000001.bin", tokens[100:])
        data = tmp_path / "docs_val_*.bin"
    elif extension == ".parquet":
        pq.write_table(pa.table({"id": [1, 2], "text": DOCUMENTS}), data)
    elif extension == ".jsonl":
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS), encoding="utf-8")
    elif extension == ".csv":
        with open(data, "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([["id", "text"], *enumerate(DOCUMENTS)])
    elif extension == ".npy":
        np.save(data, np.asarray(tokens, np.int32))  # not the cache's uint16: converted through the cache
    else:
        np.asarray(tokens, "<u2").tofile(data)  # nanoGPT's layout, mapped directly
    record, _ = run_json(capsys, model_dir, data)
    assert 2 * CONFIG.n_ctx < len(tokens) < 3 * CONFIG.n_ctx  # three windows, the last one short
    assert record["tokens"] == len(tokens) - 3 and record["windows"] == 3
    assert record["loss"] == pytest.approx(numpy_loss(params, tokens), rel=1e-5)


def test_invalid_utf8_is_replaced_and_counted_and_too_little_data_is_refused(tmp_path, capsys, model_dir):
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    record, err = run_json(capsys, model_dir, tmp_path / "latin1.txt")
    assert record["tokens"] == len(gpt2_tokenizer().encode("caf\ufffd cr\ufffdme")) - 1
    assert "note: replaced 2 invalid UTF-8 bytes in the data with U+FFFD" in err
    (tmp_path / "one.txt").write_text("hello")  # one token: nothing to predict
    with pytest.raises(UserError, match="fewer than 2 tokens"):
        evaluate.main(["--model", str(model_dir), "--data", str(tmp_path / "one.txt")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match=r"holds no text: 1 file.* point --data elsewhere"):
        evaluate.main(["--model", str(model_dir), "--data", str(tmp_path / "empty.txt")])


def test_command_prints_json_with_the_same_numbers(text_file, result, model_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = ["--model", str(model_dir), "--data", str(text_file), "--json", "--batch_size", "3"]
    completed = subprocess.run(
        [sys.executable, "-m", "gpt2_jax.evaluate", *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert completed.returncode == 0, completed.stderr
    record = json.loads(completed.stdout)
    assert record["tokens"] == result["tokens"]
    # The batch size only regroups the windows' float32 sums (each window's own is the same program): one rounding
    # of the total per window, and an ulp of the total over the token count is at most 2 ulps of the mean.
    assert record["loss"] == pytest.approx(result["loss"], abs=ulps(result["loss"], 2 * result["windows"]))
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-9)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--model", str(FIXTURE / "hf")], 1, r"ids up to \d+ but .* has only 1000 tokens; put the model's own"),
        (["--model", "scratch:tiny", "--batch_size", "0"], 2, "--batch_size must be positive"),
        (["--model", "no/such/model"], 1, "No model at no/such/model"),
        # --data is checked before the model is read
        (["--model", "no/such/model", "--data", "no/such/data.txt"], 1, "Dataset path no/such/data.txt does not exist"),
        (
            ["--model", "scratch:tiny", "--data", str(REPO / "pyproject.toml")],
            1,
            r"pyproject.toml has an extension this",
        ),
    ],
)
def test_bad_input_is_one_sentence(text_file, capsys, args, code, message):
    with pytest.raises(SystemExit) as info:
        run_cli(evaluate.main, args if "--data" in args else [*args, "--data", str(text_file)])
    assert info.value.code == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
