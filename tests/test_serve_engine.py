"""The server's device side and engine, in process: per-row cache positions against the shared-index forward, per-row
sampling settings, and a request that draws the same tokens alone or among others, with no compile after warm-up."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerance import ulps

from gpt2_jax.config import get_config
from gpt2_jax.model.decode import decode_weights, forward, init_cache
from gpt2_jax.model.transformer import init_params
from gpt2_jax.sampling.generate import left_pad
from gpt2_jax.sampling.processors import next_token_per_row
from gpt2_jax.serving import rows as device
from gpt2_jax.serving.engine import Engine, Job
from gpt2_jax.serving.rows import Settings
from gpt2_jax.tokenizers.gpt2_bpe import load_tokenizer

CONFIG = get_config("tiny")
EOT = 50256


@pytest.fixture(scope="module")
def weights():
    return decode_weights(init_params(CONFIG, 0), CONFIG)


def test_rows_at_their_own_positions_decode_as_the_shared_index_cache_does(weights):
    """Two prompts of different lengths, greedy: admitted one by one into a per-row cache and decoded there, they
    give the tokens and log-probabilities of the sampler's layout (left-padded batch, shared index)."""
    prompts, steps = [[11, 12, 13, 14, 15], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]], 6
    tokens_BT, mask_BT = left_pad(prompts, 32, EOT)
    cache = init_cache(CONFIG, 2, 64)
    logits_BV, cache = forward(weights, CONFIG, tokens_BT, mask_BT, cache)
    want_tokens, want_logprobs = [], []
    for _ in range(steps + 1):
        token_B = jnp.argmax(logits_BV, axis=-1)
        want_tokens.append(token_B)
        want_logprobs.append(jnp.take_along_axis(jax.nn.log_softmax(logits_BV), token_B[:, None], axis=-1)[:, 0])
        logits_BV, cache = forward(weights, CONFIG, token_B[:, None].astype(jnp.int32), jnp.ones((2, 1), bool), cache)

    rows = device.init_rows(CONFIG, 3, 64)  # a spare row that stays idle
    static = dict(config=CONFIG, max_top_k=40)
    got_tokens, got_logprobs = [], []
    for row, prompt in enumerate(prompts):
        padded = np.asarray(left_pad([prompt], 16 if len(prompt) <= 16 else 32, EOT)[0])
        settings = device.settings_arrays(Settings(steps + 1, 0.0, 40, 1.0, 0, 0))
        rows, token, logprob = device.admit(
            weights, rows, np.int32(row), padded, np.int32(len(prompt)), settings, np.int32(EOT), **static
        )
        got_tokens.append(np.asarray(token))
        got_logprobs.append(np.asarray(logprob))
    keep = np.asarray([True, True, False])
    rows, tokens_BC, logprobs_BC = device.decode_rows(weights, rows, keep, np.int32(EOT), steps=steps, **static)
    want_tokens, want_logprobs = np.stack(want_tokens, 1), np.stack(want_logprobs, 1)
    got_tokens = np.concatenate([np.concatenate(got_tokens)[:, None], np.asarray(tokens_BC)[:2]], axis=1)
    got_logprobs = np.concatenate([np.concatenate(got_logprobs)[:, None], np.asarray(logprobs_BC)[:2]], axis=1)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    np.testing.assert_allclose(got_logprobs, want_logprobs, rtol=1e-5, atol=1e-5)
    assert (np.asarray(tokens_BC)[2] == -1).all()  # the idle row drew nothing


