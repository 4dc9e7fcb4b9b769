"""The Flax GPT-2 against Hugging Face's PyTorch GPT2LMHeadModel, and against itself under every code path.

Parity: logits at the full 124M shapes and at an odd tiny shape (3 heads of 16) within 1e-4 (fp32), the tiny
safetensors fixture against its stored reference logits, loss and every gradient on the tiny shape. Invariances:
causality (by gradients), scan == unrolled, remat == no remat, jit == eager, 16-bit compute close to fp32 with
fp32 params and logits. Also GPT-2's initialisation. Padded prompts are the cached forward's job: test_decoding.py.
Random weights come from `reference.random_params` (nonzero biases, sharp attention) so no bug hides in a zero.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import hf_logits, hf_loss, hf_loss_and_grads, hf_model_from_params, random_params
from safetensors.numpy import load_file
from tolerance import ulps

from gpt2_jax.config import GPT2Config, get_config
from gpt2_jax.model.ops import attention_implementation
from gpt2_jax.model.transformer import GPT2, abstract_params, init_params
from gpt2_jax.weights.huggingface import params_from_hf_state_dict

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny"
# Deliberately odd: 3 heads of 16, a vocabulary that is no multiple of anything, 3 layers.
ODD = GPT2Config(n_vocab=97, n_ctx=32, n_embd=48, n_head=3, n_layer=3)
PARITY_ATOL = 1e-4  # fp32 logits vs PyTorch (measured: ~4e-6 at 124M, ~3e-6 at ODD)
GRAD_RTOL = 1e-4  # per tensor, of its largest entry


def tokens(config: GPT2Config, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, config.n_vocab, (batch, length)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def forward(config: GPT2Config, params: Any, tokens_BT: Any) -> jax.Array:
    """Jitted logits: one compilation per config and shape, shared by the tests below."""
    return GPT2(config).apply({"params": params}, tokens_BT)


def next_token_loss(config: GPT2Config, params: Any, tokens_BT: Any) -> jax.Array:
    """Mean cross-entropy of predicting token t+1 from tokens <= t (what HF computes with labels=input_ids)."""
    logits_BTV = GPT2(config).apply({"params": params}, tokens_BT)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1).mean()


loss_and_grads = jax.jit(jax.value_and_grad(next_token_loss, argnums=1), static_argnums=0)


@pytest.fixture(scope="module")
def odd_params() -> Any:
    return random_params(ODD, seed=1)


@pytest.fixture(scope="module")
def odd_hf(odd_params: Any) -> Any:
    return hf_model_from_params(odd_params, ODD)


def max_abs_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# Every ODD test uses this one shape (the whole context, so every wpe row is used) to share compilations.
B, T = 2, ODD.n_ctx


# --- Parity with the PyTorch reference -------------------------------------------------------------------------


def test_logits_match_hf_at_124m_shapes() -> None:
    config = get_config("124M")
    params = random_params(config, seed=0)  # stronger than GPT-2's init (see its docstring), and faster to draw
    tokens_BT = tokens(config, 2, 16)
    ours = forward(config, params, tokens_BT)
    assert ours.shape == (2, 16, 50257) and ours.dtype == jnp.float32
    ref = hf_logits(hf_model_from_params(params, config), tokens_BT)
    assert max_abs_diff(ours, ref) <= PARITY_ATOL


def test_logits_match_hf_at_odd_shape(odd_params: Any, odd_hf: Any) -> None:
    tokens_BT = tokens(ODD, B, T)
    ours = forward(ODD, odd_params, tokens_BT)
    assert ours.shape == (B, T, ODD.n_vocab) and ours.dtype == jnp.float32
    assert max_abs_diff(ours, hf_logits(odd_hf, tokens_BT)) <= PARITY_ATOL


def test_logits_match_fixture_reference() -> None:
    config = GPT2Config.from_hf_config(json.loads((FIXTURE / "hf" / "config.json").read_text(encoding="utf-8")))
    params = params_from_hf_state_dict(load_file(FIXTURE / "hf" / "model.safetensors"), config)
    ref = np.load(FIXTURE / "reference_logits.npz")
    ours = forward(config, params, jnp.asarray(ref["tokens"]))
    assert max_abs_diff(ours, ref["logits"]) <= PARITY_ATOL
    # The reference module itself reproduces the stored logits, so every other test's reference is sound.
    assert max_abs_diff(hf_logits(hf_model_from_params(params, config), ref["tokens"]), ref["logits"]) <= 1e-5


def test_loss_and_grads_match_torch_autograd(odd_params: Any, odd_hf: Any) -> None:
    """Every parameter's gradient, including wte's (embedding + tied head summed), equals torch's."""
    tokens_BT = tokens(ODD, B, T, seed=3)
    loss, grads = loss_and_grads(ODD, odd_params, jnp.asarray(tokens_BT))
    ref_loss, ref_grads = hf_loss_and_grads(odd_hf, tokens_BT, ODD)
    # Means of 2 x 31 token losses summed in other orders: by XLA and torch (measured: 3 ulps apart), and by torch
    # with autograd on and off, free to take other kernels.
    assert abs(float(loss) - ref_loss) <= ulps(ref_loss, B * (T - 1))
    assert abs(hf_loss(odd_hf, tokens_BT) - ref_loss) <= ulps(ref_loss, B * (T - 1))
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
    flat_ours = dict(jax.tree_util.tree_leaves_with_path(grads))
    assert flat_ours.keys() == flat_ref.keys()
    for path, ref in flat_ref.items():
        ours = np.asarray(flat_ours[path])
        assert ours.shape == ref.shape, path
        # Relative to the tensor's largest gradient: its small entries carry rounding noise in both frameworks.
        scale = float(np.abs(ref).max())
        assert scale > 0 and max_abs_diff(ours, ref) <= GRAD_RTOL * scale, (jax.tree_util.keystr(path), scale)


