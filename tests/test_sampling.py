"""The sampler: processors against numpy, greedy decoding against Hugging Face PyTorch `generate`, the sliding
window against a step-by-step reference, stops, seeds, streaming and shape buckets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import hf_model_from_params

from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.model.decode import decode_weights
from gpt2_jax.model.transformer import abstract_params
from gpt2_jax.sampling.generate import STOP_EOT, STOP_LENGTH, STOP_STRING, Request, generate_tokens
from gpt2_jax.sampling.loop import decode_chunk, prefill_and_sample
from gpt2_jax.sampling.processors import SamplingConfig, argmax_ids, next_token, next_token_per_row
from gpt2_jax.sampling.sampler import Sampler, generate_text
from gpt2_jax.sampling.text import RowText
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer

GREEDY = SamplingConfig(temperature=0)
NO_EOT = -1  # an id the model never draws: rows run to `length`


def lively_params(config: GPT2Config, seed: int) -> dict:
    """Random weights scaled so that greedy decoding keeps changing token (with GPT-2's small init a tiny model
    repeats one token forever, which would make the comparisons below weak)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, noise = path[-1].key, rng.normal(size=leaf.shape).astype(np.float32)
        if name in ("wte", "wpe"):
            return 0.5 * noise
        if name in ("g", "b"):
            return (name == "g") + 0.1 * noise
        return 3 * noise / np.sqrt(leaf.shape[-2])

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


def tokens(params, config: GPT2Config, prompts, *, length: int, sampling=GREEDY, seed=0, eot_id=NO_EOT, window=None):
    """`generate_tokens` on `params`, laid out for decoding."""
    request = Request(length, sampling, seed, eot_id, window=window)
    return generate_tokens(decode_weights(params, config), config, prompts, request)


@pytest.fixture(scope="module")
def small():
    """An odd little GPT-2 (3 heads of 16) with a 97-token vocabulary, and its PyTorch twin."""
    config = GPT2Config(n_vocab=97, n_ctx=64, n_embd=48, n_head=3, n_layer=2)
    params = lively_params(config, 1)
    return config, params, hf_model_from_params(params, config)


@pytest.fixture(scope="module")
def gpt2_vocab():
    """GPT-2's real vocabulary on a tiny random model, for tests that need text: config, params and its sampler."""
    config = GPT2Config(n_vocab=50257, n_ctx=64, n_embd=32, n_head=2, n_layer=1)
    params, tokenizer = lively_params(config, 2), gpt2_tokenizer()
    return config, params, Sampler(params, config, tokenizer)


def hf_greedy(model, prompts: list[list[int]], length: int) -> list[list[int]]:
    """Hugging Face greedy `generate` on a left-padded batch with its attention mask."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=length, pad_token_id=0, eos_token_id=None
        )
    return out[:, width:].tolist()


# --- against Hugging Face --------------------------------------------------------------------------------------
PROMPTS = [np.random.default_rng(0).integers(0, 97, n).tolist() for n in (1, 6, 13, 20)]
LENGTH = 24


@pytest.fixture(scope="module")
def greedy_rows(small):
    """Our greedy continuations of PROMPTS, decoded as one left-padded batch (rows run to LENGTH)."""
    config, params, _ = small
    return tokens(params, config, PROMPTS, length=LENGTH)


def test_greedy_equals_hf_generate_batched_with_padding(small, greedy_rows):
    _, _, model = small
    assert [reason for _, reason in greedy_rows] == [STOP_LENGTH] * 4
    assert [tokens for tokens, _ in greedy_rows] == hf_greedy(model, PROMPTS, LENGTH)
    # The padded batch gives what each prompt gives alone, unpadded, in the reference.
    for prompt, (tokens, _) in zip(PROMPTS, greedy_rows):
        assert hf_greedy(model, [prompt], LENGTH) == [tokens]


def test_top_k_1_equals_greedy(small, greedy_rows):
    config, params, _ = small
    top1 = SamplingConfig(top_k=1)
    assert tokens(params, config, PROMPTS, length=LENGTH, sampling=top1, seed=3) == greedy_rows


def reference_window_greedy(model, prompt: list[int], length: int, n_ctx: int, window: int) -> list[int]:
    """The sliding window done naively: a full PyTorch forward over context[start:] for every new token."""
    context = list(prompt)
    start = max(0, len(context) - n_ctx)
    for _ in range(length):
        with torch.no_grad():
            logits = model(torch.tensor([context[start:]])).logits[0, -1]
        context.append(int(torch.argmax(logits)))
        if len(context) - start > n_ctx:
            start = len(context) - window
    return context[len(prompt) :]


def test_sliding_window_equals_step_by_step_reference(small, capsys):
    config, params, _ = small
    short = GPT2Config(**{**config.to_hparams(), "n_ctx": 16})
    params16 = dict(params, wpe=params["wpe"][:16])
    model16 = hf_model_from_params(params16, short)
    prompts = [[1, 2, 3, 4, 5], list(range(20))]  # the second is longer than the context
    out = tokens(params16, short, prompts, length=40, window=6)
    for prompt, (ids, reason) in zip(prompts, out):
        assert reason == STOP_LENGTH
        assert ids == reference_window_greedy(model16, prompt, 40, n_ctx=16, window=6)
    assert "longer than the model's context" in capsys.readouterr().err


def test_prompt_ids_outside_the_vocabulary_are_a_user_error(small):
    config, params, _ = small
    with pytest.raises(UserError, match="outside this model's vocabulary"):
        tokens(params, config, [[5, 500]], length=3)


# --- processors --------------------------------------------------------------------------------------------------
def allowed_set(logits: np.ndarray, top_k: int, top_p: float, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Token ids that top-k then top-p keep, and their renormalised probabilities (numpy, float64)."""
    order = np.argsort(-logits, kind="stable")
    if top_k:
        order = order[:top_k]
    z = logits[order].astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    keep = (np.cumsum(probs) - probs) < top_p
    kept = order[keep]
    p = probs[keep] / probs[keep].sum()
    return kept, p


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 0.6, 1.0), (8, 0.7, 0.5), (3, 0.01, 2.0)])
def test_sampled_tokens_stay_in_the_top_k_top_p_set(top_k, top_p, temperature):
    rng = np.random.default_rng(top_k)
    logits_BV = rng.normal(size=(4, 200)).astype(np.float32) * 3
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    keys = jax.random.split(jax.random.key(0), 400)
    draws = jax.jit(jax.vmap(lambda k, x: next_token(x, jnp.stack([k] * 4), None, sampling), (0, None)))
    tokens = np.asarray(draws(keys, logits_BV))  # [400 draws, 4 rows]
    for row in range(4):
        kept, _ = allowed_set(logits_BV[row], top_k, top_p, temperature)
        assert set(tokens[:, row]) <= set(kept.tolist())
        if top_p == 0.01:
            assert set(tokens[:, row]) == {int(np.argmax(logits_BV[row]))}


