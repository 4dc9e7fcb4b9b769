"""The device side of serving: a fixed set of rows, each decoding its own request, over `model/decode.py`'s forward.

The cache has `B` rows of `S` slots and a per-row write index (`init_cache(per_row=True)`): a row's slots are its
positions, so a request joins any free row at any time and leaves it when done, and the compiled shapes never
change: one `admit` per prompt bucket (batch 1), one `decode_rows`. `admit` runs a request's
prompt through the model alone (left-padded to its bucket, as the sampler's prefill is), rolls its keys and values
to slot 0 and writes them into the row, and draws the first token. `decode_rows` then runs `steps` single-token
steps for every row at once, the state donated, and returns each row's tokens and their log-probabilities.

Decode steps attend over the whole cache, on every backend. A window (as the sampler's on a GPU) would have to
cover the longest live row, so a row's attention would be a reduction of a length set by its neighbours, and a
different length may round differently; the whole cache of 16 rows x 1024 slots in bfloat16 is 24 layers' K and V
x 16 x 1024 x 768 x 2 bytes = 0.6 GB a step, a fraction of a millisecond at a GPU's bandwidth.

Why a row's output does not depend on its neighbours: every row's computation reads only its own slots, tokens,
settings and key (each matmul column and attention problem is one row's), the shapes are fixed, and a row's random
key is `fold_in(fold_in(key(seed), choice), drawn)`, its own count of drawn tokens, never the batch's step. A row
that is not generating computes too (the shapes are fixed) but is parked at slot 0 of its own row.
Axis legend: B rows, P prompt bucket, S cache slots, H = B*N attention problems, N heads, K head dim, V vocabulary,
C steps of one chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from gpt2_jax.config import GPT2Config
from gpt2_jax.model import kv_cache
from gpt2_jax.model.decode import DecodeWeights, forward, init_cache
from gpt2_jax.sampling.processors import next_token_per_row

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rows:
    """Every row's decoding state; lives on the device, donated from call to call."""

    cache: dict[str, Any]  # model.kv_cache's, per row: k/v or kv, valid [B, S], index [B], length [B]
    token_B: Array  # int32: the newest drawn token, not yet fed to the model
    live_B: Array  # bool: the row is generating
    drawn_B: Array  # int32: tokens the row has drawn (its random key's step)
    left_B: Array  # int32: tokens the row may still draw
    key_B: Array  # the row's PRNG key (request seed, choice index)
    temperature_B: Array  # float32; 0 = greedy
    top_k_B: Array  # int32, 1..max_top_k
    top_p_B: Array  # float32, (0, 1]


def init_rows(config: GPT2Config, batch: int, max_len: int, one_buffer: bool | None = None) -> Rows:
    """`batch` idle rows of `max_len` cache slots (`one_buffer`: the cache's layout, default the backend's)."""
    ints = lambda value: jnp.full((batch,), value, jnp.int32)  # one buffer each: they are donated one by one
    floats = lambda: jnp.ones((batch,), jnp.float32)
    keys = jax.vmap(jax.random.key)(jnp.zeros((batch,), jnp.uint32))
    cache = init_cache(config, batch, max_len, per_row=True, one_buffer=one_buffer)
    return Rows(cache, ints(0), jnp.zeros((batch,), bool), ints(0), ints(0), keys, floats(), ints(1), floats())


@dataclasses.dataclass(frozen=True)
class Settings:
    """One request's (one row's) sampling settings, checked by the protocol layer."""

    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    choice: int  # which of the request's `n` choices: folded into the key, so choices differ


