"""Dropout: off by default and then no random bits in the step at all; on, it changes the loss deterministically
given the key; never in evaluation. Resuming a run with dropout: tests/test_lora.py (its run has dropout on)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerance import ulps

from gpt2_jax.config import get_config
from gpt2_jax.errors import UsageError
from gpt2_jax.model import ops
from gpt2_jax.model.transformer import Attention, Tuning, init_params
from gpt2_jax.training import step as ts
from gpt2_jax.training.config import resolve
from gpt2_jax.training.mesh import make_mesh
from gpt2_jax.training.optim import learning_rate_schedule, make_optimizer

CONFIG = get_config("tiny")


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, 0)


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(0).integers(0, CONFIG.n_vocab, (4, 17)).astype(np.int32)


def lowered_step(params, batch, tuning: Tuning) -> str:
    schedule = learning_rate_schedule(1e-3, warmup_steps=0, total_steps=10)
    optimizer = make_optimizer(schedule)
    step = ts.build_train_step(CONFIG, optimizer, schedule, make_mesh(jax.devices()[:1]), tuning=tuning)
    return step.lower(ts.create_state(params, optimizer, 0), batch).as_text()


def test_dropout_off_draws_no_random_bits(params, batch):
    """Rate 0 (the default) is today's step: no key is split, no mask drawn."""
    assert "threefry" not in lowered_step(params, batch, Tuning())
    assert "threefry" in lowered_step(params, batch, Tuning(dropout=0.1))


def test_dropout_changes_the_loss_deterministically_and_only_in_training(params, batch):
    plain = np.asarray(ts.token_losses(params, CONFIG, batch))
    train = Tuning(dropout=0.2, train=True)
    key = jax.random.PRNGKey(3)
    dropped = np.asarray(ts.token_losses(params, CONFIG, batch, train, key))
    np.testing.assert_array_equal(dropped, np.asarray(ts.token_losses(params, CONFIG, batch, train, key)))
    assert np.abs(dropped - plain).max() > 1e-3
    other = np.asarray(ts.token_losses(params, CONFIG, batch, train, jax.random.PRNGKey(4)))
    assert np.abs(other - dropped).max() > 1e-3
    # Evaluation (and anything else that leaves `train` off) sees the model without dropout, whatever the rate.
    evaluated = ts.token_losses(params, CONFIG, batch, train._replace(train=False))
    np.testing.assert_array_equal(np.asarray(evaluated), plain)


def test_dropout_flags_are_checked():
    with pytest.raises(UsageError, match="--dropout must be at least 0 and below 1"):
        resolve({"init": "scratch:tiny", "dropout": 1.0})
    with pytest.raises(UsageError, match="--lora_dropout"):
        resolve({"init": "scratch:tiny", "lora_rank": 4, "lora_dropout": -0.1})
    assert resolve({"init": "scratch:tiny", "dropout": 0.1}).dropout == 0.1


def test_attention_dropout_path_is_the_fused_paths_math():
    """With dropout on, attention runs `ops.attention` (the fused kernels have no dropout): with nothing dropped it
    equals `jax.nn.dot_product_attention`'s causal attention."""
    B, T, N, K = 2, 9, 3, 8
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, T, N, K)) for i in range(3))
    fused = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    q_HTK, k_HTK, v_HTK = (a.transpose(0, 2, 1, 3).reshape(B * N, T, K) for a in (q, k, v))
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    explicit = ops.attention(q_HTK, k_HTK, v_HTK, causal, lambda p: p).reshape(B, N, T, K).transpose(0, 2, 1, 3)
    # Two graphs of the same attention: each sums the K products of a score and the T weighted values of an output
    # in its own order (measured: half an ulp apart).
    np.testing.assert_allclose(np.asarray(explicit), np.asarray(fused), rtol=0, atol=ulps(fused, K + T))


def test_attention_probabilities_are_dropped():
    """GPT-2's attn_pdrop: the kept outputs of a block's attention are not just the undropped ones rescaled (which
    residual dropout alone would give); they come from dropped probabilities."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, CONFIG.n_embd))
    plain_module = Attention(CONFIG)
    variables = plain_module.init(jax.random.PRNGKey(1), x)
    plain = np.asarray(plain_module.apply(variables, x))
    rate = 0.5
    dropped = np.asarray(
        Attention(CONFIG, Tuning(dropout=rate, train=True)).apply(variables, x, rngs={"dropout": jax.random.PRNGKey(2)})
    )
    kept = dropped != 0
    assert 0.2 < kept.mean() < 0.8  # residual dropout at work
    assert np.abs(dropped[kept] - plain[kept] / (1 - rate)).max() > 1e-3
