"""The topk part: what choosing the top k logits costs on a GPU, per way of doing it: the draw's share of a decode
step (once benchmarks/gpu_topk.py).

    python -m benchmarks.gpu.topk [--batches 1,64] [--k 40] [--json out.json]      # alone

The decode profile (`benchmarks.gpu.profile --job decode`, H200, 124M bf16) put top-k 40 sampling at 0.05 ms of a
0.43 ms batch-1 step and 0.17 ms of 0.75 ms at batch 64, most of it one segmented sort. Each variant here picks the
k largest of [B, 50257] float32 logits made by a bf16 head matmul (as in the decode loop: the pattern XLA sees
decides whether it calls a top-k kernel or sorts), 200 times inside one jitted loop (the activations shifted every
iteration so nothing is hoisted), timed after a compile, median of 5; `argmax` (greedy) is the baseline that the
head matmul alone costs, and `extra us` is each variant's time over it:
  full       `lax.top_k` over the whole row (XLA sorts it for k > 16)
  two_stage  what the sampler runs on GPUs (`processors.two_stage_top_k`: top k of each block of 512, then of those)
  block16    XLA's top-k kernel (k <= 16) per block of 512, then the top k of the 16 per block: exact only where
             no block holds more than 16 of the row's top k; `exact %` counts that on GPT-2-like logits (random
             normal, scale 3) and on the same logits sorted by id (the worst case: the top k in one or two blocks)
  unstable   `lax.top_k(..., is_stable=False)`, which newer XLA routes to a radix select on GPUs instead of a sort
             (only where the running jax's top_k takes `is_stable`): the sampler may use it only if ties give the
             set it defines (lower id first), so `unstable ties %` counts the rows of heavily tied logits (rounded
             to 0.5) whose chosen ids are `full`'s, as a set and in order
Every variant's values are checked against `full` (the ids too where no logits tie).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu.common import Sizes, record
from gpt2_jax.sampling.processors import TOP_K_BLOCK, two_stage_top_k

N_VOCAB = 50257
ITERATIONS = 200


def block16_top_k(logits_BV: jax.Array, k: int, block: int = TOP_K_BLOCK) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(values, ids, exact_B): the top k from each block's top 16, and whether that is provably the true top k."""
    B, V = logits_BV.shape
    N = -(-V // block)
    padded_BNW = jnp.pad(logits_BV, ((0, 0), (0, N * block - V)), constant_values=-jnp.inf).reshape(B, N, block)
    values_BNC, ids_BNC = jax.lax.top_k(padded_BNW, 16)
    ids_BNC = ids_BNC + block * jnp.arange(N, dtype=ids_BNC.dtype)[:, None]
    values_BK, where_BK = jax.lax.top_k(values_BNC.reshape(B, N * 16), k)
    # A block whose 16th value still reaches the k-th chosen one may hold a 17th that belongs in the top k.
    exact_B = jnp.all(values_BNC[:, :, -1] < values_BK[:, -1:], axis=-1)
    return values_BK, jnp.take_along_axis(ids_BNC.reshape(B, N * 16), where_BK, axis=-1), exact_B


VARIANTS = {
    "argmax": lambda x, k: (jnp.max(x, axis=-1, keepdims=True), jnp.argmax(x, axis=-1, keepdims=True)),
    "full": lambda x, k: jax.lax.top_k(x, k),
    "two_stage": two_stage_top_k,
    "block16": lambda x, k: block16_top_k(x, k)[:2],
}
if "is_stable" in inspect.signature(jax.lax.top_k).parameters:  # jax 0.10.2 has no such argument
    VARIANTS["unstable"] = lambda x, k: jax.lax.top_k(x, k, is_stable=False)


def tie_agreement(logits_BV: jax.Array, k: int, variant: str) -> dict[str, float]:
    """Of rows of heavily tied logits (rounded to 0.5, so dozens share each value near the top), the fraction whose
    top-k ids by `variant` are `full`'s as a set, and in the same order."""
    tied_BV = jnp.round(logits_BV * 2) / 2
    ids = np.asarray(VARIANTS[variant](tied_BV, k)[1])
    reference = np.asarray(jax.lax.top_k(tied_BV, k)[1])
    same_set = [set(a) == set(b) for a, b in zip(ids, reference)]
    return {"set": float(np.mean(same_set)), "order": float(np.mean(np.all(ids == reference, axis=-1)))}


@functools.partial(jax.jit, static_argnames=("variant", "k", "iterations"))
def repeated(x_BD: jax.Array, head_DV: jax.Array, variant: str, k: int, iterations: int = ITERATIONS) -> jax.Array:
    def body(i, total):
        logits_BV = jnp.dot((x_BD + i.astype(x_BD.dtype) * 1e-3).astype(head_DV.dtype), head_DV)
        values, ids = VARIANTS[variant](logits_BV.astype(jnp.float32), k)
        # All k of both used, as the sampler uses them: reading one slot lets XLA fold the top-k's prefix slice into
        # that slot's, and a sort with no prefix slice after it is no longer rewritten into a top-k call.
        return total + values.sum() + ids.sum().astype(jnp.float32)

    return jax.lax.fori_loop(0, iterations, body, jnp.float32(0))


def time_variant(x_BD: jax.Array, head_DV: jax.Array, variant: str, k: int, iterations: int = ITERATIONS) -> float:
    """Microseconds per head matmul + top-k, median of 5 timed loops after a compile and a warm-up."""
    jax.block_until_ready(repeated(x_BD, head_DV, variant, k, iterations))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(repeated(x_BD, head_DV, variant, k, iterations))
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times)) / iterations


