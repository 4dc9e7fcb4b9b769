"""`python -m gpt2_jax.convert`: outputs that transformers and TensorFlow's layout accept, exact round trips, and
bad inputs answered with one sentence. Most runs call `main` in-process (a subprocess pays the JAX import);
two run the real command to show what a user sees."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from gpt2_jax import convert
from gpt2_jax.cli import run_cli
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.weights.loading import load_model

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny"
REFERENCE = np.load(FIXTURE / "reference_logits.npz")
REPO = Path(__file__).parent.parent


def run_command(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "gpt2_jax.convert", *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO
    )


def test_convert_to_hf_loads_in_transformers_with_the_same_logits(tmp_path):
    out = tmp_path / "hf"
    result = run_command(FIXTURE / "openai", out, "--to", "hf")
    assert result.returncode == 0, result.stderr
    assert "converted 168,192 parameters" in result.stdout
    # GPT-2's vocabulary with a 1000-id model: no end-of-text id inside it, so none is named (transformers 5 keys).
    assert "end-of-text id 50256, so the export names no end-of-text token" in result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    assert config["dtype"] == "float32" and "torch_dtype" not in config
    assert "bos_token_id" not in json.loads((out / "generation_config.json").read_text())
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(REFERENCE["tokens"].astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(logits, REFERENCE["logits"], atol=1e-4, rtol=0)
    assert (out / "vocab.json").read_bytes() == (out / "encoder.json").read_bytes()  # HF tokenizer names too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left beside it


def _leaves(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_round_trip_openai_native_hf_native_openai_is_bit_identical(tmp_path):
    original = load_model(FIXTURE / "openai").params
    steps = [(FIXTURE / "openai", "native"), (tmp_path / "native", "hf"), (tmp_path / "hf", "native")]
    for src, to in steps:
        out = tmp_path / ("native2" if src == tmp_path / "hf" else to)
        assert convert.main([str(src), str(out), "--to", to]) == 0
        params = load_model(out).params
        assert jax.tree.structure(params) == jax.tree.structure(original)
        for got, want in zip(_leaves(params), _leaves(original), strict=True):
            assert got.dtype == np.float32 and np.array_equal(got, want)
    # ... and back to OpenAI's layout: byte for byte what TensorFlow wrote.
    assert convert.main([str(tmp_path / "native2"), str(tmp_path / "tf"), "--to", "openai"]) == 0
    for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        assert (tmp_path / "tf" / name).read_bytes() == (FIXTURE / "openai" / name).read_bytes()
    assert json.loads((tmp_path / "tf" / "hparams.json").read_text()) == json.loads(
        (FIXTURE / "openai" / "hparams.json").read_text()
    )


def test_bfloat16_hf_export_rounds_each_weight_once(tmp_path):
    assert convert.main([str(FIXTURE / "hf"), str(tmp_path / "bf16"), "--to", "hf", "--dtype", "bfloat16"]) == 0
    size = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    assert size < 0.55 * (FIXTURE / "hf" / "model.safetensors").stat().st_size
    rounded = load_model(tmp_path / "bf16").params
    for got, want in zip(_leaves(rounded), _leaves(load_model(FIXTURE / "hf").params), strict=True):
        np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_existing_output_is_refused_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"exists and is not empty.*--force"):
        convert.main([str(FIXTURE / "hf"), str(out)])
    assert (out / "keep.txt").read_text() == "mine"
    assert convert.main([str(FIXTURE / "hf"), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "gpt2_jax.json").is_file()
    with pytest.raises(UsageError, match="--dtype bfloat16 applies to --to hf only"):
        convert.main([str(FIXTURE / "hf"), str(tmp_path / "x"), "--dtype", "bfloat16"])
    with pytest.raises(UsageError, match="would replace the source"):  # --force must never delete the source
        convert.main([str(out), str(tmp_path), "--force"])


def _bad_sources(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (source path, expected message fragment), one per bad input the issue lists."""
    truncated = tmp_path / "truncated"
    shutil.copytree(FIXTURE / "openai", truncated)
    data = truncated / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100_000])
    wrong = tmp_path / "wrong_shapes"
    shutil.copytree(FIXTURE / "hf", wrong)
    (wrong / "config.json").write_text(json.dumps({**json.loads((wrong / "config.json").read_text()), "n_embd": 32}))
    unknown = tmp_path / "unknown.npz"
    unknown.write_bytes(b"PK\x03\x04")
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    return {
        "missing": (tmp_path / "missing", "No model at .*missing: no such file or directory"),
        "truncated": (truncated, r"is truncated \(100,000 bytes, the index needs 672,768\)"),
        "wrong_shapes": (wrong, r"wte\.weight has shape \(1000, 64\) but the config needs \(1000, 32\)"),
        "unknown": (unknown, "is not a model file this loader knows"),
        "pickle": (pickle, "pickled PyTorch file, which could run arbitrary code"),
    }


def test_bad_inputs_exit_nonzero_with_one_sentence(tmp_path, capsys):
    for name, (src, match) in _bad_sources(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            run_cli(convert.main, [str(src), str(tmp_path / f"out_{name}")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 1, name
        assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), name
        assert re.search(match, err[-1]), (name, err[-1])
        assert not (tmp_path / f"out_{name}").exists()
    assert not list(tmp_path.glob(".out_*"))  # temporary output directories removed


def test_real_command_on_a_pickle_prints_one_line_and_no_traceback(tmp_path):
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"\x80\x02}q\x00.")
    result = run_command(pickle, tmp_path / "out")
    assert result.returncode == 1 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert len(lines) == 1 and "model.safetensors" in lines[0]