def test_frequencies_match_the_renormalised_distribution():
    logits = np.random.default_rng(1).normal(size=60).astype(np.float32)
    sampling = SamplingConfig(temperature=0.7, top_k=12, top_p=0.85)
    n = 40_000
    keys = jax.random.split(jax.random.key(7), n)
    tokens = np.asarray(jax.jit(lambda k: next_token(jnp.broadcast_to(logits, (n, 60)), k, None, sampling))(keys))
    kept, p = allowed_set(logits, 12, 0.85, 0.7)
    freq = np.bincount(tokens, minlength=60) / n
    assert freq[np.setdiff1d(np.arange(60), kept)].sum() == 0
    # Each frequency is a binomial mean: its standard error is sqrt(p(1-p)/n); allow 4.5 of them (and a floor).
    bound = 4.5 * np.sqrt(p * (1 - p) / n) + 1e-4
    assert np.all(np.abs(freq[kept] - p) <= bound), (freq[kept], p)


def test_repetition_penalty_and_banned_ids():
    logits = jnp.array([[2.0, -1.0, 0.5, 3.0, 1.0]])
    seen = jnp.array([[True, True, False, False, False]])
    penalised = SamplingConfig(temperature=0, repetition_penalty=2.0)
    # seen tokens: 2.0 -> 1.0 and -1.0 -> -2.0, so greedy still picks 3
    assert int(next_token(logits, None, seen, penalised)[0]) == 3
    banned = SamplingConfig(temperature=0, repetition_penalty=2.0, banned_ids=(3,))
    assert int(next_token(logits, None, seen, banned)[0]) == 0  # 1.0 ties 4's 1.0: the lower id wins
    keys = jax.random.split(jax.random.key(0), 1)
    for _ in range(3):
        assert int(next_token(logits, keys, None, SamplingConfig(top_k=2, banned_ids=(0, 3)))[0]) in (2, 4)


def test_greedy_takes_top_k_1s_token_ties_and_nan_included():
    """Greedy is argmax alone (`argmax_ids`: top-k 1 on a CPU, argmax elsewhere), the server's greedy rows the first
    top-k candidate: all the same token, the lowest id of ties, a NaN first, id 0 when nothing is drawable."""
    logits_BV = np.random.default_rng(5).integers(-2, 3, size=(6, 50)).astype(np.float32)  # many ties for the max
    logits_BV[4, [7, 30]] = np.nan
    logits_BV[5] = -np.inf
    logits_BV = jnp.asarray(logits_BV)
    top_1 = jax.lax.top_k(logits_BV, 1)[1][:, 0]
    assert top_1.tolist()[4:] == [7, 0] and top_1.tolist()[:4] == np.argmax(np.asarray(logits_BV[:4]), -1).tolist()
    for backend in ("cpu", "gpu"):
        np.testing.assert_array_equal(argmax_ids(logits_BV, backend), top_1)
    keys_B = jax.random.split(jax.random.key(0), 6)
    greedy = next_token(logits_BV, keys_B, None, GREEDY)
    np.testing.assert_array_equal(greedy, next_token(logits_BV, keys_B, None, SamplingConfig(top_k=1)))
    per_row, _ = next_token_per_row(logits_BV, keys_B, jnp.zeros(6), jnp.full(6, 40), jnp.ones(6), 40)
    np.testing.assert_array_equal(per_row, top_1)


