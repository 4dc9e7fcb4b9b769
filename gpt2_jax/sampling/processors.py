"""Logit processors: how the next token is chosen from a row's logits, as small pure functions of `[B, V]` arrays.

Applied in this order (OpenAI's sample.py and Hugging Face agree on it): repetition penalty, banned ids, then either
greedy argmax (temperature 0: `argmax_ids`, none of the rest) or temperature, top-k, top-p (nucleus) and a draw. The
nucleus is computed over the k survivors of top-k only, so no per-token sort of the vocabulary happens unless top-k
is off.

Top-k on a GPU: XLA's top-k kernel there takes k <= 16 and turns a larger k (GPT-2's usual 40) into a sort of the
whole row, all 50,257 logits, every step. `two_stage_top_k` gives `lax.top_k`'s exact answer from two short sorts
instead: the top k of each block of TOP_K_BLOCK logits, then the top k of those candidates. It is exact because
the order (value descending, then id ascending: `lax.top_k`'s tie rule) ranks each of the global top k within the
top k of its own block, and the candidates lie in block order, each block's sorted, so equal values keep their ids'
order in the second stage too. Elsewhere (XLA:CPU's top-k is a partial sort of the row already) and where the
candidates would not be much fewer than the vocabulary, `lax.top_k` itself runs.
Axis legend: B batch rows, V vocabulary, C top-k candidates (sorted, descending), N vocabulary blocks, W block width.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from gpt2_jax.errors import UsageError

Array = jax.Array
TOP_K_BLOCK = 512  # two-stage top-k: 99 blocks for GPT-2's vocabulary, 3,960 candidates at k=40
GPU_TOP_K_KERNEL_MAX_K = 16  # XLA's GPU top-k kernel takes up to this k; above it, a sort of the whole row


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. Frozen and hashable: a static jit argument (a new setting compiles anew).

    temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off; repetition_penalty > 1 makes tokens
    already in the context less likely (CTRL's rule: positive logits divided, negative ones multiplied).
    """

    temperature: float = 1.0
    top_k: int = 40
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    banned_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UsageError(f"--top_k must be a whole number >= 0 (0 turns it off), got {self.top_k}.")
        if not (0 < self.top_p <= 1):
            raise UsageError(f"--top_p must lie in (0, 1] (1 turns it off), got {self.top_p}.")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UsageError(f"--repetition_penalty must be positive (1 turns it off), got {self.repetition_penalty}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits_BV: Array, seen_BV: Array, penalty: float) -> Array:
    penalised_BV = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalised_BV, logits_BV)


def ban_ids(logits_BV: Array, banned_ids: tuple[int, ...]) -> Array:
    return logits_BV.at[:, jnp.asarray(banned_ids, jnp.int32)].set(-jnp.inf)


def apply_temperature(logits: Array, temperature: float) -> Array:
    return logits / temperature


def top_k_candidates(logits_BV: Array, k: int, backend: str | None = None) -> tuple[Array, Array]:
    """The k largest logits per row, sorted descending, and their token ids (ties: lower id first): `lax.top_k`'s
    answer, in two stages where that spares a GPU (`backend`, default JAX's) a sort of the whole row."""
    k = min(k, logits_BV.shape[-1])
    if two_stage_pays(k, logits_BV.shape[-1], backend or jax.default_backend()):
        return two_stage_top_k(logits_BV, k)
    return jax.lax.top_k(logits_BV, k)