def test_each_row_samples_with_its_own_settings():
    logits_BV = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    keys_B = jax.random.split(jax.random.key(1), 4)
    temperature_B = jnp.asarray([0.0, 1.0, 0.7, 2.0])
    top_k_B, top_p_B = jnp.asarray([40, 1, 3, 40]), jnp.asarray([1.0, 1.0, 1.0, 0.05])
    token_B, logprob_B = next_token_per_row(logits_BV, keys_B, temperature_B, top_k_B, top_p_B, 10)
    argmax_B = jnp.argmax(logits_BV, axis=-1)
    # greedy; top_k 1; top_p so small that only the likeliest stays: all the argmax
    np.testing.assert_array_equal(token_B[jnp.asarray([0, 1, 3])], argmax_B[jnp.asarray([0, 1, 3])])
    assert int(token_B[2]) in set(jax.lax.top_k(logits_BV[2], 3)[1].tolist())
    # OpenAI's logprob: the chosen token under the model's distribution at the row's temperature (0: raw)
    scale_B = jnp.where(temperature_B == 0, 1.0, temperature_B)[:, None]
    want = jnp.take_along_axis(jax.nn.log_softmax(logits_BV / scale_B), token_B[:, None], axis=-1)[:, 0]
    # logsumexp against log_softmax: the 50 exps (the max's is 1) summed in other orders move log(sum) by up to 50 eps,
    # and each subtracts the max at another point: 2 ulps of the scaled logits.
    scaled_BV = logits_BV / scale_B
    np.testing.assert_allclose(logprob_B, want, rtol=0, atol=ulps(1.0, scaled_BV.shape[-1]) + ulps(scaled_BV, 2))
    draws = {
        int(next_token_per_row(logits_BV[2:3], k[None], temperature_B[2:3], top_k_B[2:3], top_p_B[2:3], 10)[0][0])
        for k in jax.random.split(jax.random.key(2), 40)
    }
    assert draws == set(jax.lax.top_k(logits_BV[2], 3)[1].tolist())  # exactly its own k candidates


def run_jobs(engine: Engine, specs: list[tuple[list[int], Settings]]) -> list[tuple[str, list[float], str]]:
    """Submit one job per spec; each one's (text, logprobs, finish_reason) once all have finished."""
    pieces: list[list] = [[] for _ in specs]
    done = threading.Semaphore(0)

    def sink(i: int):
        def put(piece) -> None:
            assert not isinstance(piece, Exception), piece
            pieces[i].append(piece)
            if piece.finish_reason:
                done.release()

        return put

    engine.submit([Job(prompt, settings, (), sink(i)) for i, (prompt, settings) in enumerate(specs)])
    for _ in specs:
        assert done.acquire(timeout=120), "the engine did not finish in 120 s"
    return [("".join(p.text for p in ps), [lp for p in ps for lp in p.logprobs], ps[-1].finish_reason) for ps in pieces]


def test_a_request_draws_the_same_tokens_alone_or_among_others_and_nothing_compiles_after_warm_up(weights):
    tokenizer = load_tokenizer(None)
    engine = Engine(weights, CONFIG, tokenizer, max_batch=3, max_len=64, chunk=3, max_queue=16)
    engine.warm_up()
    compiled = engine.compiled()
    assert compiled >= 4  # prefill at 16, 32, 64 tokens and the decode chunk (jit's count is readable here)
    engine.start()
    try:
        ours = (tokenizer.encode("The meaning of life is"), Settings(20, 0.8, 20, 0.9, 5, 1))
        alone = run_jobs(engine, [ours])[0]
        assert alone[2] == "length" and len(alone[1]) == 20
        others = [
            (tokenizer.encode("Hello"), Settings(7, 1.0, 40, 1.0, 1, 0)),
            (tokenizer.encode("x " * 20), Settings(30, 0.0, 40, 1.0, 2, 0)),  # a 32-token bucket
            (tokenizer.encode("Once upon a time"), Settings(11, 1.5, 5, 0.5, 3, 0)),
            ours,  # joins mid-way, at some chunk boundary, beside rows at other positions
            (tokenizer.encode("y " * 40), Settings(9, 0.5, 100, 1.0, 4, 2)),  # 64-token bucket
            (tokenizer.encode("z"), Settings(13, 1.0, 1, 1.0, 6, 0)),
        ]
        together = run_jobs(engine, others)
        assert together[3] == alone
        assert together[:3] != [alone] * 3
        assert engine.compiled() == compiled  # varied prompts, lengths and settings: no new compile
        assert engine.stats() == {"active_rows": 0, "waiting": 0, "max_batch": 3, "cancelled": 0}
    finally:
        assert engine.close(timeout=60)