def test_init_params_follow_gpt2_initialisation() -> None:
    """Biases 0, gains 1, weights N(0, 0.02) and residual projections N(0, 0.02 / sqrt(2 n_layer)), wpe N(0, 0.01)."""
    params = init_params(ODD, jax.random.PRNGKey(0))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
        lambda a: (a.shape, a.dtype), abstract_params(ODD)
    )
    h = params["h"]
    for norm in (h["ln_1"], h["ln_2"], params["ln_f"]):
        assert np.all(np.asarray(norm["g"]) == 1.0) and np.all(np.asarray(norm["b"]) == 0.0)
    for layer in (h["attn"]["c_attn"], h["attn"]["c_proj"], h["mlp"]["c_fc"], h["mlp"]["c_proj"]):
        assert np.all(np.asarray(layer["b"]) == 0.0)
    stds = {
        "wte": (params["wte"], 0.02),
        "wpe": (params["wpe"], 0.01),
        "c_attn": (h["attn"]["c_attn"]["w"], 0.02),
        "c_fc": (h["mlp"]["c_fc"]["w"], 0.02),
        "attn.c_proj": (h["attn"]["c_proj"]["w"], 0.02 / (2 * ODD.n_layer) ** 0.5),
        "mlp.c_proj": (h["mlp"]["c_proj"]["w"], 0.02 / (2 * ODD.n_layer) ** 0.5),
    }
    for name, (w, std) in stds.items():
        assert abs(float(np.std(w)) / std - 1.0) < 0.1, name  # >= 1,500 draws each: within 10% by far
    # Layers are initialised independently, not copies of one another.
    assert not np.allclose(h["attn"]["c_attn"]["w"][0], h["attn"]["c_attn"]["w"][1])


# --- Causality ---------------------------------------------------------------------------------------------------


def test_output_at_t_depends_only_on_positions_up_to_t(odd_params: Any) -> None:
    """d logits[t] / d wpe[s] is zero for every s > t and nonzero for s <= t (wpe row s only enters position s)."""
    tokens_BT = jnp.asarray(tokens(ODD, 1, T, seed=5))

    def per_position(wpe: jax.Array) -> jax.Array:
        logits_BTV = GPT2(ODD).apply({"params": dict(odd_params, wpe=wpe)}, tokens_BT)
        return jnp.sum(logits_BTV[0] * jnp.linspace(-1.0, 1.0, ODD.n_vocab), axis=-1)  # [T]

    influence_TS = np.abs(np.asarray(jax.jit(jax.jacrev(per_position))(odd_params["wpe"]))).sum(-1)
    future_TS = np.arange(ODD.n_ctx)[None, :] > np.arange(T)[:, None]
    assert np.all(influence_TS[future_TS] == 0.0)
    assert np.all(influence_TS[~future_TS] > 0.0)


