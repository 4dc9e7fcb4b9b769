"""The memory a training step needs on each device, counted before anything is compiled, and what makes it fit.

    state        params + AdamW moments (with LoRA: adapters, their moments and the frozen base), from
                 `jax.eval_shape`, as placed (replicated or fsdp: mesh.py)
    gradients    float32, shaped like what trains, as placed; twice with --accumulate_gradients > 1 (the running sum
                 beside each micro-batch's own)
    activations  what the forward saves for the backward: the residuals of `jax.vjp` of one micro-batch's loss,
                 read off its jaxpr (`jax.make_jaxpr` on shapes alone: nothing runs, nothing is allocated), less the
                 params they merely refer to. Exact at JAX's level for the model, compute dtype, attention path,
                 --remat and LoRA the run uses: GPT-2's tanh GELU alone saves six [B, T, 4D] tensors per layer, and
                 XLA's attention (CPUs, T4, V100: precision.has_fused_attention) its [B, N, T, T] probabilities
    transient    the largest buffer the backward adds: d loss / d logits, [B, T, V] in the head's dtype (with
                 --remat, one layer's recomputed activations when they are larger)

XLA's own workspace and fragmentation come on top and are not counted. Checked on this CPU in float32, where XLA
reports what the compiled step needs (`compile().memory_analysis()`): gradients + activations + transient lie within
0.8x to 1.35x of its temp bytes for tiny and mini shapes, with and without --remat and accumulation
(tests/test_memory.py). A CPU computes 16-bit matmuls through float32 copies, so 16-bit estimates cannot be checked
there; `ops.traced_for` counts them as the GPU's trace would have them (a T4's for the README's table).

`plan` is what train.py prints: the estimate, and on a device that reports its memory and would not hold the step,
which of --remat, a smaller micro-batch (more accumulation, the same global batch) and LoRA would.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gpt2_jax.config import GPT2Config
from gpt2_jax.model import lora, ops
from gpt2_jax.model.lora import DEFAULT_TARGETS, LoraConfig
from gpt2_jax.model.transformer import Tuning
from gpt2_jax.training.mesh import bytes_per_device, gib, tree_shardings
from gpt2_jax.training.optim import OptimizerConfig
from gpt2_jax.training.state import abstract_state
from gpt2_jax.training.step import mean_loss

ADVICE_LORA_RANK = 8  # what the plan suggests when only LoRA fits: the README's example rank


@dataclasses.dataclass(frozen=True)
class StepMemory:
    state: int
    gradients: int
    activations: int  # saved for the backward pass
    transient: int  # the largest buffer the backward pass adds

    @property
    def total(self) -> int:
        return self.state + self.gradients + self.activations + self.transient

    def describe(self) -> str:
        return (
            f"about {gib(self.total)} per device (state {gib(self.state)} + gradients {gib(self.gradients)} + "
            f"activations {gib(self.activations + self.transient)})"
        )


def _nbytes(aval: Any) -> int:
    return math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize


def saved_activation_bytes(abstract: Any, config: GPT2Config, tuning: Tuning, rows: int, seq_len: int) -> int:
    """Bytes of the residuals `jax.vjp` keeps for one micro-batch of `rows` windows, from the jaxpr alone."""
    tuning = tuning._replace(train=True)
    batch = jax.ShapeDtypeStruct((rows, seq_len + 1), jnp.int32)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32) if tuning.needs_rng else None

    def pullback(params: Any, frozen: Any, batch_BT1: Any, rng: Any) -> Any:
        def loss(trainable: Any) -> Any:
            model_params = trainable if frozen is None else lora.combine(frozen, trainable)
            return mean_loss(model_params, config, batch_BT1, tuning, rng)

        return jax.vjp(loss, params)[1]  # a pytree whose leaves are the residuals

    closed = jax.make_jaxpr(pullback)(abstract.params, abstract.frozen, batch, rng)
    inputs = {id(v) for v in closed.jaxpr.invars}  # params the backward reads in place: already counted as state
    return sum(_nbytes(v.aval) for v in closed.jaxpr.outvars if id(v) not in inputs and not hasattr(v, "val"))


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What a step's memory depends on (hashable: estimates are cached per shape)."""

    config: GPT2Config  # the model and how it computes: dtype, remat
    optimizer: OptimizerConfig
    tuning: Tuning  # LoRA and dropout
    rows: int  # windows per device and micro-batch
    seq_len: int
    accumulate: int  # micro-batches per step
    mesh: Mesh
    strategy: str  # how the state lies: replicated or fsdp


