"""Dynamic loss scaling for float16 compute: the scale, when a step is skipped, and how the scale moves.

float16 keeps 5 exponent bits: gradients below 2^-24 flush to zero and values above 65504 overflow to Inf. So a
float16 run differentiates `loss * scale` (the activations' gradients then sit high in float16's range), divides
the float32 gradients of the float32 params by `scale` again, and checks them:

    every gradient finite   the update is applied; after GROWTH_INTERVAL such steps in a row the scale doubles
    any NaN or Inf          the update is dropped (params and AdamW state stay bit-equal, AdamW's own count with
                            them), the scale halves (never below MIN_SCALE) and the skip is counted

The defaults are PyTorch's GradScaler's and flax's DynamicScale's: start at 2^15, x2 after 2000 good steps in a row,
x0.5 on an overflow. The scale is a power of two, so scaling and unscaling are exact. The check reads the gradients
after accumulation and after the cross-device reduction (jit over the mesh makes them global), so one decision covers
the whole global batch on every device. The training step still advances on a skipped step and its batch is not
replayed (the data position moves on, as nanoGPT's does): the step names the batch drawn, the dropout key and the
checkpoint; only AdamW's count, and with it the learning-rate schedule, counts applied updates.

bfloat16 and float32 runs have no `LossScale` at all (the state's field is None): their step compiles to exactly what
it was before loss scaling existed.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

INITIAL_SCALE = 2.0**15
GROWTH_INTERVAL = 2000  # good steps in a row before the scale doubles
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
# Below 1 a smaller scale cannot help: gradients that overflow float16 unscaled are a diverging run, which the loop
# stops (loop.py) rather than skipping every step from then on.
MIN_SCALE = 1.0


@flax.struct.dataclass
class LossScale:
    scale: Array  # float32 scalar, a power of two: what this step multiplies the loss by
    good_steps: Array  # int32 scalar: finite steps in a row since the scale last changed
    skipped: Array  # int32 scalar: steps skipped for non-finite gradients since the run began

    @classmethod
    def initial(cls) -> LossScale:
        return cls(
            scale=jnp.asarray(INITIAL_SCALE, jnp.float32),
            good_steps=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    def unscale(self, grads: Any) -> Any:
        """The gradients of the unscaled loss, in float32 (the dtype of the params they belong to)."""
        inverse = 1.0 / self.scale
        return jax.tree.map(lambda g: g.astype(jnp.float32) * inverse, grads)

    def after(self, finite: Array) -> LossScale:
        """The scale for the next step, given whether this step's gradients were all finite."""
        grown = self.good_steps + 1 >= GROWTH_INTERVAL
        scale_if_finite = jnp.where(grown, self.scale * GROWTH_FACTOR, self.scale)
        return LossScale(
            scale=jnp.where(finite, scale_if_finite, jnp.maximum(self.scale * BACKOFF_FACTOR, MIN_SCALE)),
            good_steps=jnp.where(finite & ~grown, self.good_steps + 1, 0),
            skipped=self.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
        )

    def to_json(self) -> dict[str, Any]:
        """Host values for a checkpoint's meta: a power of two and two counts are exact in JSON."""
        scale, good_steps, skipped = jax.device_get((self.scale, self.good_steps, self.skipped))
        return {"scale": float(scale), "good_steps": int(good_steps), "skipped": int(skipped)}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> LossScale:
        """Host (numpy) values, which any process may place on a mesh that spans other hosts' devices."""
        return cls(
            scale=np.asarray(saved["scale"], np.float32),
            good_steps=np.asarray(saved["good_steps"], np.int32),
            skipped=np.asarray(saved["skipped"], np.int32),
        )


def needs_loss_scale(dtype: str) -> bool:
    """float16 alone: bfloat16 has float32's exponent range, so its gradients neither underflow nor overflow."""
    return dtype == "float16"


def initial_loss_scale(dtype: str) -> LossScale | None:
    return LossScale.initial() if needs_loss_scale(dtype) else None


def all_finite(tree: Any) -> Array:
    """One bool: no leaf of `tree` holds a NaN or Inf."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def unless_skipped(finite: Array, new: Any, old: Any) -> Any:
    """`new` where the step is applied, `old` bit for bit where it is skipped (a select XLA fuses into the update)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
