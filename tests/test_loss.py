"""The fused tied-head cross-entropy (`ops.tied_head_losses`, which training and evaluation run through
`training.step.token_losses`) against the plain loss: optax's cross-entropy on `GPT2.apply`'s float32 logits.

float32: the same losses and gradients w.r.t. every param (1e-5 relative). bfloat16: within what rounding the logits
to bf16 explains, derived and measured below. The real training step in bf16: first-step loss within 1e-2 and
gradient norm within 1% of a step built with the plain loss (the issue's acceptance on the GPU). The padded
vocabulary columns of 16-bit compute never take part in the softmax.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import random_params

from gpt2_jax.config import GPT2Config, get_config
from gpt2_jax.model import ops
from gpt2_jax.model.transformer import GPT2, Tuning, init_params
from gpt2_jax.training import step as step_module
from gpt2_jax.training.mesh import make_mesh, shard_batch
from gpt2_jax.training.optim import learning_rate_schedule, make_optimizer

# 97 is no multiple of 128, so 16-bit compute pads the head to 128 columns; 3 heads of 16, 3 layers.
ODD = GPT2Config(n_vocab=97, n_ctx=32, n_embd=48, n_head=3, n_layer=3)


def plain_token_losses(
    params: Any, config: GPT2Config, batch_BT1: jax.Array, tuning: Tuning = Tuning(), rng: jax.Array | None = None
) -> jax.Array:
    """The loss as it was before the fused head: float32 logits from the model, then cross-entropy (plain GPT-2:
    no adapters, no dropout, so `tuning` and `rng`, which the training step passes, must ask for none)."""
    assert tuning.lora is None and not tuning.needs_rng
    logits_BTV = GPT2(config).apply({"params": params}, batch_BT1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch_BT1[:, 1:])


@functools.partial(jax.jit, static_argnums=(0, 1))
def losses_and_grads(loss_fn: Any, config: GPT2Config, params: Any, batch_BT1: jax.Array) -> tuple[jax.Array, Any]:
    """Per-token losses `[B, T]` and the gradient of their mean w.r.t. every param."""

    def mean_loss(params: Any) -> tuple[jax.Array, jax.Array]:
        losses_BT = loss_fn(params, config, batch_BT1)
        return losses_BT.mean(), losses_BT

    (_, losses_BT), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    return losses_BT, grads


@pytest.fixture(scope="module")
def odd_params() -> Any:
    return random_params(ODD, seed=1)  # output logits up to ~7: bf16 rounding shows


@pytest.fixture(scope="module")
def odd_batch() -> jax.Array:
    return jnp.asarray(np.random.RandomState(3).randint(0, ODD.n_vocab, (2, ODD.n_ctx + 1)).astype(np.int32))


def relative_grad_errors(grads: Any, ref: Any) -> dict[str, float]:
    """Per param: the largest difference relative to that gradient's largest entry (small entries carry noise)."""
    return {
        jax.tree_util.keystr(path): float(jnp.abs(g - r).max() / jnp.abs(r).max())
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref), strict=True)
    }


def test_fused_loss_equals_plain_loss_in_float32(odd_params: Any, odd_batch: jax.Array) -> None:
    ref_losses, ref_grads = losses_and_grads(plain_token_losses, ODD, odd_params, odd_batch)
    losses, grads = losses_and_grads(step_module.token_losses, ODD, odd_params, odd_batch)
    assert losses.shape == odd_batch[:, 1:].shape and losses.dtype == jnp.float32
    # Measured: losses identical, gradients within 4e-7.
    assert float(jnp.abs(losses - ref_losses).max()) <= 1e-5 * float(ref_losses.max())
    errors = relative_grad_errors(grads, ref_grads)
    assert max(errors.values()) <= 1e-5, errors


