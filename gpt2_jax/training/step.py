"""The jitted training and evaluation steps, data parallel over a device mesh.

`TrainState` (params, opt_state, step, rng) is a pytree; `train_step(state, batch) -> (state, metrics)` is jitted
once with the state donated, so the update happens in place. The mesh has one axis, 'data', over every device of
every process (mesh.py): each batch is sharded along it by rows; the state is replicated (XLA all-reduces the
gradients: the `jit` + `NamedSharding` spelling of what `pmap` did, one program for any device count, the same
losses as one device) or sharded along the same axis (FSDP: gradients are reduce-scattered to their shards).

Gradient accumulation runs inside the step: the global batch `[B, T+1]` is split into `accumulate` micro-batches
summed by a `lax.scan`, so one dispatch covers the whole optimizer step. Row `j * accumulate + i` goes to
micro-batch `i`: every device keeps its own rows, no data moves between devices.

Loss: mean next-token cross-entropy in float32, from the model's final hidden state through the fused tied head
(`ops.tied_head_losses`): logits in the compute dtype, log-sum-exp in float32, and in 16-bit compute no float32
`[B, T, V]` tensor in memory, forward or backward. Training and evaluation (`evaluate.py`) share `token_losses`.

Axes: B rows of the batch, T tokens per window (T1 = T+1: the window and the token after it, the last target),
V vocabulary, A micro-batches of one optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2_jax.config import GPT2Config
from gpt2_jax.model import ops
from gpt2_jax.model.transformer import GPT2
from gpt2_jax.training.mesh import batch_sharding, replicated

Array = jax.Array
Metrics = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: Array  # int32 scalar: optimizer updates applied so far
    rng: Array  # uint32[2]: the run's base key (sampling during training derives its seeds from it)


def create_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
    )


def replicated_state(mesh: Mesh) -> TrainState:
    """Every part of the state whole on every device (a TrainState of shardings, each a prefix of its subtree)."""
    whole = replicated(mesh)
    return TrainState(params=whole, opt_state=whole, step=whole, rng=whole)


def token_losses(params: Any, config: GPT2Config, batch_BT1: Array) -> Array:
    """Next-token cross-entropy `[B, T]` in float32 for windows `[B, T+1]`."""
    inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
    x_BTD = GPT2(config).apply({"params": params}, inputs_BT, method=GPT2.hidden)
    return ops.tied_head_losses(x_BTD, params["wte"], targets_BT, config.dtype)


def mean_loss(params: Any, config: GPT2Config, batch_BT1: Array) -> Array:
    return token_losses(params, config, batch_BT1).mean()


def _loss_and_grads(params: Any, config: GPT2Config, batch_BT1: Array, accumulate: int, mesh: Mesh, params_sharding):
    def grad_fn(params, config, batch_BT1):
        loss, grads = jax.value_and_grad(mean_loss)(params, config, batch_BT1)
        # Gradients land where their params live: all-reduced when replicated, reduce-scattered when sharded.
        return loss, jax.lax.with_sharding_constraint(grads, params_sharding)

    if accumulate == 1:
        return grad_fn(params, config, batch_BT1)
    B, T1 = batch_BT1.shape
    micro_ABT1 = batch_BT1.reshape(B // accumulate, accumulate, T1).swapaxes(0, 1)
    micro_ABT1 = jax.lax.with_sharding_constraint(micro_ABT1, NamedSharding(mesh, PartitionSpec(None, "data")))

    def add_micro_batch(carry, micro_BT1):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(params, config, micro_BT1)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = (
        jnp.zeros((), jnp.float32),
        jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), params_sharding),
    )
    (loss_sum, grad_sum), _ = jax.lax.scan(add_micro_batch, zeros, micro_ABT1)
    return loss_sum / accumulate, jax.tree.map(lambda g: g / accumulate, grad_sum)


def build_train_step(
    config: GPT2Config,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    *,
    accumulate: int = 1,
    state_sharding: TrainState | None = None,
) -> Callable[[TrainState, Array], tuple[TrainState, Metrics]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted with explicit shardings and the state donated.

    state_sharding: a TrainState of NamedShardings (mesh.tree_shardings); None replicates the whole state.
    metrics: `loss` (mean over the global batch, before the update), `grad_norm` (before clipping), `lr` (the
    rate this update used).
    """
    if state_sharding is None:
        state_sharding = replicated_state(mesh)

    def train_step(state: TrainState, batch_BT1: Array) -> tuple[TrainState, Metrics]:
        loss, grads = _loss_and_grads(state.params, config, batch_BT1, accumulate, mesh, state_sharding.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
    )


def build_eval_step(
    config: GPT2Config, mesh: Mesh, params_sharding: Any = None
) -> Callable[[Any, Array, Array], tuple[Array, Array]]:
    """`eval_step(params, batch [B, T+1], row_weight [B]) -> (summed loss, number of predicted tokens)`.

    Rows of weight 0 pad the last batch to the compiled shape and count for nothing. params_sharding: as the
    train state's params lie (None: replicated).
    """

    def eval_step(params: Any, batch_BT1: Array, row_weight_B: Array) -> tuple[Array, Array]:
        losses_BT = token_losses(params, config, batch_BT1)
        weight_B = row_weight_B.astype(jnp.float32)
        return (losses_BT.sum(axis=1) * weight_B).sum(), weight_B.sum() * losses_BT.shape[1]

    return jax.jit(
        eval_step,
        in_shardings=(params_sharding or replicated(mesh), batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
    )


@jax.jit
def all_finite(tree: Any) -> Array:
    """True when no leaf holds a NaN or Inf: checked before a checkpoint is written."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))