@functools.partial(jax.jit, static_argnames=("config", "max_top_k"), donate_argnames=("rows",))
def admit(
    weights: DecodeWeights,
    rows: Rows,
    row: Array,
    tokens_1P: Array,
    n_real: Array,
    settings: dict[str, Array],
    eot_id: Array,
    *,
    config: GPT2Config,
    max_top_k: int,
) -> tuple[Rows, Array, Array]:
    """Prefill one prompt (left-padded: its `n_real` tokens last in `tokens_1P`) into row `row` and draw its first
    token. Returns the rows, the token and its log-probability (both `[1]`, separate buffers for the host)."""
    P = tokens_1P.shape[1]
    mask_1P = jnp.arange(P)[None] >= P - n_real
    small = init_cache(config, 1, P, one_buffer="kv" in rows.cache)
    logits_1V, small = forward(weights, config, tokens_1P, mask_1P, small, window=0)
    # The padding slots roll past the prompt (the row's slots are its positions); they are not valid, and decode
    # steps overwrite them in order.
    cache = kv_cache.put_prompt(rows.cache, small, row, P - n_real)
    cache["valid"] = cache["valid"].at[row].set(jnp.arange(cache["valid"].shape[1]) < n_real)
    cache["index"], cache["length"] = (cache[name].at[row].set(n_real) for name in ("index", "length"))
    key = jax.random.fold_in(jax.random.key(settings["seed"]), settings["choice"])
    temperature, top_k, top_p = (settings[name][None] for name in ("temperature", "top_k", "top_p"))
    token_1, logprob_1 = next_token_per_row(
        logits_1V, jax.random.fold_in(key, 0)[None], temperature, top_k, top_p, max_top_k
    )
    left = settings["max_tokens"] - 1
    rows = Rows(
        cache,
        rows.token_B.at[row].set(token_1[0]),
        rows.live_B.at[row].set((token_1[0] != eot_id) & (left > 0)),
        rows.drawn_B.at[row].set(1),
        rows.left_B.at[row].set(left),
        rows.key_B.at[row].set(key),
        rows.temperature_B.at[row].set(temperature[0]),
        rows.top_k_B.at[row].set(top_k[0]),
        rows.top_p_B.at[row].set(top_p[0]),
    )
    return _parked(rows), token_1.copy(), logprob_1


def settings_arrays(s: Settings) -> dict[str, Array]:
    """A request's settings as the arrays `admit` traces (so no setting compiles anew)."""
    return {
        "max_tokens": jnp.int32(s.max_tokens),
        "temperature": jnp.float32(s.temperature),
        "top_k": jnp.int32(s.top_k),
        "top_p": jnp.float32(s.top_p),
        "seed": jnp.uint32(s.seed % 2**32),
        "choice": jnp.int32(s.choice),
    }


@functools.partial(jax.jit, static_argnames=("config", "steps", "max_top_k"), donate_argnames=("rows",))
def decode_rows(
    weights: DecodeWeights,
    rows: Rows,
    keep_B: Array,
    eot_id: Array,
    *,
    config: GPT2Config,
    steps: int,
    max_top_k: int,
) -> tuple[Rows, Array, Array]:
    """`steps` decode steps for every row; rows not in `keep_B` (the host let them go) stop first. Returns the rows,
    each row's tokens `[B, C]` (-1 where the row was not generating) and their log-probabilities."""
    B = keep_B.shape[0]
    rows = _parked(dataclasses.replace(rows, live_B=rows.live_B & keep_B))

    def step(i: Array, carry: tuple[Rows, Array, Array]) -> tuple[Rows, Array, Array]:
        rows, tokens_BC, logprobs_BC = carry
        new_B1 = jnp.ones((B, 1), bool)
        logits_BV, cache = forward(weights, config, rows.token_B[:, None], new_B1, rows.cache)
        keys_B = jax.vmap(jax.random.fold_in)(rows.key_B, rows.drawn_B)
        token_B, logprob_B = next_token_per_row(
            logits_BV, keys_B, rows.temperature_B, rows.top_k_B, rows.top_p_B, max_top_k
        )
        live_B = rows.live_B
        tokens_BC = tokens_BC.at[:, i].set(jnp.where(live_B, token_B, -1))
        logprobs_BC = logprobs_BC.at[:, i].set(logprob_B)
        left_B = rows.left_B - live_B
        rows = dataclasses.replace(
            rows,
            cache=cache,
            token_B=jnp.where(live_B, token_B, rows.token_B),
            live_B=live_B & (token_B != eot_id) & (left_B > 0),
            drawn_B=rows.drawn_B + live_B,
            left_B=left_B,
        )
        return _parked(rows), tokens_BC, logprobs_BC

    tokens_BC = jnp.full((B, steps), -1, jnp.int32)
    logprobs_BC = jnp.zeros((B, steps), jnp.float32)
    return jax.lax.fori_loop(0, steps, step, (rows, tokens_BC, logprobs_BC))


def _parked(rows: Rows) -> Rows:
    """Rows not generating write at slot 0 of their own row, at position 0: their (discarded) steps stay in bounds."""
    cache = dict(rows.cache)
    for name in ("index", "length"):
        cache[name] = jnp.where(rows.live_B, cache[name], 0)
    return dataclasses.replace(rows, cache=cache)