def two_stage_pays(k: int, n_vocab: int, backend: str) -> bool:
    """Only GPUs sort whole rows for top-k, only above the kernel's k, and two stages must cut the work: a row of
    8 blocks or more (a shorter one is a short sort already), at least 4x fewer candidates than logits."""
    n_blocks = -(-n_vocab // TOP_K_BLOCK)
    cuts = n_blocks >= 8 and 4 * n_blocks * k <= n_vocab
    return backend == "gpu" and k > GPU_TOP_K_KERNEL_MAX_K and cuts


def two_stage_top_k(logits_BV: Array, k: int, block: int = TOP_K_BLOCK) -> tuple[Array, Array]:
    """`lax.top_k(logits_BV, k)` exactly, ties included, from the top k of each `block` logits (k <= block)."""
    B, V = logits_BV.shape
    N = -(-V // block)
    # -inf padding ranks after every real logit, -inf ones too: their ids are larger.
    padded_BNW = jnp.pad(logits_BV, ((0, 0), (0, N * block - V)), constant_values=-jnp.inf).reshape(B, N, block)
    values_BNC, ids_BNC = jax.lax.top_k(padded_BNW, k)
    ids_BNC = ids_BNC + block * jnp.arange(N, dtype=ids_BNC.dtype)[:, None]
    values_BC, where_BC = jax.lax.top_k(values_BNC.reshape(B, N * k), k)
    return values_BC, jnp.take_along_axis(ids_BNC.reshape(B, N * k), where_BC, axis=-1)


def argmax_ids(logits_BV: Array, backend: str | None = None) -> Array:
    """Each row's largest logit's id `[B]` (int32; the lowest id of ties, a NaN first): `jnp.argmax`, which on a GPU
    is one reduction. XLA:CPU runs argmax as a slow two-operand reduction; its top-k (a custom call) gives the same
    answer about 2.5x faster there (0.1 against 0.25 ms for one row of 50,257 logits, 2-core CPU under load)."""
    if (backend or jax.default_backend()) == "cpu":
        return jax.lax.top_k(logits_BV, 1)[1][:, 0]
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def top_p_filter(sorted_logits_BC: Array, top_p: float) -> Array:
    """Keep the smallest prefix of the (descending) candidates whose probability reaches top_p; -inf the rest.

    The nucleus of Holtzman et al.: a candidate stays if the mass before it is below top_p, so the most likely
    one always stays and the one that crosses top_p is included.
    """
    probs_BC = jax.nn.softmax(sorted_logits_BC, axis=-1)
    mass_before_BC = jnp.cumsum(probs_BC, axis=-1) - probs_BC
    return jnp.where(mass_before_BC < top_p, sorted_logits_BC, -jnp.inf)


def draw(keys_B: Array, logits_BC: Array) -> Array:
    """One index per row, drawn from softmax(logits) with that row's own key."""
    return jax.vmap(jax.random.categorical)(keys_B, logits_BC)


def next_token(logits_BV: Array, keys_B: Array, seen_BV: Array | None, sampling: SamplingConfig) -> Array:
    """The next token id per row `[B]` (int32) from float32 logits, after every processor in order."""
    if sampling.repetition_penalty != 1:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, sampling.repetition_penalty)
    if sampling.banned_ids:
        logits_BV = ban_ids(logits_BV, sampling.banned_ids)
    if sampling.greedy:  # no temperature, top-k, top-p or draw: the argmax alone
        return argmax_ids(logits_BV)
    ids_BC = None
    if sampling.top_k:
        logits_BV, ids_BC = top_k_candidates(logits_BV, sampling.top_k)
    elif sampling.top_p < 1:  # nucleus over the whole vocabulary needs it sorted
        logits_BV, ids_BC = top_k_candidates(logits_BV, logits_BV.shape[-1])
    # Temperature after top-k is the same as before it (a positive scale keeps the order) and touches k values only.
    logits_BV = apply_temperature(logits_BV, sampling.temperature)
    if sampling.top_p < 1:
        logits_BV = top_p_filter(logits_BV, sampling.top_p)
    choice_B = draw(keys_B, logits_BV)
    if ids_BC is not None:
        choice_B = jnp.take_along_axis(ids_BC, choice_B[:, None], axis=-1)[:, 0]
    return choice_B.astype(jnp.int32)


def next_token_per_row(
    logits_BV: Array, keys_B: Array, temperature_B: Array, top_k_B: Array, top_p_B: Array, max_top_k: int
) -> tuple[Array, Array]:
    """`next_token` with each row's own temperature, top-k and top-p as traced arrays `[B]` (a server's rows each
    serve another request; static settings would compile anew for every new combination), and each chosen token's
    log-probability under the model's distribution at the row's temperature (OpenAI's `logprobs`; at temperature 0,
    the raw distribution), before top-k and top-p.

    Top-k takes the `max_top_k` (static) best candidates once, then masks each row past its own k (1..max_top_k);
    top-p is the nucleus over those survivors, as in `next_token`. Rows at temperature 0 take the argmax: the first
    candidate (top-k's order is argmax's, ties and NaN included), so no other pass over the vocabulary finds it.
    """
    greedy_B = temperature_B == 0
    scale_B1 = jnp.where(greedy_B, 1.0, temperature_B)[:, None]
    values_BC, ids_BC = top_k_candidates(logits_BV, max_top_k)
    values_BC = jnp.where(jnp.arange(values_BC.shape[-1]) < top_k_B[:, None], values_BC / scale_B1, -jnp.inf)
    values_BC = jnp.where(top_p_B[:, None] < 1, top_p_filter(values_BC, top_p_B[:, None]), values_BC)  # 1: off
    choice_B = draw(keys_B, values_BC)
    drawn_B = jnp.take_along_axis(ids_BC, choice_B[:, None], axis=-1)[:, 0]
    token_B = jnp.where(greedy_B, ids_BC[:, 0], drawn_B).astype(jnp.int32)
    scaled_BV = logits_BV / scale_B1
    chosen_B = jnp.take_along_axis(scaled_BV, token_B[:, None], axis=-1)[:, 0]
    return token_B, chosen_B - jax.nn.logsumexp(scaled_BV, axis=-1)
