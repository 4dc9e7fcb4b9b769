"""The optimizer: AdamW with nanoGPT's weight-decay rule, a warmup + cosine (or constant) schedule, global-norm clip.

Weight decay applies to the matrices (every `w`) and the embeddings (`wte`, `wpe`), never to biases or layer-norm
gains. The rule goes by name, not by rank: the stacked layers give biases a leading `n_layer` axis, so a bias is
2-D here and "decay everything with ndim >= 2" would wrongly decay it.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from gpt2_jax.errors import UsageError

DECAYED_NAMES = frozenset({"w", "wte", "wpe"})


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
