"""`python -m gpt2_jax.evaluate`: the same loss as Hugging Face's PyTorch GPT-2 computes with the same windowing."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import hf_model_from_params

from gpt2_jax import evaluate
from gpt2_jax.cli import run_cli
from gpt2_jax.config import get_config
from gpt2_jax.errors import UserError
from gpt2_jax.model.transformer import init_params
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer
from gpt2_jax.weights.native import atomic_directory, save_native_model

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
def result(text_file, params) -> dict:
    tokens = evaluate.token_stream([text_file], gpt2_tokenizer())
    return evaluate.evaluate(params, CONFIG, tokens, batch_size=5, progress=False)  # the last batch is padded


def test_loss_equals_pytorch_reference_with_identical_windowing(text_file, params, result):
    tokens = evaluate.token_stream([text_file], gpt2_tokenizer())
    assert len(tokens) % CONFIG.n_ctx > 1 and len(tokens) > 5 * CONFIG.n_ctx  # short last window, padded batch
    loss, count = pytorch_loss(params, tokens)
    n_windows = -(-len(tokens) // CONFIG.n_ctx)
    assert result["tokens"] == count == len(tokens) - n_windows and result["windows"] == n_windows
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_folder_is_read_in_sorted_path_order_joined_by_end_of_text(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second document")
    (tmp_path / "a.md").write_text("first one")
    (tmp_path / ".hidden.txt").write_text("never read")
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01")
    tokenizer = gpt2_tokenizer()
    files = evaluate.text_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.md", "b/2.txt"]
    expected = tokenizer.encode("first one") + [50256] + tokenizer.encode("second document")
    assert evaluate.token_stream(files, tokenizer).tolist() == expected


def test_invalid_utf8_is_replaced_and_counted_and_empty_data_is_refused(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    tokens = evaluate.token_stream([tmp_path / "latin1.txt"], gpt2_tokenizer())
    assert gpt2_tokenizer().decode(tokens.tolist()) == "caf\ufffd cr\ufffdme"
    assert "replaced 2 invalid UTF-8 sequences" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    empty = evaluate.token_stream([tmp_path / "empty.txt"], gpt2_tokenizer())
    with pytest.raises(UserError, match="fewer than 2 tokens"):
        evaluate.evaluate({}, CONFIG, empty, progress=False)
    (tmp_path / "no_text").mkdir()
    with pytest.raises(UserError, match=r"holds no \.txt or \.md files"):
        evaluate.text_files(tmp_path / "no_text")


def test_command_prints_json_with_the_same_numbers(text_file, params, result, tmp_path):
    with atomic_directory(tmp_path / "model") as tmp:
        save_native_model(tmp, params, CONFIG, gpt2_tokenizer())
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = ["--model", str(tmp_path / "model"), "--data", str(text_file), "--json", "--batch_size", "3"]
    completed = subprocess.run(
        [sys.executable, "-m", "gpt2_jax.evaluate", *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert completed.returncode == 0, completed.stderr
    record = json.loads(completed.stdout)
    assert record["tokens"] == result["tokens"]
    assert record["loss"] == pytest.approx(result["loss"], rel=1e-6)  # batch size does not change the number
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-9)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--model", str(FIXTURE / "hf")], 1, r"ids up to \d+ but .* has only 1000 tokens; put the model's own"),
        (["--model", "tiny", "--batch_size", "0"], 2, "--batch_size must be positive"),
        (["--model", "no/such/model"], 1, "No model at no/such/model"),
    ],
)
def test_bad_input_is_one_sentence(text_file, capsys, args, code, message):
    with pytest.raises(SystemExit) as info:
        run_cli(evaluate.main, [*args, "--data", str(text_file)])
    assert info.value.code == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
