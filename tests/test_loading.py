"""`load_model` on every layout users have on disk, against logits computed by Hugging Face's PyTorch GPT-2.

OpenAI layouts come from the fixture (written by real TensorFlow) and from our TF-bundle writer (a gpt-2-simple run
directory with Adam slots); Hugging Face layouts from transformers' own `save_pretrained` on random weights.
"""

from __future__ import annotations

import functools
import gc
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from reference import hf_logits
from safetensors.numpy import save_file

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError
from gpt2_jax.io import atomic_directory
from gpt2_jax.model.transformer import GPT2
from gpt2_jax.tokenizers.gpt2_bpe import PACKAGED_GPT2_DIR
from gpt2_jax.weights.loading import default_compute_dtype, detect_format, load_model
from gpt2_jax.weights.native import save_native_model, write_model_json
from gpt2_jax.weights.openai import params_to_tf_tensors
from gpt2_jax.weights.tf_bundle import write_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny"
REFERENCE = np.load(FIXTURE / "reference_logits.npz")
ATOL = 1e-4


@functools.partial(jax.jit, static_argnums=0)
def _forward(config: GPT2Config, params, tokens_BT):
    return GPT2(config).apply({"params": params}, tokens_BT)


def logits(model, tokens_BT) -> np.ndarray:
    return np.asarray(_forward(model.config, model.params, np.asarray(tokens_BT, np.int32)))


def assert_matches_reference(model) -> None:
    np.testing.assert_allclose(logits(model, REFERENCE["tokens"]), REFERENCE["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "spec",
    ["openai", "openai/model.ckpt", "openai/model.ckpt.index", "hf", "hf/model.safetensors"],
)
def test_fixture_layouts_match_pytorch_reference(spec):
    model = load_model(FIXTURE / spec, dtype="float32")
    assert model.config.to_hparams() == {"n_vocab": 1000, "n_ctx": 64, "n_embd": 64, "n_head": 4, "n_layer": 2}
    assert_matches_reference(model)
    assert model.tokenizer.n_vocab == 50257  # no vocab files in the fixture: GPT-2's packaged tokenizer


def test_gpt2_simple_run_dir_ignores_optimizer_state_and_says_so(tmp_path, capsys):
    reference = load_model(FIXTURE / "openai", dtype="float32")
    tensors = params_to_tf_tensors(reference.params)
    rng = np.random.default_rng(0)
    for name in list(tensors):  # Adam's two slots per variable, as tf.train.AdamOptimizer names them
        tensors[f"{name}/Adam"] = rng.standard_normal(tensors[name].shape).astype(np.float32)
        tensors[f"{name}/Adam_1"] = rng.random(tensors[name].shape).astype(np.float32)
    tensors.update(
        beta1_power=np.array(0.9**1000, np.float32),
        beta2_power=np.array(0.999**1000, np.float32),
        global_step=np.array(1000, np.int64),
    )
    run = tmp_path / "checkpoint" / "run1"
    run.mkdir(parents=True)
    write_checkpoint(run / "model-1000", tensors)
    (run / "model-1000.meta").write_bytes(b"graph we never read")
    (run / "checkpoint").write_text(
        'model_checkpoint_path: "/content/checkpoint/run1/model-1000"\n'  # written on Colab
        'all_model_checkpoint_paths: "/content/checkpoint/run1/model-1000"\n'
    )
    (run / "counter").write_text("1001")
    shutil.copy(FIXTURE / "openai" / "hparams.json", run)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(PACKAGED_GPT2_DIR / name, run)

    model = load_model(run, dtype="float32")
    assert_matches_reference(model)
    assert len(model.ignored) == 2 * 28 + 3
    note = capsys.readouterr().err.strip()
    assert note.count("\n") == 0 and "ignored 59 non-model tensors (56 Adam optimizer slots; beta1_power" in note
    assert "model-1000" in model.source


def _hf_reference_model(vocab: int = 300) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=3, n_head=4)
    config.bos_token_id = config.eos_token_id = None
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2 initialises biases and gains to 0 and 1: randomise them so they are tested too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["save_pretrained", "sharded"])
def test_save_pretrained_layouts_match_their_pytorch_model(tmp_path, shard):
    hf_model = _hf_reference_model()
    hf_model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    model = load_model(tmp_path, dtype="float32")
    tokens = np.random.default_rng(0).integers(0, 300, (2, 17))
    np.testing.assert_allclose(logits(model, tokens), hf_logits(hf_model, tokens), atol=ATOL, rtol=0)
    if shard:
        assert load_model(tmp_path / "model.safetensors.index.json").config == model.config.replace(dtype="float32")


def test_prefixed_state_dict_with_tied_head_and_a_pickle_beside_it(tmp_path):
    hf_model = _hf_reference_model()
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # older save_pretrained wrote the tied head too
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")  # the hub ships both: safetensors wins
    tokens = np.random.default_rng(1).integers(0, 300, (1, 32))
    np.testing.assert_allclose(logits(load_model(tmp_path), tokens), hf_logits(hf_model, tokens), atol=ATOL, rtol=0)

    state["lm_head.weight"] = state["lm_head.weight"] + 1  # an untied head is a different model: refused
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lm_head\.weight different from wte\.weight"):
        load_model(tmp_path)


