"""GPT2Config: presets and their names, exact parameter counts, hashability, validation, hparams/config.json files."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from gpt2_jax.config import PRESETS, GPT2Config, get_config
from gpt2_jax.errors import UserError
from gpt2_jax.model.params import count_params
from gpt2_jax.model.transformer import abstract_params

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny"

# The sizes OpenAI and Hugging Face publish for the four released models (tied head).
PUBLISHED = {"124M": 124_439_808, "355M": 354_823_168, "774M": 774_030_080, "1558M": 1_557_611_200}


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("124M", "124M"),
        ("117M", "124M"),
        ("gpt2", "124M"),
        ("355M", "355M"),
        ("345M", "355M"),
        ("gpt2-medium", "355M"),
        ("774M", "774M"),
        ("gpt2-large", "774M"),
        ("1558M", "1558M"),
        ("gpt2-xl", "1558M"),
        ("tiny", "tiny"),
        ("mini", "mini"),
    ],
)
def test_preset_names_and_aliases(alias: str, canonical: str) -> None:
    assert get_config(alias) == PRESETS[canonical]


def test_released_shapes() -> None:
    shapes = {name: (c.n_embd, c.n_head, c.n_layer, c.n_ctx, c.n_vocab) for name, c in PRESETS.items()}
    assert shapes["124M"] == (768, 12, 12, 1024, 50257)
    assert shapes["355M"] == (1024, 16, 24, 1024, 50257)
    assert shapes["774M"] == (1280, 20, 36, 1024, 50257)
    assert shapes["1558M"] == (1600, 25, 48, 1024, 50257)
    for config in PRESETS.values():
        assert config.layer_norm_epsilon == 1e-5
        assert config.dtype == "float32"


def test_get_config_overrides_and_unknown_name() -> None:
    assert get_config("gpt2", dtype="bfloat16") == PRESETS["124M"].replace(dtype="bfloat16")
    with pytest.raises(UserError, match=r"Unknown model preset 'gpt3'.*124M"):
        get_config("gpt3")


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_count_params_matches_published(name: str) -> None:
    # A sum over the parameter table, whose shapes tests/test_params.py holds equal to the Flax module's init.
    assert count_params(get_config(name)) == PUBLISHED[name]


def test_compute_dtype_does_not_change_params() -> None:
    fp32 = abstract_params(get_config("tiny"))
    bf16 = abstract_params(get_config("tiny", dtype="bfloat16", remat=True, scan_unroll=2))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), fp32) == jax.tree.map(lambda a: (a.shape, a.dtype), bf16)


def test_config_is_hashable_and_a_static_jit_argument() -> None:
    a, b = get_config("tiny"), GPT2Config(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2)
    assert a == b and hash(a) == hash(b) and a is not b
    assert a != a.replace(dtype="bfloat16") and hash(a) != hash(a.replace(n_layer=3))
    with pytest.raises(AttributeError):
        a.n_layer = 3  # type: ignore[misc]

    traces = []

    def width(config: GPT2Config, x: jax.Array) -> jax.Array:
        traces.append(config)
        return x * config.n_embd

    width_jit = jax.jit(width, static_argnums=0)
    assert float(width_jit(a, jnp.float32(2.0))) == 128.0
    assert float(width_jit(b, jnp.float32(3.0))) == 192.0  # an equal config reuses the compiled function
    assert len(traces) == 1
    assert float(width_jit(a.replace(n_embd=32, n_head=2), jnp.float32(1.0))) == 32.0
    assert len(traces) == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_embd": 64, "n_head": 5}, r"n_embd=64 not divisible by n_head=5"),
        ({"n_ctx": 0}, r"n_ctx=0 must be a positive integer"),
        ({"n_ctx": -8}, r"n_ctx=-8 must be a positive integer"),
        ({"n_layer": 2.0}, r"n_layer=2\.0 must be a positive integer"),
        ({"n_vocab": True}, r"n_vocab=True must be a positive integer"),
        ({"dtype": "float8"}, r"Unknown compute dtype 'float8'; choose one of float32, bfloat16, float16"),
        ({"attention": "flash"}, r"Unknown attention implementation 'flash'"),
        ({"layer_norm_epsilon": 0.0}, r"layer_norm_epsilon must be positive"),
        ({"scan_unroll": 0}, r"scan_unroll must be at least 1"),
    ],
)
def test_invalid_configs_raise_user_error(changes: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        get_config("tiny", **changes)
    assert info.value.exit_code == 1
    assert "\n" not in str(info.value)  # one sentence, no traceback-like dump


def test_hparams_json_round_trip(tmp_path: Path) -> None:
    config = get_config("355M")
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps(config.to_hparams()), encoding="utf-8")
    assert json.loads(path.read_text()) == {
        "n_vocab": 50257,
        "n_ctx": 1024,
        "n_embd": 1024,
        "n_head": 16,
        "n_layer": 24,
    }
    assert GPT2Config.from_hparams_file(path) == config
    assert GPT2Config.from_hparams_file(path, dtype="bfloat16") == config.replace(dtype="bfloat16")


def test_hparams_json_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="No hparams file at"):
        GPT2Config.from_hparams_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{n_vocab: ", encoding="utf-8")
    with pytest.raises(UserError, match="is not valid JSON"):
        GPT2Config.from_hparams_file(tmp_path / "broken.json")
    with pytest.raises(UserError, match="hparams are missing n_layer"):
        GPT2Config.from_hparams({"n_vocab": 10, "n_ctx": 8, "n_embd": 8, "n_head": 2})


def test_hf_config_round_trip_through_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    for name in ("124M", "1558M", "tiny"):
        config = get_config(name)
        assert GPT2Config.from_hf_config(config.to_hf_config()) == config
        hf = transformers.GPT2Config(**config.to_hf_config())
        assert GPT2Config.from_hf_config(hf.to_dict()) == config
        assert (hf.vocab_size, hf.n_positions, hf.n_embd, hf.n_head, hf.n_layer) == (
            config.n_vocab,
            config.n_ctx,
            config.n_embd,
            config.n_head,
            config.n_layer,
        )


def test_fixture_config_files_agree() -> None:
    openai = GPT2Config.from_hparams_file(FIXTURE / "openai" / "hparams.json")
    hf = GPT2Config.from_hf_config(json.loads((FIXTURE / "hf" / "config.json").read_text(encoding="utf-8")))
    assert openai == hf == GPT2Config(n_vocab=1000, n_ctx=64, n_embd=64, n_head=4, n_layer=2)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "llama"}, "not GPT-2"),
        ({"activation_function": "relu"}, "only GPT-2's tanh-approximated GELU"),
        ({"n_inner": 100}, "n_inner"),
        ({"scale_attn_weights": False}, "attention scaling"),
        ({"scale_attn_by_inverse_layer_idx": True}, "attention scaling"),
    ],
)
def test_hf_config_refuses_other_architectures(changes: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        GPT2Config.from_hf_config({**get_config("tiny").to_hf_config(), **changes})
