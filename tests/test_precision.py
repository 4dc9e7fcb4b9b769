"""The default compute dtype follows the hardware (gpt2_jax/precision.py), and train, sample, serve and evaluate all
take it: stand-in devices describe each kind of chip by what `jax.Device` tells (platform, device_kind, and on CUDA
compute_capability), so the rule is tested here on a CPU."""

from __future__ import annotations

import types

import jax
import pytest

from gpt2_jax import precision, sample, serve
from gpt2_jax.config import get_config
from gpt2_jax.model import ops
from gpt2_jax.precision import choose_compute_dtype, dtype_note, resolve_compute_dtype
from gpt2_jax.weights import loading


def device(platform: str, kind: str, capability: str | None = None) -> types.SimpleNamespace:
    fields = {"platform": platform, "device_kind": kind}
    if capability is not None:  # only CUDA devices have the attribute
        fields["compute_capability"] = capability
    return types.SimpleNamespace(**fields)


T4 = device("gpu", "Tesla T4", "7.5")
CHOICES = [
    (T4, "float16"),
    (device("gpu", "Tesla V100-SXM2-16GB", "7.0"), "float16"),
    (device("gpu", "Tesla V100-PCIE-32GB", "7.0"), "float16"),
    (device("gpu", "NVIDIA A100-SXM4-40GB", "8.0"), "bfloat16"),
    (device("gpu", "NVIDIA A10G", "8.6"), "bfloat16"),
    (device("gpu", "NVIDIA L4", "8.9"), "bfloat16"),
    (device("gpu", "NVIDIA H100 80GB HBM3", "9.0"), "bfloat16"),
    (device("gpu", "NVIDIA B200", "10.0"), "bfloat16"),  # "10.0" > "8.0" as numbers, not as strings
    (device("gpu", "Tesla P100-PCIE-16GB", "6.0"), "float32"),
    (device("gpu", "AMD Instinct MI250X"), "bfloat16"),  # ROCm: no CUDA compute capability
    (device("tpu", "TPU v2"), "bfloat16"),
    (device("tpu", "TPU v3"), "bfloat16"),
    (device("tpu", "TPU v5 lite"), "bfloat16"),
    (device("cpu", "cpu"), "float32"),
]


@pytest.mark.parametrize(("stand_in", "dtype"), CHOICES, ids=[d.device_kind for d, _ in CHOICES])
def test_the_default_dtype_follows_the_hardware(stand_in, dtype):
    choice = precision.default_dtype_choice(stand_in)
    assert choice.dtype == dtype
    assert choice.reason.startswith("the default on")


def test_the_reason_names_the_card_and_why():
    assert choose_compute_dtype("gpu", "Tesla T4", "7.5") == (
        "float16",
        "the default on Tesla T4, compute capability 7.5: tensor cores for float16, none for bfloat16; dynamic loss "
        "scaling",
    )
    assert choose_compute_dtype("tpu", "TPU v3").reason == "the default on TPU v3: its matrix units take bfloat16"


def test_bfloat16_on_a_card_without_its_units_gets_one_note(capsys):
    assert resolve_compute_dtype("bfloat16", T4) == ("bfloat16", "--dtype")  # --dtype still decides
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: Tesla T4 has no bfloat16 tensor cores")
    assert "float16 (the default there) is faster" in err
    for asked, stand_in in (("bfloat16", CHOICES[3][0]), ("float16", T4), ("bfloat16", device("tpu", "TPU v3"))):
        assert dtype_note(asked, stand_in) is None
        resolve_compute_dtype(asked, stand_in)
    assert capsys.readouterr().err == ""


def test_load_model_sample_and_serve_take_the_devices_rule(monkeypatch, capsys):
    """On a T4 (stood in for), a model loads for float16 compute, which the sampler's weights then use."""
    monkeypatch.setattr(precision, "first_device", lambda: T4)
    assert loading.default_compute_dtype() == "float16"
    assert loading.load_model("scratch:tiny").config.dtype == "float16"
    sampler = sample.load_sampler("scratch:tiny", None)
    assert sampler.config.dtype == "float16"
    texts = sampler.generate(["Hello"], nsamples=1, length=3, seed=0)  # float16 decoding runs (slowly) on the CPU
    assert len(texts[0]) == 1
    assert sample.load_sampler("scratch:tiny", "float32").config.dtype == "float32"
    assert capsys.readouterr().err == ""


def test_cudnn_flash_attention_only_where_cudnn_has_it(monkeypatch):
    """cuDNN's fused attention needs compute capability 8.0: a T4 or V100 training in float16 runs XLA's attention
    (asking cuDNN there fails to compile), an A100 cuDNN's; a CPU XLA's."""
    config = get_config("tiny", dtype="float16")
    assert ops.attention_implementation(config) == "xla"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for stand_in, expected in ((T4, "xla"), (CHOICES[1][0], "xla"), (CHOICES[3][0], "cudnn"), (CHOICES[9][0], "xla")):
        monkeypatch.setattr(jax, "devices", lambda *_, d=stand_in: [d])
        assert ops.attention_implementation(config) == expected, stand_in.device_kind
    assert ops.attention_implementation(config.replace(dtype="float32")) == "xla"


def test_help_names_the_rule():
    for parser in (sample.build_parser(), serve.build_parser()):
        assert "float16 on older ones (T4, V100)" in " ".join(parser.format_help().split())
