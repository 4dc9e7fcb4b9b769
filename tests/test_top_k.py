"""Two-stage top-k (`processors.two_stage_top_k`, what `next_token` runs on a GPU) against `lax.top_k`: the same
values and the same ids, ties included, whatever the vocabulary size and k; and when it runs instead of `lax.top_k`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.sampling.processors import TOP_K_BLOCK, top_k_candidates, two_stage_pays, two_stage_top_k

KS = (1, 16, 40, 100)
VOCABS = (8 * TOP_K_BLOCK, 1500, 50257)  # a multiple of the block, and two that are not


def logits(kind: str, V: int, seed: int = 0) -> np.ndarray:
    """Four rows of float32 logits of one `kind`."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=(4, V)).astype(np.float32)
    if kind == "ties":  # a handful of values over the whole vocabulary: every block holds long runs of ties
        return rng.integers(-3, 3, size=(4, V)).astype(np.float32)
    x = rng.integers(0, 2, size=(4, V)).astype(np.float32)  # kind == "-inf"
    x[0] = -np.inf  # a row with no finite logit
    x[1, 7:] = -np.inf  # fewer finite logits than k: the rest are -inf ties, also against the block padding
    x[2, rng.random(V) < 0.5] = -np.inf
    x[3, -3:] = np.nan  # NaN ranks first in lax.top_k; two stages keep that
    return x


two_stage = jax.jit(two_stage_top_k, static_argnums=1)
one_stage = jax.jit(jax.lax.top_k, static_argnums=1)


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("kind", ["random", "ties", "-inf"])
def test_two_stage_top_k_equals_lax_top_k(kind: str, V: int) -> None:
    x = logits(kind, V, seed=V)
    for k in KS:
        values, ids = two_stage(x, k)
        want_values, want_ids = one_stage(x, k)
        np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values), err_msg=f"k={k}")
        np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids), err_msg=f"k={k}")
        assert ids.dtype == want_ids.dtype == jnp.int32


def test_two_stage_runs_on_gpus_for_large_k_and_vocabularies_only() -> None:
    assert two_stage_pays(40, 50257, "gpu") and two_stage_pays(100, 50257, "gpu")
    assert not two_stage_pays(40, 50257, "cpu")  # XLA:CPU's top-k is a partial sort of the row already
    assert not two_stage_pays(16, 50257, "gpu")  # within the GPU top-k kernel's k
    assert not two_stage_pays(40, 97, "gpu") and not two_stage_pays(40, 1500, "gpu")  # too few logits to cut
    assert not two_stage_pays(200, 50257, "gpu")  # as many candidates as logits, nearly


def top_k_widths(k: int, backend: str) -> set[int]:
    """The row widths every top_k in `top_k_candidates`' program sorts, for GPT-2's vocabulary."""
    program = jax.make_jaxpr(lambda x: top_k_candidates(x, k, backend))(jnp.zeros((4, 50257)))
    return {e.invars[0].aval.shape[-1] for e in program.eqns if e.primitive.name == "top_k"}


def test_top_k_candidates_on_a_gpu_never_sorts_a_whole_row() -> None:
    assert top_k_widths(40, "gpu") == {TOP_K_BLOCK, 99 * 40}
    assert top_k_widths(40, "cpu") == top_k_widths(16, "gpu") == {50257}
    x = logits("ties", 50257, seed=1)
    for got, want in zip(top_k_candidates(x, 40, "gpu"), jax.lax.top_k(x, 40)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