def test_output_at_t_unchanged_when_later_tokens_change(odd_params: Any) -> None:
    a = tokens(ODD, B, T, seed=6)
    b = a.copy()
    b[:, 9:] = tokens(ODD, B, T - 9, seed=7)
    la, lb = forward(ODD, odd_params, a), forward(ODD, odd_params, b)
    assert max_abs_diff(la[:, :9], lb[:, :9]) == 0.0
    assert max_abs_diff(la[:, 9:], lb[:, 9:]) > 1e-2


# --- The same function under every code path -------------------------------------------------------------------


def test_scan_equals_unrolled(odd_params: Any) -> None:
    tokens_BT = jnp.asarray(tokens(ODD, B, T, seed=8))
    unrolled = ODD.replace(scan_unroll=ODD.n_layer)
    # Another graph (XLA may fuse across layers): 1e-5 is 21 ulps of the largest logit, about 6 (measured: 0).
    assert max_abs_diff(forward(unrolled, odd_params, tokens_BT), forward(ODD, odd_params, tokens_BT)) <= 1e-5


def test_remat_equals_no_remat(odd_params: Any) -> None:
    tokens_BT = jnp.asarray(tokens(ODD, B, T, seed=3))
    remat = ODD.replace(remat=True)
    # The loss is the forward pass's result: comparing it saves compiling a separate remat forward.
    loss, grads = loss_and_grads(ODD, odd_params, tokens_BT)
    loss_r, grads_r = loss_and_grads(remat, odd_params, tokens_BT)
    # Remat's barriers change how XLA fuses the forward: a mean of 2 x 31 token losses, maybe in another order.
    assert abs(float(loss) - float(loss_r)) <= ulps(float(loss), B * (T - 1))
    diffs = jax.tree.map(max_abs_diff, grads, grads_r)
    assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs


def test_jit_equals_eager(odd_params: Any) -> None:
    tokens_BT = jnp.asarray(tokens(ODD, B, T, seed=9))
    jitted = forward(ODD, odd_params, tokens_BT)
    with jax.disable_jit():
        eager = GPT2(ODD).apply({"params": odd_params}, tokens_BT)
    # Eager runs each op alone where jit fuses: 1e-5 is 21 ulps of the largest logit, about 7 (measured: 6).
    assert max_abs_diff(jitted, eager) <= 1e-5


def test_attention_implementation_choice() -> None:
    if jax.default_backend() == "cpu":  # 'auto' takes the portable XLA path on a CPU, even in bf16
        assert attention_implementation(ODD) == "xla"
        assert attention_implementation(ODD.replace(dtype="bfloat16")) == "xla"
    assert attention_implementation(ODD.replace(attention="cudnn")) == "cudnn"
    assert attention_implementation(ODD.replace(attention="xla", dtype="bfloat16")) == "xla"


# --- Precision ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_params_and_logits_stay_float32_for_16_bit_compute(odd_params: Any, dtype: str) -> None:
    config = ODD.replace(dtype=dtype)
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract_params(config))} == {jnp.dtype(jnp.float32)}
    tokens_BT = jnp.asarray(tokens(config, B, T, seed=11))
    fp32 = np.asarray(forward(ODD, odd_params, tokens_BT))
    low = forward(config, odd_params, tokens_BT)
    assert low.dtype == jnp.float32
    # 8 (bf16) or 11 (fp16) mantissa bits through 3 layers: within 2% of the largest logit, same argmax mostly.
    assert 0.0 < max_abs_diff(low, fp32) <= 2e-2 * float(np.abs(fp32).max())
    assert np.mean(np.asarray(low).argmax(-1) == fp32.argmax(-1)) >= 0.9