def test_fused_loss_close_to_plain_loss_in_bfloat16(odd_params: Any, odd_batch: jax.Array) -> None:
    """Both run the same bf16 forward to the final hidden state; only the fused loss rounds the logits to bf16.

    Rounding moves each logit by at most half a bf16 ulp at the largest logit (8 significant bits: 2^(e-8) for
    |logit| in [2^e, 2^(e+1))), and a token's loss, lse - target logit, by at most twice that: 0.031 at this
    model's logits of up to 7.3 (measured 0.0092). The softmax each gradient is linear in moves by at most
    exp(0.031) - 1 = 3.2% of each probability; measured 1.3% of a gradient's largest entry at worst (c_proj.b),
    against 2.5% between the plain loss in bf16 and in float32. The mean loss moved by 2.7e-4, the gradient norm by
    0.1%: within the issue's 1e-2 and 1% with 35x and 10x to spare.
    """
    config = ODD.replace(dtype="bfloat16")
    ref_losses, ref_grads = losses_and_grads(plain_token_losses, config, odd_params, odd_batch)
    losses, grads = losses_and_grads(step_module.token_losses, config, odd_params, odd_batch)
    max_logit = float(jnp.abs(GPT2(config).apply({"params": odd_params}, odd_batch[:, :-1])).max())
    loss_bound = 2 * 2.0 ** (math.floor(math.log2(max_logit)) - 8)
    assert 0.0 < float(jnp.abs(losses - ref_losses).max()) <= loss_bound
    assert abs(float(losses.mean() - ref_losses.mean())) <= 1e-2
    errors = relative_grad_errors(grads, ref_grads)
    assert max(errors.values()) <= 0.03, errors
    assert abs(float(optax.tree.norm(grads) / optax.tree.norm(ref_grads)) - 1.0) <= 0.01


def test_bfloat16_train_step_matches_a_step_with_the_plain_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's acceptance, on the CPU: the real jitted step (build_train_step) in bf16, GPT-2's init, the same
    batch; first-step loss within 1e-2 and gradient norm within 1% of the same step with the plain loss.

    The tiny preset keeps GPT-2's vocabulary (50257, padded to 50304). Measured: loss 10.8747 in both (2.6e-5
    apart), gradient norms 0.004% apart.
    """
    config = get_config("tiny", dtype="bfloat16")
    schedule = learning_rate_schedule(1e-4, warmup_steps=0, total_steps=10, schedule="constant")
    optimizer = make_optimizer(schedule)
    mesh = make_mesh(jax.devices()[:1])
    batch_BT1 = np.random.default_rng(0).integers(0, config.n_vocab, (4, 33)).astype(np.int32)
    host_params = jax.tree.map(np.asarray, init_params(config, 0))

    def first_step_metrics() -> dict[str, float]:
        state = step_module.create_state(jax.tree.map(jnp.array, host_params), optimizer, 0)  # a copy: donated
        train_step = step_module.build_train_step(config, optimizer, schedule, mesh)
        _, metrics = train_step(state, shard_batch(batch_BT1, mesh))
        return {name: float(value) for name, value in metrics.items()}

    with monkeypatch.context() as patch:
        patch.setattr(step_module, "token_losses", plain_token_losses)
        plain = first_step_metrics()
    fused = first_step_metrics()
    assert abs(fused["loss"] - plain["loss"]) <= 1e-2, (fused, plain)
    assert abs(fused["grad_norm"] / plain["grad_norm"] - 1.0) <= 0.01, (fused, plain)


def test_padded_vocabulary_columns_never_win_the_softmax() -> None:
    """97 real columns padded to 128 in bf16, every real logit an integer in [-248, -100] (exact in bf16).

    The padded columns' logits are 0: taking part, they would win the softmax (each token's log-sum-exp near
    log(31) instead of -100 or below), and in the backward pass exp(0 - lse) would overflow and make the gradient NaN.
    """
    rng = np.random.default_rng(0)
    x_BTD = jnp.ones((2, 5, 4), jnp.bfloat16)
    wte = jnp.asarray(rng.integers(-62, -24, (97, 4)), jnp.float32)
    targets_BT = jnp.asarray(rng.integers(0, 97, (2, 5)), jnp.int32)

    def fused(x_BTD: jax.Array, wte: jax.Array) -> jax.Array:
        return ops.tied_head_losses(x_BTD, wte, targets_BT, "bfloat16").sum()

    def plain(x_BTD: jax.Array, wte: jax.Array) -> jax.Array:
        logits_BTV = ops.tied_head(x_BTD, wte, "bfloat16")
        return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).sum()

    loss, (dx, dwte) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(x_BTD, wte)
    ref_loss, (ref_dx, ref_dwte) = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(x_BTD, wte)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * float(ref_loss)
    for ours, ref in ((dx, ref_dx), (dwte, ref_dwte)):
        assert bool(jnp.isfinite(ours).all())
        # Both round d loss / d logits to bf16; the plain head also rounds wte's gradient (2^-8 relative).
        scale = float(jnp.abs(ref.astype(jnp.float32)).max())
        assert scale > 0 and float(jnp.abs(ours.astype(jnp.float32) - ref.astype(jnp.float32)).max()) <= 1e-2 * scale
