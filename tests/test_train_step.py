"""The optimizer and the jitted step: weight-decay mask, schedule, batch checks, data parallel and accumulation.

Several devices come from `XLA_FLAGS=--xla_force_host_platform_device_count=8`, which must be set before jax is
imported, so that comparison runs in a subprocess (other test files import jax in this process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerance import ulps

from gpt2_jax.config import get_config
from gpt2_jax.errors import UsageError
from gpt2_jax.model.transformer import init_params
from gpt2_jax.training.config import TrainConfig
from gpt2_jax.training.mesh import check_batch, select_devices
from gpt2_jax.training.optim import (
    OptimizerConfig,
    decay_mask,
    learning_rate_schedule,
    make_optimizer,
    optimizer_and_schedule,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(get_config("tiny"), 0)


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree.leaves_with_path(tree)}


def test_decay_mask_covers_matrices_and_embeddings_only(tiny_params):
    mask = _flat(decay_mask(tiny_params))
    decayed = sorted(k for k, v in mask.items() if v)
    assert decayed == sorted(k for k in mask if k.endswith("['w']") or k in ("['wte']", "['wpe']"))
    assert not mask["['h']['attn']['c_attn']['b']"]  # 2-D once stacked over layers, and still never decayed
    assert not mask["['h']['ln_1']['g']"] and not mask["['ln_f']['b']"]


def test_weight_decay_leaves_biases_and_gains_untouched(tiny_params):
    lr, wd = 0.1, 0.5
    optimizer = make_optimizer(learning_rate_schedule(lr, warmup_steps=0, total_steps=10, schedule="constant"),
                               weight_decay=wd, grad_clip=1.0)  # fmt: skip
    zero_grads = jax.tree.map(jnp.zeros_like, tiny_params)
    updates, _ = jax.jit(optimizer.update)(zero_grads, jax.jit(optimizer.init)(tiny_params), tiny_params)
    new = _flat(jax.tree.map(lambda p, u: p + u, tiny_params, updates))
    old = _flat(tiny_params)
    for name, mask in _flat(decay_mask(tiny_params)).items():
        if mask:  # AdamW's decoupled decay: p <- p - lr * wd * p when the gradient is zero
            # Elementwise, no sums: optax rounds wd * p, lr * that and p + u, this side p * 0.95 once, so they are
            # about 1 eps apart relative; 1e-6 is 8 eps.
            np.testing.assert_allclose(new[name], old[name] * (1 - lr * wd), rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(new[name], old[name])


def test_schedule_warms_up_then_decays_to_min_lr():
    # float32 schedules against exact decimals: a few elementwise roundings, within approx's default rel=1e-6 (8 eps).
    cosine = learning_rate_schedule(1e-3, warmup_steps=10, total_steps=100, min_lr=1e-4)
    assert float(cosine(0)) == 0.0
    assert float(cosine(5)) == pytest.approx(5e-4)
    assert float(cosine(10)) == pytest.approx(1e-3)
    assert float(cosine(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)
    assert float(cosine(100)) == pytest.approx(1e-4) and float(cosine(150)) == pytest.approx(1e-4)
    constant = learning_rate_schedule(1e-3, warmup_steps=4, total_steps=100, schedule="constant")
    assert float(constant(2)) == pytest.approx(5e-4) and float(constant(90)) == pytest.approx(1e-3)
    with pytest.raises(UsageError, match="lr_schedule"):
        learning_rate_schedule(1e-3, warmup_steps=0, total_steps=10, schedule="linear")


def test_optimizer_settings_come_from_the_options_and_equal_settings_share_one_optimizer():
    settings = OptimizerConfig.of(TrainConfig(learning_rate=1e-3, steps=50, warmup_steps=5, beta2=0.99))
    assert settings == OptimizerConfig(learning_rate=1e-3, warmup_steps=5, total_steps=50, min_lr=1e-4, b2=0.99)
    again = OptimizerConfig.of(TrainConfig(learning_rate=1e-3, steps=50, warmup_steps=5, beta2=0.99))
    assert optimizer_and_schedule(settings) is optimizer_and_schedule(again)  # compiled steps are cached on it
    other = OptimizerConfig.of(TrainConfig(learning_rate=1e-3, steps=50, warmup_steps=5, min_lr=0.0))
    assert other.min_lr == 0.0 and optimizer_and_schedule(other) is not optimizer_and_schedule(settings)
    schedule = optimizer_and_schedule(settings)[1]
    assert float(schedule(5)) == pytest.approx(1e-3) and float(schedule(50)) == pytest.approx(1e-4)


def test_batch_must_divide_devices_times_accumulation():
    assert check_batch(16, 4, 2) == 2
    with pytest.raises(UsageError, match=r"--batch_size 12 must be divisible by .* 8"):
        check_batch(12, 4, 2)
    with pytest.raises(UsageError, match="more devices"):
        select_devices(len(jax.local_devices()) + 1)
    with pytest.raises(UsageError, match="'all' or a number"):
        select_devices("many")


PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json, jax, numpy as np
    from gpt2_jax.config import get_config
    from gpt2_jax.model.transformer import init_params
    from gpt2_jax.training.optim import learning_rate_schedule, make_optimizer
    from gpt2_jax.training import step as ts
    from gpt2_jax.training.mesh import make_mesh, shard_batch, tree_shardings

    assert len(jax.devices()) == 8
    config = get_config("tiny")
    # Adam's first update is lr * g / (|g| + eps): for a weight whose gradient cancels to ~eps, summation-order
    # noise (1e-6 relative) changes it by a good fraction of lr. Real runs warm up; so does this one.
    schedule = learning_rate_schedule(1e-4, warmup_steps=2, total_steps=10)
    optimizer = make_optimizer(schedule)
    batches = [np.random.default_rng(i).integers(0, config.n_vocab, (8, 33)).astype(np.int32) for i in range(3)]
    host_params = jax.tree.map(np.array, init_params(config, 0))

    def run(n_devices, accumulate, sharding="replicated"):
        mesh = make_mesh(jax.devices()[:n_devices])
        # A private copy per run: the donated state may reuse the input's memory (jit's resharding can alias it).
        params = jax.tree.map(np.copy, host_params)
        create = lambda p: ts.create_state(p, optimizer, 0)
        shardings = tree_shardings(jax.eval_shape(create, params), mesh, sharding)
        state = jax.jit(create, out_shardings=shardings)(params)
        if sharding == "fsdp":  # the big matrices really are split 8 ways, the optimizer moments with them
            assert state.params["wte"].sharding.shard_shape(state.params["wte"].shape)[1] == config.n_embd // 8
            assert state.opt_state[1][0].mu["h"]["mlp"]["c_fc"]["w"].addressable_shards[0].data.shape[2] == 32
        step = ts.build_train_step(config, optimizer, schedule, mesh, accumulate=accumulate, state_sharding=shardings)
        losses = []
        for batch in batches:
            state, metrics = step(state, shard_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state.params)

    def max_diff(a, b):
        return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    base_losses, base_params = run(1, 1)
    result = {"base_losses": base_losses}
    runs = {"devices8": (8, 1, "replicated"), "accumulate4x2": (1, 4, "replicated"), "fsdp8x2": (8, 2, "fsdp")}
    for name, (n, acc, sharding) in runs.items():
        losses, params = run(n, acc, sharding)
        result[name] = {"loss": max(abs(a - b) for a, b in zip(losses, base_losses)),
                        "params": max_diff(params, base_params)}
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.slow  # a subprocess with 8 CPU devices compiling four step variants: ~45 s on 2 cores
def test_data_parallel_and_accumulation_match_one_device():
    """8 devices x 1 row, 1 device x 4 micro-batches of 2, and 8 devices with the state sharded (fsdp) x 2
    micro-batches all equal 1 device x 8 rows, 3 steps: the losses up to summation order, the params within 1e-5."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", PARALLEL_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["base_losses"][2] < result["base_losses"][0]  # it trains
    # Each loss is a mean of 8 x 32 token losses that the device counts and micro-batches group in their own orders
    # (measured: 4 ulps apart): 256 ulps. The params' 1e-5 is measured, not derived (2e-7 here): Adam's g / sqrt(v)
    # can scale a gradient's rounding up to lr, which the script's warm-up keeps small.
    for name in ("devices8", "accumulate4x2", "fsdp8x2"):
        assert result[name]["loss"] <= ulps(result["base_losses"], 256), (name, result[name])
        assert result[name]["params"] <= 1e-5, (name, result[name])