def measure(batches: list[int], k: int, iterations: int = ITERATIONS) -> dict:
    """Every variant at every batch (see the module doc), each checked against `full` first."""
    rng = np.random.default_rng(0)
    results = {"device": jax.devices()[0].device_kind, "k": k, "iterations": iterations, "points": []}
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    head_DV = jnp.asarray(rng.standard_normal((768, N_VOCAB)) / 768**0.5, dtype)
    for batch in batches:
        logits_BV = jnp.asarray(3 * rng.standard_normal((batch, N_VOCAB)), jnp.float32)
        reference_values, reference_ids = jax.lax.top_k(logits_BV, k)
        x_BD = jnp.asarray(3 * rng.standard_normal((batch, 768)), jnp.float32)
        baseline = None
        for variant in VARIANTS:
            same = None
            if variant != "argmax":
                values, ids = VARIANTS[variant](logits_BV, k)
                same = np.array_equal(np.asarray(values), np.asarray(reference_values))
                same = same and np.array_equal(np.asarray(ids), np.asarray(reference_ids))
                # The exact ways must agree; the unstable one is measured either way, its answer recorded.
                assert same or variant == "unstable", variant
            us = time_variant(x_BD, head_DV, variant, k, iterations)
            baseline = us if baseline is None else baseline
            point = {"batch": batch, "variant": variant, "us_per_call": us, "extra_us": us - baseline}
            if same is not None:
                point["same_as_full"] = bool(same)
            results["points"].append(point)
            print(f"batch {batch:3d} {variant:10s} {us:8.1f} us, extra {us - baseline:7.1f} us", flush=True)
        exact = np.asarray(block16_top_k(logits_BV, k)[2])
        worst = np.asarray(block16_top_k(jnp.sort(logits_BV, axis=-1), k)[2])
        results[f"block16_exact_batch{batch}"] = {"random": float(exact.mean()), "sorted_by_id": float(worst.mean())}
        print(f"batch {batch:3d} block16 exact: {100 * exact.mean():.0f}% random, {100 * worst.mean():.0f}% sorted")
        if "unstable" in VARIANTS:
            ties = results[f"unstable_ties_batch{batch}"] = tie_agreement(logits_BV, k, "unstable")
            same = f"{100 * ties['set']:.0f}% same set, {100 * ties['order']:.0f}% same order"
            print(f"batch {batch:3d} unstable ties: {same}")
        else:
            print(f"batch {batch:3d} unstable: not measured (jax {jax.__version__}'s top_k has no is_stable)")
    return results


def run(out: str, work: str, sizes: Sizes) -> None:
    batches, iterations = sizes.topk
    record(out, "topk", **measure(list(batches), 40, iterations))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = measure([int(b) for b in args.batches.split(",")], args.k)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
