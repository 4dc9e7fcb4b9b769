"""The training state before the first step: its shapes, where it lies, the steps compiled over it, its first value.

abstract_state    shapes and dtypes from `jax.eval_shape`: nothing allocated, even for 1558M
choose_sharding   replicated or fsdp (mesh.py), checked against the devices' memory before any allocation
step_functions    the jitted init, train and eval steps over those shardings, built once per configuration
fresh_state       a new run: the state from the model's params (this run's old checkpoints and outputs go)
restored_state    a continued run: the newest readable checkpoint, its arrays placed straight onto the mesh;
                  newer checkpoints here that would shadow the ones this run writes are deleted
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from gpt2_jax.config import GPT2Config
from gpt2_jax.console import note
from gpt2_jax.model import lora
from gpt2_jax.model.lora import LoraConfig
from gpt2_jax.model.transformer import Tuning, abstract_params
from gpt2_jax.training.checkpoints import Checkpoints
from gpt2_jax.training.loss_scale import INITIAL_SCALE, LossScale, initial_loss_scale
from gpt2_jax.training.mesh import bytes_per_device, choose_strategy, tree_shardings
from gpt2_jax.training.optim import OptimizerConfig, optimizer_and_schedule
from gpt2_jax.training.run_dir import RunDir
from gpt2_jax.training.start import StartMode
from gpt2_jax.training.step import TrainState, build_eval_step, build_train_step, create_state

ADAPTER_INIT_STREAM = 1  # folded into the run's seed for the adapters' init, apart from its other uses


def initial_state(
    model_config: GPT2Config,
    adamw: optax.GradientTransformation,
    lora_config: LoraConfig | None,
    params: Any,
    seed: int,
) -> TrainState:
    """The state before the first step: every weight trains, or with LoRA new adapters over the frozen `params`
    (their matrices kept in the compute dtype: lora.freeze); float16 compute adds its loss scale."""
    scale = initial_loss_scale(model_config.dtype)
    if lora_config is None:
        return create_state(params, adamw, seed, loss_scale=scale)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), ADAPTER_INIT_STREAM)
    adapters = lora.init_adapters(model_config, lora_config, key)
    return create_state(adapters, adamw, seed, frozen=lora.freeze(params, model_config.dtype), loss_scale=scale)


@functools.lru_cache(maxsize=4)
def abstract_state(model_config: GPT2Config, optimizer: OptimizerConfig, lora_config: LoraConfig | None) -> TrainState:
    """The training state's shapes and dtypes; traced once per configuration, though the memory check, the step's
    shardings and a restore all ask for it."""
    adamw = optimizer_and_schedule(optimizer)[0]
    return jax.eval_shape(
        lambda p: initial_state(model_config, adamw, lora_config, p, 0), abstract_params(model_config)
    )


def choose_sharding(
    requested: str, model_config: GPT2Config, optimizer: OptimizerConfig, mesh: Mesh, lora_config: LoraConfig | None
) -> tuple[str, dict[str, int]]:
    """('replicated' | 'fsdp', per-device bytes of the state under each), checked against the devices' memory
    before anything is allocated."""
    abstract = abstract_state(model_config, optimizer, lora_config)
    state_bytes = {k: bytes_per_device(abstract, tree_shardings(abstract, mesh, k)) for k in ("replicated", "fsdp")}
    device = mesh.devices.flat[0]
    return choose_strategy(requested, state_bytes, device, mesh.devices.size), state_bytes


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    shardings: TrainState  # a NamedSharding per leaf of the state
    init_state: Callable[[Any, int], TrainState]  # (params, seed) -> the state, placed on `shardings`
    train_step: Callable  # step.build_train_step
    eval_step: Callable  # step.build_eval_step
    place_frozen: Callable | None  # with LoRA: base params -> the state's `frozen`, placed (a continued run's base)


@functools.lru_cache(maxsize=4)
def step_functions(
    model_config: GPT2Config, optimizer: OptimizerConfig, mesh: Mesh, accumulate: int, sharding: str, tuning: Tuning
) -> StepFunctions:
    """The jitted functions of one configuration: a process that trains twice (tests, a notebook) compiles once,
    since jit caches executables per function object."""
    adamw, schedule = optimizer_and_schedule(optimizer)
    shardings = tree_shardings(abstract_state(model_config, optimizer, tuning.lora), mesh, sharding)
    freeze = functools.partial(lora.freeze, compute_dtype=model_config.dtype)
    return StepFunctions(
        shardings=shardings,
        init_state=jax.jit(functools.partial(initial_state, model_config, adamw, tuning.lora), out_shardings=shardings),
        train_step=build_train_step(
            model_config, adamw, schedule, mesh, accumulate=accumulate, state_sharding=shardings, tuning=tuning
        ),
        eval_step=build_eval_step(model_config, mesh, shardings.model_params(), tuning.lora),
        place_frozen=None if tuning.lora is None else jax.jit(freeze, out_shardings=shardings.frozen),
    )


@dataclasses.dataclass(frozen=True)
class StartingPoint:
    state: TrainState
    step: int  # optimizer steps already taken
    meta: dict[str, Any] | None  # the restored checkpoint's meta (data position, rng, ...); None for a fresh run
    records: list[dict[str, Any]]  # metrics.jsonl records kept from the run continued


def fresh_state(
    run: RunDir, checkpoints: Checkpoints, params: Any, seed: int, init_state: Callable[[Any, int], TrainState]
) -> StartingPoint:
    deleted = checkpoints.delete_after(None)  # only non-empty with --restore_from fresh --overwrite
    if deleted:
        note(f"--overwrite: deleted checkpoints {', '.join(map(str, deleted))} of {run.path}")
    run.clear_outputs()
    return StartingPoint(state=init_state(placeable(params), seed), step=0, meta=None, records=[])


def placeable(params: Any) -> Any:
    """Loaded params as a jit that places them on the mesh takes them. A native model or a run's checkpoint loads
    onto this process's first device (weights/native.py), and a jit whose shardings span several devices refuses
    arguments committed to one; host arrays go anywhere (in several processes, each hands its own copy)."""
    if jax.process_count() > 1 or jax.device_count() > 1:
        return jax.device_get(params)
    return params


def restored_state(
    run: RunDir, checkpoints: Checkpoints, start: StartMode, abstract: TrainState, shardings: TrainState
) -> StartingPoint:
    source = checkpoints if start.kind == "resume" else Checkpoints(start.source, read_only=True)
    state, meta = restore_state(source, start.step, abstract, shardings)
    step = int(meta["step"])
    elsewhere = start.source != run.checkpoints.absolute()
    # Newer checkpoints here would shadow the ones this run writes: they failed to read back (resume) or
    # --overwrite asked for them to go (rolling back, or continuing another run's checkpoint).
    deleted = checkpoints.delete_after(None if elsewhere else step)
    if deleted:
        note(f"deleted checkpoints {', '.join(map(str, deleted))} of {run.path}")
    if elsewhere:
        run.clear_outputs()
    records = [] if elsewhere else run.keep_metrics_until(step)
    return StartingPoint(state=state, step=step, meta=meta, records=records)


def restore_state(
    source: Checkpoints, step: int | None, abstract: TrainState, shardings: TrainState
) -> tuple[TrainState, dict[str, Any]]:
    """The newest readable checkpoint (not after `step`), its arrays placed straight onto `shardings`."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored_step, params, opt_state, meta = source.restore_newest(target.params, target.opt_state, at_most=step)
    if step is not None and restored_step != step:
        note(f"checkpoint step {step} does not read back; continuing from step {restored_step} instead")
    # From numpy, not a jnp array: a process may place host values on a mesh spanning other hosts' devices.
    step_array = jax.device_put(np.asarray(restored_step, np.int32), shardings.step)
    rng = jax.device_put(np.asarray(meta["rng"], np.uint32), shardings.rng)
    scale = restored_loss_scale(meta, abstract.loss_scale is not None, shardings.loss_scale)
    return TrainState(params=params, opt_state=opt_state, step=step_array, rng=rng, loss_scale=scale), meta


def restored_loss_scale(meta: dict[str, Any], wanted: bool, shardings: Any) -> LossScale | None:
    """The checkpoint's loss scale for a float16 run; a run that changed to float16 (--dtype) starts a new one."""
    if not wanted:
        return None
    saved = meta.get("loss_scale")
    if saved is None:
        note(f"the checkpoint of step {meta['step']} holds no float16 loss scale; it starts at {INITIAL_SCALE:g}")
        saved = {"scale": INITIAL_SCALE, "good_steps": 0, "skipped": 0}
    return jax.device_put(LossScale.from_json(saved), shardings)