@pytest.mark.parametrize(
    "kwargs", [dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(temperature=-0.1), dict(repetition_penalty=0)]
)
def test_out_of_range_settings_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        SamplingConfig(**kwargs)


# --- stops, seeds, streaming, buckets --------------------------------------------------------------------------
def test_end_of_text_stops_only_its_row(small, greedy_rows):
    config, params, _ = small
    first = greedy_rows[1][0]
    cut = next(i for i in range(1, LENGTH) if first[i] not in first[:i])  # a token the row draws for the first time
    eot = first[cut]
    out = tokens(params, config, PROMPTS, length=LENGTH, eot_id=eot)
    assert out[1] == (first[:cut], STOP_EOT)
    for (ids, _), got in zip(greedy_rows, out):
        assert got == ((ids[: ids.index(eot)], STOP_EOT) if eot in ids else (ids, STOP_LENGTH))


def test_stop_strings_cut_text_and_tokens(gpt2_vocab):
    _, _, sampler = gpt2_vocab

    def second_sample(**kw):
        return list(sampler.samples(["Once"], nsamples=2, length=30, seed=4, **kw))[1]

    free = second_sample()
    stop = free.text[12:15]
    first = free.text.find(stop)
    stopped = second_sample(stop=["never in it", stop])
    assert stopped.stop_reason == STOP_STRING
    assert stopped.text == free.text[:first]
    assert stopped.tokens == free.tokens[: len(stopped.tokens)]
    decode = sampler.tokenizer.decode
    assert len(decode(stopped.tokens[:-1])) < first <= len(decode(stopped.tokens))


def test_row_text_holds_back_partial_characters_and_stop_prefixes(gpt2_vocab):
    tokenizer = gpt2_vocab[2].tokenizer
    ids = tokenizer.encode("ab 🙂 cdEND tail")
    text = RowText(tokenizer, ["END"])
    shown = ""
    for i in ids:  # one token at a time, as a stream would
        text.extend([i])
        piece = text.new_text()
        assert "\ufffd" not in piece
        shown += piece
    assert text.stop_reason == STOP_STRING and text.text == "ab 🙂 cd"
    assert shown + text.new_text(final=True) == "ab 🙂 cd"


def test_same_seed_same_samples_whatever_the_batching(gpt2_vocab):
    _, _, sampler = gpt2_vocab

    def texts(**kw):
        return [s.text for s in sampler.samples(["A", ""], nsamples=2, length=12, **kw)]

    one_batch = texts(seed=5)
    assert texts(seed=5, batch_size=2) == one_batch
    assert texts(seed=6) != one_batch
    assert len(set(one_batch)) == 4


def test_streamed_text_equals_the_final_text(gpt2_vocab):
    _, _, sampler = gpt2_vocab
    pieces: dict[int, list[str]] = {}
    on_text = lambda j, t: pieces.setdefault(j, []).append(t)
    samples = list(sampler.samples(["Hi"], nsamples=3, batch_size=2, length=40, seed=1, on_text=on_text))
    assert sorted(pieces) == [0, 2]  # the first sample of each batch streams; the last batch has a spare row
    for j in (0, 2):
        assert "".join(pieces[j]) == samples[j].text
        assert len(pieces[j]) > 2  # in several chunks


def test_prompt_lengths_in_one_bucket_share_the_compiled_functions(small, greedy_rows):
    config, params, _ = small
    before = prefill_and_sample._cache_size(), decode_chunk._cache_size()
    for n in (17, 25, 32):  # PROMPTS' longest (20) put them in the 32-token bucket too
        tokens(params, config, [[1] * n] * 4, length=LENGTH - 5)
    assert (prefill_and_sample._cache_size(), decode_chunk._cache_size()) == before


MULTI_DEVICE_SCRIPT = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from gpt2_jax.config import GPT2Config
from gpt2_jax import generate_text
from gpt2_jax.model.transformer import abstract_params
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer
config = GPT2Config(**json.loads(sys.argv[1]))
leaves = list(np.load(sys.argv[2]).values())
params = jax.tree.unflatten(jax.tree.structure(abstract_params(config)), leaves)
mesh = Mesh(np.array(jax.devices()), ("data",))
params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))  # replicated, as the training loop holds them
texts = generate_text(params, config, gpt2_tokenizer(), ["A", ""], nsamples_per_prompt=2, length=10, seed=9)
print(json.dumps([jax.device_count(), texts]))
"""


def test_same_seed_same_samples_on_one_device_or_several(gpt2_vocab, tmp_path):
    config, params, sampler = gpt2_vocab
    np.savez(tmp_path / "params.npz", *jax.tree.leaves(params))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", MULTI_DEVICE_SCRIPT, json.dumps(config.to_hparams()), str(tmp_path / "params.npz")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    here = generate_text(params, config, sampler.tokenizer, ["A", ""], nsamples_per_prompt=2, length=10, seed=9)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == [4, here]