@functools.lru_cache(maxsize=32)
def estimate(step: StepShape) -> StepMemory:
    """The step's memory on one device."""
    config, rows, seq_len = step.config, step.rows, step.seq_len
    abstract = abstract_state(config, step.optimizer, step.tuning.lora)
    state = bytes_per_device(abstract, tree_shardings(abstract, step.mesh, step.strategy))
    gradients = bytes_per_device(abstract.params, tree_shardings(abstract.params, step.mesh, step.strategy))
    activations = saved_activation_bytes(abstract, config, step.tuning, rows, seq_len)
    head_dtype = ops.float32_accumulating_dtype(config.dtype)
    transient = rows * seq_len * ops.head_rows(config.n_vocab, head_dtype) * jnp.dtype(head_dtype).itemsize
    if config.remat:  # the backward recomputes one layer at a time: what that layer saves when not rematerialized
        full = saved_activation_bytes(abstract, config.replace(remat=False), step.tuning, rows, seq_len)
        transient = max(transient, (full - activations) // config.n_layer)
    return StepMemory(state, gradients * (2 if step.accumulate > 1 else 1), activations, transient)


@dataclasses.dataclass(frozen=True)
class Option:
    flags: str  # what to add to the command line
    memory: StepMemory


def alternatives(step: StepShape) -> list[Option]:
    """The ways to a smaller step, cheapest first: --remat (about a third more compute), micro-batches of one row
    (the same global batch; fewer rows per matmul), both, then LoRA (another method: the base stays frozen)."""
    config, tuning = step.config, step.tuning
    global_batch = step.rows * step.accumulate * step.mesh.devices.size
    one_row = dict(rows=1, accumulate=step.accumulate * step.rows)
    one_row_flag = f"--accumulate_gradients {step.accumulate * step.rows}"
    remat = dict(config=config.replace(remat=True))
    lora_config = LoraConfig(ADVICE_LORA_RANK, float(ADVICE_LORA_RANK), (DEFAULT_TARGETS,), 0.0)
    adapters = dict(tuning=tuning._replace(lora=lora_config))
    candidates: list[tuple[str, dict]] = []  # (flags, what changes)
    if not config.remat:
        candidates.append(("--remat", remat))
    if step.rows > 1:
        candidates.append((f"{one_row_flag} (micro-batches of 1 row, {global_batch} in all)", one_row))
        if not config.remat:
            candidates.append((f"--remat {one_row_flag}", {**remat, **one_row}))
    if tuning.lora is None:
        candidates.append((f"--lora_rank {ADVICE_LORA_RANK}", adapters))
        if not config.remat:
            candidates.append((f"--lora_rank {ADVICE_LORA_RANK} --remat", {**adapters, **remat}))
    return [Option(flags, estimate(dataclasses.replace(step, **changes))) for flags, changes in candidates]


def advice(memory: StepMemory, budget: int, device_kind: str, options: list[Option]) -> str:
    """One sentence: the step does not fit `budget`, and the options that would (or that none would)."""
    fitting = [f"{o.flags}: {gib(o.memory.total)}" for o in options if o.memory.total <= budget]
    way_out = "what would fit: " + "; ".join(fitting) if fitting else "none of --remat, micro-batches of 1 or LoRA "
    if not fitting:
        way_out += "would fit either; pick a smaller model or add devices (--sharding fsdp)"
    return (
        f"This step needs {memory.describe()}, more than the {gib(budget)} a {device_kind} gives JAX "
        f"(estimated before compiling); {way_out}."
    )