# orbax leaves an asyncio callback behind when a restore fails; it is collected after its event loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_native_model_and_training_run_directories(tmp_path, capsys):
    reference = load_model(FIXTURE / "hf", dtype="float32")
    with atomic_directory(tmp_path / "native") as tmp:
        save_native_model(tmp, reference.params, reference.config, reference.tokenizer)
    assert detect_format(tmp_path / "native") == "native"
    assert_matches_reference(load_model(tmp_path / "native", dtype="float32"))

    # A training run: gpt2_jax.json + checkpoints/<step>/params; the newest finalised step is loaded.
    run = tmp_path / "run"
    run.mkdir()
    write_model_json(run, reference.config, training={"steps": 20})
    options = ocp.CheckpointManagerOptions(max_to_keep=5)
    older = jax.tree.map(lambda x: x * 0.5, reference.params)
    with ocp.CheckpointManager(run / "checkpoints", options=options, item_names=("params",)) as manager:
        for step, params in ((10, older), (20, reference.params)):
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    (run / "checkpoints" / "30.orbax-checkpoint-tmp-1234").mkdir()  # a save killed half-way: never loaded
    model = load_model(run, dtype="float32")
    assert model.source == f"training run {run} at step 20" and (model.directory, model.step) == (run, 20)
    assert_matches_reference(model)
    step10 = load_model(run / "checkpoints" / "10", dtype="float32")
    np.testing.assert_array_equal(step10.params["wte"], older["wte"])

    # A damaged newest checkpoint: named in a note, and the previous one is loaded instead.
    for data in (run / "checkpoints" / "20" / "params").rglob("*"):
        if data.is_file() and data.stat().st_size > 100_000:
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    capsys.readouterr()
    assert load_model(run).source == f"training run {run} at step 10"
    assert "skipping checkpoint" in capsys.readouterr().err
    _expect_one_sentence(run / "checkpoints" / "20", "is damaged")
    gc.collect()  # collect orbax's leftover callback here, where its warning is filtered


def test_a_bare_shape_name_is_refused_with_the_scratch_name_to_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny", "mini"):
        with pytest.raises(UserError, match=rf"^{name} is a model shape, not trained weights; name it scratch:{name}"):
            load_model(name)
    with pytest.raises(UserError, match=r"Unknown model shape 'scratch:huge'.*scratch:tiny"):
        load_model("scratch:huge")


def test_a_release_name_reads_its_weights_from_models(tmp_path, monkeypatch):
    """gpt2 is OpenAI's 124M wherever it lies here: models/124M (OpenAI's files) or models/gpt2 (the Hub's)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"gpt2 names OpenAI's released GPT-2 124M.*download 124M"):
        load_model("gpt2")
    shutil.copytree(FIXTURE / "hf", tmp_path / "models" / "gpt2")  # a stand-in: any model of the right layout
    for name in ("gpt2", "124M", "117M"):
        assert load_model(name).source.endswith(str(Path("models") / "gpt2"))


def test_preset_gives_random_weights_and_the_gpt2_tokenizer():
    model = load_model("scratch:tiny", seed=3, dtype="bfloat16")
    assert model.source == "tiny with random weights (seed 3)" and model.tokenizer.n_vocab == 50257
    assert model.config.dtype == "bfloat16" and model.params["wte"].dtype == np.float32
    assert model.params["wte"].shape == (50257, 64) and 0.015 < float(np.std(model.params["wte"])) < 0.025
    assert default_compute_dtype() == "float32"  # on this CPU


def _expect_one_sentence(path, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_bad_inputs_are_one_clear_sentence(tmp_path):
    _expect_one_sentence(tmp_path / "nope", "no such file or directory, and not a released GPT-2's name")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    _expect_one_sentence(tmp_path / "junk", "holds no model this loader knows")
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    _expect_one_sentence(tmp_path / "pt", "pickled PyTorch file.*model.safetensors")
    _expect_one_sentence(tmp_path / "pt" / "pytorch_model.bin", "could run arbitrary code")

    wrong = tmp_path / "wrong"
    shutil.copytree(FIXTURE / "openai", wrong)
    hparams = json.loads((wrong / "hparams.json").read_text())
    for change, match in [
        ({"n_ctx": 32}, r"model/wpe has shape \[64, 64\] but hparams .* need \[32, 64\]"),
        ({"n_layer": 3}, "has no tensor model/h2/ln_1/g"),
        ({"n_layer": 1}, "holds model/h1/attn/c_attn/b, a layer beyond hparams' n_layer=1"),
        ({"n_head": 5}, "n_embd=64 not divisible by n_head=5"),
    ]:
        (wrong / "hparams.json").write_text(json.dumps({**hparams, **change}))
        _expect_one_sentence(wrong, match)
    (wrong / "hparams.json").unlink()
    _expect_one_sentence(wrong, "has no hparams.json and its shapes .* match no released GPT-2")

    data = FIXTURE / "hf" / "model.safetensors"
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data.read_bytes()[:-1000])
    shutil.copy(FIXTURE / "hf" / "config.json", tmp_path / "cut")
    _expect_one_sentence(tmp_path / "cut", "not a readable safetensors file")
    (tmp_path / "cut" / "config.json").write_text(json.dumps(GPT2Config(n_vocab=1000, n_layer=2).to_hf_config()))
    shutil.copy(data, tmp_path / "cut")
    _expect_one_sentence(tmp_path / "cut", "wte.weight has shape .* but the config needs")
