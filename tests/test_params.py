"""The parameter table against the Flax module's init, against real OpenAI and Hugging Face files, and its name maps."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from gpt2_jax.config import PRESETS, GPT2Config
from gpt2_jax.model.params import LINEARS, PARAMS, param_shapes, parse_name, tensor_names
from gpt2_jax.model.transformer import abstract_params
from gpt2_jax.weights.huggingface import strip_layout
from gpt2_jax.weights.loading import read_weights
from gpt2_jax.weights.openai import stored_shapes
from gpt2_jax.weights.tf_bundle import TFCheckpoint

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny"
FIXTURE_CONFIG = GPT2Config(n_vocab=1000, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
# Every size distinct and none a multiple of another, so a swapped axis or a wrong multiple of D cannot match.
ODD = GPT2Config(n_vocab=97, n_ctx=13, n_embd=24, n_head=3, n_layer=5)


@pytest.mark.parametrize("config", [*PRESETS.values(), ODD], ids=[*PRESETS, "odd"])
def test_table_shapes_are_the_flax_init_shapes(config: GPT2Config) -> None:
    """eval_shape traces the real init without allocating, so even 1558M costs nothing."""
    leaves = jax.tree.leaves_with_path(abstract_params(config))
    assert all(leaf.dtype == jnp.float32 for _, leaf in leaves)
    flax_shapes = {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}
    assert param_shapes(config) == flax_shapes
    assert set(LINEARS) == {path[1:3] for path, shape in flax_shapes.items() if path[0] == "h" and len(shape) == 3}


@pytest.mark.parametrize("fmt", ["openai", "hf"])
def test_each_format_names_every_tensor_once_and_names_round_trip(fmt: str) -> None:
    n_layer = 12  # two-digit layer indices: h10 must not parse as h1
    names = tensor_names(fmt, n_layer)
    per_layer = sum(p.per_layer for p in PARAMS)
    assert len(names) == len(PARAMS) - per_layer + per_layer * n_layer
    assert set(names.values()) == {(p, i) for p in PARAMS for i in p.layers(n_layer)}
    for name, (param, layer) in names.items():
        assert parse_name(fmt, name) == (param, layer)
        assert param.name(fmt, layer) == name


def test_names_parse_to_their_paths_and_layers_and_optimizer_state_is_no_weight() -> None:
    def parsed(fmt: str, name: str) -> tuple | None:
        found = parse_name(fmt, name)
        return found and (found[0].path, found[1])

    assert parsed("openai", "model/h11/attn/c_attn/w") == (("h", "attn", "c_attn", "w"), 11)
    assert parsed("openai", "model/ln_f/g") == (("ln_f", "g"), None)
    assert parsed("hf", "h.3.mlp.c_proj.bias") == (("h", "mlp", "c_proj", "b"), 3)
    assert parsed("hf", "wpe.weight") == (("wpe",), None)
    for fmt, name in [
        ("openai", "model/h0/attn/c_attn/w/Adam"),
        ("openai", "model/hx/ln_1/g"),
        ("openai", "global_step"),
        ("hf", "h.0.attn.bias"),
        ("hf", "h.0.attn.masked_bias"),
        ("hf", "lm_head.weight"),
        ("hf", "transformer.wte.weight"),
    ]:
        assert parse_name(fmt, name) is None, name


def test_table_names_and_shapes_are_what_real_files_hold() -> None:
    """TensorFlow wrote the OpenAI fixture; transformers names its own modules' tensors."""
    ckpt = TFCheckpoint(FIXTURE / "openai" / "model.ckpt")
    openai = tensor_names("openai", FIXTURE_CONFIG.n_layer)
    assert set(ckpt.entries) == set(openai)
    for name, (param, _) in openai.items():
        assert ckpt.entries[name].shape in stored_shapes(param, FIXTURE_CONFIG)
    assert ckpt.entries["model/h0/attn/c_attn/w"].shape == (1, 64, 192)  # the conv1d's leading 1

    with safe_open(FIXTURE / "hf" / "model.safetensors", framework="numpy") as f:
        hub = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    with torch.device("meta"):  # shapes only: nothing allocated
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**ODD.to_hf_config()))
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for config, keys in [(FIXTURE_CONFIG, hub), (ODD, state)]:
        weights, _ = strip_layout(keys)
        hf = tensor_names("hf", config.n_layer)
        assert weights == {name: param.tensor_shape(config) for name, (param, _) in hf.items()}


def test_fixture_loads_bit_identical_through_both_formats() -> None:
    """The OpenAI checkpoint and the safetensors file hold the same weights: both readers must give the same params."""
    openai, hf = read_weights(FIXTURE / "openai"), read_weights(FIXTURE / "hf")
    assert openai.config == hf.config == FIXTURE_CONFIG
    assert jax.tree.structure(openai.params) == jax.tree.structure(hf.params)
    for a, b in zip(jax.tree.leaves(openai.params), jax.tree.leaves(hf.params), strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
