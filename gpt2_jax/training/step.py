"""The jitted training and evaluation steps, data parallel over a device mesh.

`TrainState` (params, opt_state, step, rng; with float16 compute the loss scale) is a pytree; `train_step(state, batch)
-> (state, metrics)` is jitted once with the state donated, so the update happens in place. The mesh has one axis,
'data', over every device of every process (mesh.py): each batch is sharded along it by rows; the state is replicated
(XLA all-reduces the gradients: the `jit` + `NamedSharding` spelling of what `pmap` did, one program for any device
count, the same losses as one device) or sharded along the same axis (FSDP: gradients are reduce-scattered to their
shards).

Gradient accumulation runs inside the step: the global batch `[B, T+1]` is split into `accumulate` micro-batches
summed by a `lax.scan`, so one dispatch covers the whole optimizer step. Row `j * accumulate + i` goes to
micro-batch `i`: every device keeps its own rows, no data moves between devices.

LoRA (model/lora.py): the state's `params` are the adapters alone and `frozen` the base model, a constant of the
loss: neither its gradients nor AdamW state for it exist. Dropout (transformer.Tuning) draws its masks from the run's
key folded with the step and the micro-batch index, so resuming and the device count change none of them; with
every rate 0 the step is the plain one, with no key in it.

float16 compute (loss_scale.py): the state carries a `LossScale`; the step differentiates the scaled loss, unscales
the float32 gradients, and drops the whole update when any of them is NaN or Inf. bfloat16 and float32 states carry
None there, and their step is traced from the same lines as before loss scaling existed, op for op.

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
from gpt2_jax.model import lora, ops
from gpt2_jax.model.lora import LoraConfig
from gpt2_jax.model.transformer import GPT2, Tuning
from gpt2_jax.training import loss_scale
from gpt2_jax.training.loss_scale import LossScale
from gpt2_jax.training.mesh import batch_sharding, replicated

Array = jax.Array
Metrics = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    params: Any  # what trains: every weight, or with LoRA the adapters alone
    opt_state: Any  # AdamW's state over `params` only
    step: Array  # int32 scalar: optimizer updates applied so far
    rng: Array  # uint32[2]: the run's base key (sampling seeds and dropout masks derive from it)
    frozen: Any = None  # with LoRA, the base model's weights: no gradient, no optimizer state, never checkpointed
    loss_scale: LossScale | None = None  # float16 compute only (loss_scale.py); None keeps the step unscaled

    def model_params(self) -> Any:
        """The params tree the forward reads: the base with its adapters beside their weights, or `params`."""
        return self.params if self.frozen is None else lora.combine(self.frozen, self.params)


def create_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    seed: int,
    frozen: Any = None,
    loss_scale: LossScale | None = None,
) -> TrainState:
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
        frozen=frozen,
        loss_scale=loss_scale,
    )


def token_losses(
    params: Any, config: GPT2Config, batch_BT1: Array, tuning: Tuning = Tuning(), rng: Array | None = None
) -> Array:
    """Next-token cross-entropy `[B, T]` in float32 for windows `[B, T+1]`; `rng` keys the dropout masks of a
    training `tuning` (transformer.Tuning)."""
    inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
    rngs = {"dropout": rng} if tuning.needs_rng else {}
    x_BTD = GPT2(config, tuning).apply({"params": params}, inputs_BT, method=GPT2.hidden, rngs=rngs)
    return ops.tied_head_losses(x_BTD, params["wte"], targets_BT, config.dtype)


def mean_loss(
    params: Any, config: GPT2Config, batch_BT1: Array, tuning: Tuning = Tuning(), rng: Array | None = None
) -> Array:
    return token_losses(params, config, batch_BT1, tuning, rng).mean()


def _loss_and_grads(
    state: TrainState,
    config: GPT2Config,
    tuning: Tuning,
    batch_BT1: Array,
    accumulate: int,
    mesh: Mesh,
    params_sharding,
    scale: Array | None = None,
):
    """(mean loss, gradients summed over the micro-batches and the devices); with `scale`, the gradients are those
    of `loss * scale` (still scaled) and the loss is the unscaled one."""
    # Dropout masks from the run's key, the step and the micro-batch: a resumed run draws the same ones.
    step_rng = jax.random.fold_in(state.rng, state.step) if tuning.needs_rng else None

    def loss_of_trainable(params, batch_BT1, rng):
        # Only `params` is differentiated: with LoRA the frozen base is a constant, so XLA never computes its
        # weight gradients, only the activation gradients that flow through it to the adapters.
        model_params = params if state.frozen is None else lora.combine(state.frozen, params)
        loss = mean_loss(model_params, config, batch_BT1, tuning, rng)
        return loss if scale is None else loss * scale

    def grad_fn(params, config, batch_BT1, index=0):
        rng = None if step_rng is None else jax.random.fold_in(step_rng, index)
        loss, grads = jax.value_and_grad(loss_of_trainable)(params, batch_BT1, rng)
        # Gradients land where their params live: all-reduced when replicated, reduce-scattered when sharded.
        return loss, jax.lax.with_sharding_constraint(grads, params_sharding)

    params = state.params
    if accumulate == 1:
        loss, grads = grad_fn(params, config, batch_BT1)
        return (loss if scale is None else loss / scale), grads
    B, T1 = batch_BT1.shape
    micro_ABT1 = batch_BT1.reshape(B // accumulate, accumulate, T1).swapaxes(0, 1)
    micro_ABT1 = jax.lax.with_sharding_constraint(micro_ABT1, NamedSharding(mesh, PartitionSpec(None, "data")))

    def add_micro_batch(carry, micro):
        loss_sum, grad_sum = carry
        index, micro_BT1 = micro
        loss, grads = grad_fn(params, config, micro_BT1, index)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = (
        jnp.zeros((), jnp.float32),
        jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), params_sharding),
    )
    (loss_sum, grad_sum), _ = jax.lax.scan(add_micro_batch, zeros, (jnp.arange(accumulate), micro_ABT1))
    loss = loss_sum / accumulate
    return (loss if scale is None else loss / scale), jax.tree.map(lambda g: g / accumulate, grad_sum)


def build_train_step(
    config: GPT2Config,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    *,
    accumulate: int = 1,
    state_sharding: TrainState | None = None,
    tuning: Tuning = Tuning(),
) -> Callable[[TrainState, Array], tuple[TrainState, Metrics]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted with explicit shardings and the state donated.

    state_sharding: a TrainState of NamedShardings (mesh.tree_shardings); None replicates the whole state.
    tuning: LoRA and dropout (transformer.Tuning, `train` set here); with LoRA the state's `frozen` holds the base.
    metrics: `loss` (mean over the global batch, before the update), `grad_norm` (before clipping), `lr` (the
    rate this update used); with a loss scale also `loss_scale` (the one this step used) and `skipped_steps` (the
    run's total, this step included: it grew by one when this step's gradients were not finite).
    """
    params_sharding = replicated(mesh) if state_sharding is None else state_sharding.params
    if state_sharding is None:
        state_sharding = replicated(mesh)  # one sharding for the whole state: a prefix of every leaf
    tuning = tuning._replace(train=True)

    def train_step(state: TrainState, batch_BT1: Array) -> tuple[TrainState, Metrics]:
        if state.loss_scale is not None:
            return scaled_train_step(state, batch_BT1)
        loss, grads = _loss_and_grads(state, config, tuning, batch_BT1, accumulate, mesh, params_sharding)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    def scaled_train_step(state: TrainState, batch_BT1: Array) -> tuple[TrainState, Metrics]:
        scaler = state.loss_scale
        loss, scaled = _loss_and_grads(
            state, config, tuning, batch_BT1, accumulate, mesh, params_sharding, scale=scaler.scale
        )
        grads = scaler.unscale(scaled)
        finite = loss_scale.all_finite(grads)  # the global gradients: one decision for every device
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        after = scaler.after(finite)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            # AdamW's schedule counts applied updates only: the rate this update used (or would have).
            "lr": schedule(state.step - scaler.skipped),
            "loss_scale": scaler.scale,
            "skipped_steps": after.skipped,
        }
        new_state = state.replace(
            params=loss_scale.unless_skipped(finite, params, state.params),
            opt_state=loss_scale.unless_skipped(finite, opt_state, state.opt_state),
            step=state.step + 1,
            loss_scale=after,
        )
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
    )


def build_eval_step(
    config: GPT2Config, mesh: Mesh, params_sharding: Any = None, lora_config: LoraConfig | None = None
) -> Callable[[Any, Array, Array], tuple[Array, Array]]:
    """`eval_step(params, batch [B, T+1], row_weight [B]) -> (summed loss, number of predicted tokens)`.

    Rows of weight 0 pad the last batch to the compiled shape and count for nothing. params: `state.model_params()`,
    lying as `params_sharding` says (None: replicated). No dropout: evaluation sees the model as sampling does.
    """

    def eval_step(params: Any, batch_BT1: Array, row_weight_B: Array) -> tuple[Array, Array]:
        losses_BT = token_losses(params, config, batch_BT1, Tuning(lora=lora_config))
        weight_B = row_weight_B.astype(jnp.float32)
        return (losses_BT.sum(axis=1) * weight_B).sum(), weight_B.sum() * losses_BT.shape[1]

    return jax.jit(
        eval_step,
        in_shardings=(params_sharding or replicated(mesh), batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
    )


# True when no leaf holds a NaN or Inf: checked before a checkpoint is written.
all_finite = jax.jit(loss_scale.all_finite)
