"""The GPU call's top-k part: its tie check tells a selection that keeps the sampler's tie rule (lower id first)
from one that does not, so an unstable (radix) top-k measured on a card is judged by it before the sampler uses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu import topk


def higher_id_first(logits_BV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The top k with ties broken the other way: a selection the sampler must not take."""
    V = logits_BV.shape[-1]
    values, ids = jax.lax.top_k(logits_BV[:, ::-1], k)
    return values, V - 1 - ids


def test_tie_check_accepts_the_samplers_rule_and_catches_another(monkeypatch):
    logits_BV = jnp.asarray(3 * np.random.default_rng(0).standard_normal((4, topk.N_VOCAB)), jnp.float32)
    monkeypatch.setitem(topk.VARIANTS, "higher_id_first", higher_id_first)
    assert topk.tie_agreement(logits_BV, 40, "two_stage") == {"set": 1.0, "order": 1.0}
    other = topk.tie_agreement(logits_BV, 40, "higher_id_first")
    assert other["set"] < 1 and other["order"] < 1
    # Without ties every one agrees: the check is about ties alone.
    ids = higher_id_first(logits_BV, 40)[1]
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(jax.lax.top_k(logits_BV, 40)[1]))


def test_the_unstable_variant_exists_exactly_where_top_k_takes_is_stable():
    import inspect

    assert ("unstable" in topk.VARIANTS) == ("is_stable" in inspect.signature(jax.lax.top_k).parameters)
