"""The optimizer: AdamW with nanoGPT's weight-decay rule, a warmup + cosine (or constant) schedule, global-norm clip.

Weight decay applies to the matrices (every `w`, and LoRA's `lora_A`, `lora_B`: decaying B pulls the adapted model
back towards its base) and the embeddings (`wte`, `wpe`), never to biases or layer-norm gains. The rule goes by name,
not by rank: the stacked layers give biases a leading `n_layer` axis, so a bias is 2-D here and "decay everything
with ndim >= 2" would wrongly decay it.

`OptimizerConfig` names the settings; it is frozen and hashable, so equal settings give the one (optimizer,
schedule) pair of `optimizer_and_schedule`, and with it the same cached abstract state and compiled steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import optax

from gpt2_jax.errors import UsageError
from gpt2_jax.training.config import TrainConfig

DECAYED_NAMES = frozenset({"w", "wte", "wpe", "lora_A", "lora_B"})


def decay_mask(params: Any) -> Any:
    """A pytree of bools shaped like `params`: True where AdamW's weight decay applies."""

    def leaf_name(path: tuple[Any, ...]) -> str:
        last = path[-1]
        return str(getattr(last, "key", getattr(last, "name", last)))

    return jax.tree_util.tree_map_with_path(lambda path, _: leaf_name(path) in DECAYED_NAMES, params)


def learning_rate_schedule(
    learning_rate: float, *, warmup_steps: int, total_steps: int, schedule: str = "cosine", min_lr: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `min_lr` at `total_steps`, or constant."""
    if schedule not in ("cosine", "constant"):
        raise UsageError(f"--lr_schedule must be cosine or constant, got {schedule!r}.")
    warmup_steps = max(0, int(warmup_steps))
    if schedule == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(learning_rate)
        warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
        return optax.join_schedules([warmup, optax.constant_schedule(learning_rate)], [warmup_steps])
    # Past total_steps (a run extended with a larger --steps after the fact) the rate stays at min_lr.
    decay_steps = max(total_steps, warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
        end_value=min_lr,
    )


def make_optimizer(
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when `grad_clip` <= 0), then AdamW with the decay mask above."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if grad_clip and grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
    return adamw


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float  # the peak rate, reached after the warmup
    warmup_steps: int
    total_steps: int  # where the cosine ends at min_lr
    schedule: str = "cosine"  # or "constant"
    min_lr: float = 0.0
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global norm; 0 turns clipping off
    b1: float = 0.9
    b2: float = 0.95

    @classmethod
    def of(cls, cfg: TrainConfig) -> OptimizerConfig:
        """The settings of a run's options; the cosine ends at a tenth of the peak unless --min_lr says otherwise."""
        return cls(
            learning_rate=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            schedule=cfg.lr_schedule,
            min_lr=cfg.min_lr if cfg.min_lr is not None else cfg.learning_rate / 10,
            weight_decay=cfg.weight_decay,
            grad_clip=cfg.grad_clip,
            b1=cfg.beta1,
            b2=cfg.beta2,
        )


@functools.lru_cache(maxsize=4)
def optimizer_and_schedule(settings: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) for `settings`, the same objects each time they are asked for."""
    schedule = learning_rate_schedule(
        settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        total_steps=settings.total_steps,
        schedule=settings.schedule,
        min_lr=settings.min_lr,
    )
    optimizer = make_optimizer(
        schedule, weight_decay=settings.weight_decay, grad_clip=settings.grad_clip, b1=settings.b1, b2=settings.b2
    )
    return optimizer, schedule
