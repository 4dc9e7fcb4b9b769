"""LoRA with dropout on several devices equals one device: data parallel, FSDP (the frozen base sharded too) and
gradient accumulation, in one process and over two (train.py with --distributed, test_distributed.py's helpers).
The CPU devices come from XLA_FLAGS, set before jax is imported: subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from tolerance import ulps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, jax, numpy as np
    from gpt2_jax.config import get_config
    from gpt2_jax.model.lora import LoraConfig, TARGETS
    from gpt2_jax.model.transformer import Tuning, init_params
    from gpt2_jax.training import step as ts
    from gpt2_jax.training.mesh import make_mesh, shard_batch, tree_shardings
    from gpt2_jax.training.optim import learning_rate_schedule, make_optimizer
    from gpt2_jax.training.state import initial_state

    assert len(jax.devices()) == 4
    config = get_config("tiny")
    schedule = learning_rate_schedule(1e-3, warmup_steps=2, total_steps=10)
    optimizer = make_optimizer(schedule)
    tuning = Tuning(lora=LoraConfig(4, 8.0, tuple(TARGETS), dropout=0.1), dropout=0.1)
    batches = [np.random.default_rng(i).integers(0, config.n_vocab, (8, 33)).astype(np.int32) for i in range(3)]
    host_params = jax.tree.map(np.array, init_params(config, 0))

    def run(n_devices, sharding):
        mesh = make_mesh(jax.devices()[:n_devices])
        create = lambda p: initial_state(config, optimizer, tuning.lora, p, 0)
        shardings = tree_shardings(jax.eval_shape(create, host_params), mesh, sharding)
        state = jax.jit(create, out_shardings=shardings)(jax.tree.map(np.copy, host_params))
        if sharding == "fsdp":  # the frozen base is split too, though it never trains
            w = state.frozen["h"]["mlp"]["c_fc"]["w"]
            assert w.sharding.shard_shape(w.shape)[2] == w.shape[2] // 4
        step = ts.build_train_step(
            config, optimizer, schedule, mesh, accumulate=2, state_sharding=shardings, tuning=tuning
        )
        losses = []
        for batch in batches:
            state, metrics = step(state, shard_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state.params)

    base_losses, base_adapters = run(1, "replicated")
    result = {"base_losses": base_losses}
    for name, (n, sharding) in {"devices4": (4, "replicated"), "fsdp4": (4, "fsdp")}.items():
        losses, adapters = run(n, sharding)
        result[name] = {
            "loss": max(abs(a - b) for a, b in zip(losses, base_losses)),
            "params": max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(adapters),
                                                                    jax.tree.leaves(base_adapters))),
        }
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.slow  # a subprocess with 4 CPU devices compiling three step variants: ~30 s on 2 cores
def test_lora_with_dropout_on_several_devices_matches_one_device():
    """Same masks and same updates on 1 and 4 devices, replicated or fsdp, 2 micro-batches, 3 steps: the losses up to
    summation order, the adapters within 1e-5."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    # A mean of 8 x 32 token losses grouped per device and micro-batch in other orders (measured: 2 ulps apart).
    for name in ("devices4", "fsdp4"):
        assert result[name]["loss"] <= ulps(result["base_losses"], 256), (name, result[name])
        assert result[name]["params"] <= 1e-5, (name, result[name])


@pytest.mark.slow  # three train.py processes with compiles: ~60 s on 2 cores
def test_lora_run_over_two_processes_trains_like_one(corpus, tmp_path):
    """A LoRA run with dropout, 2 processes x 2 devices (fsdp, samples merged from the sharded state at the end),
    has the losses of 1 process x 4 devices up to summation order, and loads as a merged model in this 1-device
    process."""
    from test_distributed import losses, run_one, run_processes, train_args

    from gpt2_jax.weights.loading import load_model
    from gpt2_jax.weights.native import save_native_model

    # Random weights saved as a model: LoRA adapts a trained model, so it refuses scratch:NAME itself.
    base = tmp_path / "base"
    base.mkdir()
    model = load_model("scratch:tiny")
    save_native_model(base, model.params, model.config, model.tokenizer)
    lora = ["--init", str(base), "--lora_rank", "4", "--lora_targets", "all", "--dropout", "0.1"]
    lora += ["--lora_dropout", "0.1"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_one([*train_args(corpus, a, 4), *lora], devices=4)
    results = run_processes([*train_args(corpus, b, 4), *lora, "--sharding", "fsdp", "--sample_num", "1",
                             "--sample_length", "4"], n_processes=2, devices_each=2)  # fmt: skip
    for i, (code, _, stderr) in enumerate(results):
        assert code == 0, f"process {i}: {stderr[-3000:]}"
    assert "in 2 processes" in results[0][1] and "==== SAMPLE 1 ====" in results[0][1]
    reference, distributed = losses(a), losses(b)
    assert sorted(distributed) == [1, 2, 3, 4]
    for step in range(1, 5):  # a mean of 8 x 32 token losses, summed by 2 processes' devices in other orders
        tolerance = ulps(reference[step], 256)
        assert abs(distributed[step] - reference[step]) <= tolerance, (step, distributed[step], reference[step])
    assert load_model(b).source.startswith("LoRA run")
