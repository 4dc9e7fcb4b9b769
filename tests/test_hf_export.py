"""`convert --to hf` gives a complete transformers model: `pipeline("text-generation")` decodes greedily the tokens
our Sampler does, AutoTokenizer gives our ids (GPT-2's BPE and a SentencePiece vocabulary), generation_config.json
holds sample.py's defaults and the model card's metadata says what the run knows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers
from huggingface_hub import ModelCard

from gpt2_jax import convert
from gpt2_jax.config import get_config
from gpt2_jax.model.transformer import init_params
from gpt2_jax.sampling.processors import SamplingConfig
from gpt2_jax.sampling.sampler import Sampler
from gpt2_jax.tokenizers.sentencepiece import ROUND_TRIP_PROBE, SP_META, train_sentencepiece
from gpt2_jax.weights.loading import load_model
from gpt2_jax.weights.native import save_native_model, write_model_json

TRICKY = "Hello world,  it's\tme!\n\n  ünïcödé 😀 <|endoftext|> done "


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The `tiny` preset (random weights, seed 0) exported as `tiny-gpt2`."""
    out = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    assert convert.main(["scratch:tiny", str(out), "--to", "hf"]) == 0
    return out


def test_pipeline_greedy_tokens_equal_the_samplers(exported):
    model = load_model("scratch:tiny")  # the same weights: the preset's seed 0
    prompt = "The meaning of life is"
    ours = next(Sampler.from_model(model).samples(prompt, length=20, sampling=SamplingConfig(temperature=0)))
    assert ours.stop_reason == "length"
    generator = transformers.pipeline("text-generation", model=str(exported), device="cpu")
    out = generator(prompt, max_new_tokens=20, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt_ids = model.tokenizer.encode(prompt)
    assert list(out[: len(prompt_ids)]) == prompt_ids and list(out[len(prompt_ids) :]) == ours.tokens


def test_gpt2_tokenizer_files_give_our_ids(exported):
    ours = load_model(exported).tokenizer
    expected = ours.encode(TRICKY, allow_special=True)  # transformers reads a typed <|endoftext|> as the token
    for fast in (True, False):
        hf = transformers.AutoTokenizer.from_pretrained(exported, use_fast=fast)
        assert hf(TRICKY)["input_ids"] == expected, fast
        assert hf.decode(expected) == TRICKY
        assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id, hf.model_max_length) == (50256, 50256, 50256, 128)
    assert (exported / "vocab.json").read_bytes() == (exported / "encoder.json").read_bytes()
    assert (exported / "merges.txt").read_bytes() == (exported / "vocab.bpe").read_bytes()


def test_config_generation_defaults_and_card(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["dtype"] == "float32" and "torch_dtype" not in config
    assert config["bos_token_id"] == config["eos_token_id"] == 50256
    generation = transformers.GenerationConfig.from_pretrained(exported)
    assert generation.do_sample and (generation.top_k, generation.temperature, generation.top_p) == (40, 1.0, 1.0)
    assert (generation.max_new_tokens, generation.eos_token_id, generation.pad_token_id) == (64, 50256, 50256)
    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None and card.data.eval_results is None  # random weights: nothing to tell
    assert "3,324,736 parameters" in card.text and "tiny with random weights" in card.text


def _fake_run(run: Path, params, config, tokenizer) -> None:
    """A training run directory as train.py leaves it: options, tokenizer, a checkpoint at step 20, metrics."""
    training = {"init": "someone/tiny-base", "dataset": "/home/me/private/my_corpus.txt", "steps": 30}
    run.mkdir()
    write_model_json(run, config, training=training)
    tokenizer.save(run)
    options = ocp.CheckpointManagerOptions(max_to_keep=3)
    with ocp.CheckpointManager(run / "checkpoints", options=options, item_names=("params",)) as manager:
        manager.save(20, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    records = [
        {"step": 10, "loss": 6.0, "tokens": 2560},
        {"step": 10, "val_loss": 5.5, "tokens": 2560},
        {"step": 20, "loss": 5.0, "tokens": 5120},
        {"step": 20, "val_loss": 4.75, "tokens": 5120},
        {"step": 25, "loss": 4.5, "tokens": 6400},  # logged after the checkpoint exported: not this model's
        {"step": 25, "val_loss": 4.25, "tokens": 6400},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_runs_card_names_its_base_model_data_steps_and_validation_loss(tmp_path):
    model = load_model("scratch:tiny")
    _fake_run(tmp_path / "run", model.params, model.config, model.tokenizer)
    assert convert.main([str(tmp_path / "run"), str(tmp_path / "out"), "--to", "hf"]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "someone/tiny-base"
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.task_type) == ("loss", 4.75, "text-generation")
    assert "optimizer steps: 20 (5,120 tokens)" in card.text and "my_corpus.txt" in card.text
    assert "/home/me" not in card.content  # only the data's name is published


def test_sentencepiece_export_loads_in_transformers_with_our_ids(tmp_path, corpus):
    text = corpus.read_text(encoding="utf-8")
    tokenizer = train_sentencepiece(text[:30_000], 1000, tmp_path / "vocab")
    config = get_config("tiny", n_vocab=tokenizer.n_vocab)
    save_native_model(tmp_path / "model", init_params(config, 0), config, tokenizer)
    assert convert.main([str(tmp_path / "model"), str(tmp_path / "hf"), "--to", "hf"]) == 0

    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    # Held-out text, and the round-trip probe less its literal U+2581 (SentencePiece's space mark to transformers).
    for sample in (text[30_000:], ROUND_TRIP_PROBE.replace(SP_META, ""), TRICKY):
        ids = tokenizer.encode(sample, allow_special=True)
        assert hf(sample, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids) == sample
    eot = tokenizer.eot_id
    assert eot < tokenizer.n_vocab and hf.eos_token_id == eot
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["eos_token_id"] == hf_config["bos_token_id"] == eot  # inside the vocabulary, not 50256
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == eot
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == tokenizer.n_vocab
    assert "a 1000-piece SentencePiece vocabulary" in (tmp_path / "hf" / "README.md").read_text()
    np.testing.assert_array_equal(
        model.transformer.wte.weight.detach().numpy(), load_model(tmp_path / "hf").params["wte"]
    )
