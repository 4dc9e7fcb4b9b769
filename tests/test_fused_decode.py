"""The fused decode layers (`model/fused_decode.py`) in Pallas' interpret mode on the CPU, against XLA's.

- each kernel against `decode.py`'s and `ops.py`'s math: float32 within 1e-5, bfloat16 within the bfloat16 decode
  parity bound of tests/test_decoding.py (units of 2^-8 times the largest value);
- the forward with kernels="pallas" over the one buffer against kernels="xla": a left-padded prefill and steps;
- greedy decoding through the sampler's loop (blocks of masked steps, as on a GPU): the same tokens;
- the fused decode loop writes its one buffer in place once per step, with no copy of it;
- the decode loop with kernels="pallas" lowers for CUDA (jax.export, no GPU needed) with 5 Pallas calls per layer,
  each one kernel: the step's Pallas kernels are 5 * n_layer;
- the XLA path is what it was: the same program with kernels="xla" as with the default, and wherever the fused
  layers do not apply (the CPU's per-layer cache, more than MAX_COLUMNS new tokens, a server's per-row cache).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import random_params
from test_decoding import BOUND_U

from benchmarks import kernels
from gpt2_jax.config import GPT2Config, get_config
from gpt2_jax.model import decode, fused_decode, kv_cache, ops
from gpt2_jax.model.transformer import abstract_params
from gpt2_jax.sampling.loop import DecodeState, decode_chunk, prefill_and_sample
from gpt2_jax.sampling.processors import SamplingConfig

CFG = GPT2Config(n_vocab=97, n_ctx=32, n_embd=48, n_head=3, n_layer=2)  # 3 heads of 16; 48 loads as 3 tiles of 16
BF16 = CFG.replace(dtype="bfloat16")
EPS = CFG.layer_norm_epsilon
ATOL = 1e-5
GPU = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")  # ops.traced_for's stand-in
TRITON = "__gpu$xla.gpu.triton"
NEEDS_TRITON = pytest.mark.skipif(fused_decode.pltriton is None, reason="this JAX has no Pallas Triton backend")


@contextlib.contextmanager
def traced_for_a_gpu() -> Iterator[None]:
    """Trace and lower as for an H100 on this CPU: the forward's choices by `ops.traced_for`, and for Pallas' Triton
    lowering, which asks the device for its compute capability (jax 0.12 refuses without a GPU), an abstract mesh
    on an abstract H100 (jax 0.10 reads no such thing and lowers anyway)."""
    h100 = jax.sharding.AbstractDevice(device_kind=GPU.device_kind, num_cores=132, platform="gpu")
    # One device, its axis Auto: the mesh names the device and shards nothing (Explicit axes would type shardings).
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), (jax.sharding.AxisType.Auto,), abstract_device=h100)
    with ops.traced_for(GPU), jax.sharding.use_abstract_mesh(mesh):
        yield


def bf16_bound(reference) -> float:
    return BOUND_U["bfloat16"]["bfloat16"] * 2.0**-8 * float(np.max(np.abs(np.asarray(reference, np.float32))))


def assert_close(got, want, dtype: str) -> None:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    bound = ATOL if dtype == "float32" else bf16_bound(want)
    assert float(np.max(np.abs(got - want))) <= bound


def normal(shape, seed, dtype="float32", scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), dtype)


def linear_params(n_out, n_in, seed, dtype):
    return {"w_OI": normal((n_out, n_in), seed, dtype, n_in**-0.5), "b": normal((n_out,), seed + 1, dtype, 0.1)}


# --- each kernel ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gelu", [False, True])
def test_layer_norm_linear_kernel(dtype, gelu, monkeypatch):
    """3 tiles of 16 input features: unrolled, and (with GELU) in a fori_loop, as longer rows run."""
    monkeypatch.setattr(fused_decode, "MAX_UNROLL", 1 if gelu else fused_decode.MAX_UNROLL)
    D, M = 48, 3
    x_DM = normal((D, M), 0, dtype, 2.0) + 0.5
    ln = {"g": normal((D,), 1), "b": normal((D,), 2, scale=0.1)}
    p = linear_params(3 * D, D, 3, dtype)
    got = jax.jit(lambda x: fused_decode.ln_linear(x, ln, p, EPS, gelu=gelu))(x_DM)
    want = decode.linear(decode.layer_norm(x_DM, ln, EPS, jnp.dtype(dtype)), p)
    assert got.dtype == jnp.dtype(dtype)
    assert_close(got, ops.gelu(want) if gelu else want, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_residual_kernel(dtype):
    D, F, M = 48, 192, 2
    a_FM, x_DM = normal((F, M), 4, dtype), normal((D, M), 5, dtype)
    p = linear_params(D, F, 6, dtype)
    got = jax.jit(fused_decode.linear_residual)(a_FM, x_DM, p)
    assert got.dtype == jnp.dtype(dtype)
    assert_close(got, x_DM + decode.linear(a_FM, p), dtype)


def attention_case(B, T, W, dtype, seed):
    """Random c_attn outputs `[3D, M]`, a one buffer whose first W slots are partly valid, and the masks of a
    left-padded call (row 0 of T > 1 has a padded first token)."""
    config = CFG.replace(dtype=dtype)
    N, K, D, S = config.n_head, config.head_dim, config.n_embd, 16
    qkv_3DM = normal((3 * D, B * T), seed, dtype, 2.0)
    kv_L2HSK = normal((CFG.n_layer, 2, B * N, S, K), seed + 1, dtype)
    mask_BT = np.ones((B, T), bool)
    mask_BT[0, 0] = T == 1
    valid_BS = np.random.default_rng(seed).random((B, S)) < 0.7
    ctx = ops.cache_context(jnp.asarray(mask_BT), jnp.asarray(valid_BS), jnp.int32(W - T if W else 0),
                            jnp.zeros(B, jnp.int32))  # fmt: skip
    return config, qkv_3DM, kv_L2HSK, ctx


def reference_attention(config, qkv_3DM, kv_L2HSK, layer, ctx, W):
    """decode.py's path: attention_inputs' reshapes, ops.cached_attention, block_output's reshape to [D, M]."""
    B, T = ctx["new_mask_BTT"].shape[:2]
    N, K = config.n_head, config.head_dim
    qkv_3HTK = qkv_3DM.reshape(3, N, K, B, T).transpose(0, 3, 1, 4, 2).reshape(3, B * N, T, K)
    cached = kv_L2HSK[layer, :, :, :W] if W else None
    mask_HW = jnp.repeat(ctx["cache_mask_BS"][:, :W], N, axis=0)
    a_HTK = ops.cached_attention(*qkv_3HTK, jnp.repeat(ctx["new_mask_BTT"], N, axis=0), cached, mask_HW)
    return a_HTK.reshape(B, N, T, K).transpose(1, 3, 0, 2).reshape(N * K, B * T)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,T,W", [(1, 1, 8), (2, 3, 16), (2, 3, 0)], ids=["step", "b2-t3", "no-cache"])
def test_attention_kernel(dtype, B, T, W, monkeypatch):
    """Slots loaded 4 at a time: the running maximum and sum cross tiles (2 and 4 of them), in a fori_loop for the
    step, unrolled for the others."""
    monkeypatch.setattr(fused_decode, "SLOT_TILE", 4)
    monkeypatch.setattr(fused_decode, "MAX_UNROLL", 1 if B == 1 else fused_decode.MAX_UNROLL)
    config, qkv_3DM, kv_L2HSK, ctx = attention_case(B, T, W, dtype, seed=10 * B + T + W)
    got = jax.jit(lambda q, kv: fused_decode.attention(q, ctx["new_mask_BTT"], kv, 1, ctx["cache_mask_BS"], W,
                                                       CFG.n_head))(qkv_3DM, kv_L2HSK)  # fmt: skip
    want = reference_attention(config, qkv_3DM, kv_L2HSK, 1, ctx, W)
    assert got.dtype == jnp.dtype(dtype)
    assert_close(got, want, dtype)
    other = reference_attention(config, qkv_3DM, kv_L2HSK, 0, ctx, W)  # another layer's slots: the test can tell
    assert not W or float(jnp.max(jnp.abs(other.astype(jnp.float32) - got.astype(jnp.float32)))) > 0.1


# --- the forward and the sampler --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=4)


forward_jit = jax.jit(decode.forward, static_argnames=("config", "window"), donate_argnames=("cache",))


def teacher_forced(weights, config, tokens_BT, mask_BT, next_BS, window):
    """Logits of a prefill (fresh cache: window 0) and a step per column of next_BS (over `window` slots)."""
    cache = kv_cache.init_cache(config, tokens_BT.shape[0], CFG.n_ctx, one_buffer=True)
    logits, cache = forward_jit(weights, config, jnp.asarray(tokens_BT), jnp.asarray(mask_BT), cache, window=0)
    steps = [np.asarray(logits)]
    for s in range(next_BS.shape[1]):
        column = jnp.asarray(next_BS[:, s : s + 1])
        logits, cache = forward_jit(weights, config, column, jnp.ones(column.shape, bool), cache, window=window)
        steps.append(np.asarray(logits))
    return np.stack(steps, 1), cache


@pytest.mark.parametrize("config", [CFG, BF16], ids=["float32", "bfloat16"])
def test_fused_forward_equals_the_xla_forward(params, config):
    """A left-padded prefill of 2 x 3 tokens (6 columns, fused), then 3 steps over a window of 16 slots."""
    rng = np.random.default_rng(1)
    tokens_BT, mask_BT = rng.integers(0, CFG.n_vocab, (2, 3)).astype(np.int32), np.ones((2, 3), bool)
    mask_BT[0, 0] = False
    next_BS = rng.integers(0, CFG.n_vocab, (2, 3)).astype(np.int32)
    got, got_cache = teacher_forced(decode.decode_weights(params, config, kernels="pallas"), config, tokens_BT,
                                    mask_BT, next_BS, 16)  # fmt: skip
    want, want_cache = teacher_forced(decode.decode_weights(params, config), config, tokens_BT, mask_BT, next_BS, 16)
    assert_close(got, want, config.dtype)
    assert_close(got_cache["kv"], want_cache["kv"], config.dtype)
    for name in ("valid", "index", "length"):
        np.testing.assert_array_equal(np.asarray(got_cache[name]), np.asarray(want_cache[name]))


@pytest.fixture
def one_buffer(monkeypatch):
    """The sampler's caches in one buffer, as on an accelerator (a jitted prefill keeps the layout it was traced
    with: caches cleared around)."""
    jax.clear_caches()
    monkeypatch.setattr(kv_cache, "one_buffer_default", lambda backend=None: True)
    yield
    jax.clear_caches()


def greedy_tokens(weights, steps=10):
    """A left-padded batch of 2 prefilled, then `steps` greedy tokens in blocks of 8 (masked steps past the end)."""
    tokens_BT = np.array([[0, 5, 9, 14], [1, 2, 3, 4]], np.int32)
    mask_BT = np.array([[False, True, True, True], [True] * 4])
    static = dict(config=CFG, sampling=SamplingConfig(temperature=0))
    args = (np.arange(2, dtype=np.int32), np.zeros(2, bool), np.int32(0), np.uint32(0), np.int32(-1))
    state, first = prefill_and_sample(weights, tokens_BT, mask_BT, *args, max_len=CFG.n_ctx, **static)
    state, out_BS, n = decode_chunk(weights, state, np.int32(steps), np.zeros(2, bool), np.int32(-1), **static,
                                    window=24, steps_per_block=8)  # fmt: skip
    assert int(n) == steps
    return np.concatenate([np.asarray(first)[:, None], np.asarray(out_BS)[:, :steps]], axis=1)


def test_greedy_decoding_draws_the_same_tokens(params, one_buffer):
    lively = jax.tree_util.tree_map_with_path(lambda path, x: 3 * x if path[-1].key == "w" else x, params)
    want = greedy_tokens(decode.decode_weights(lively, CFG))
    got = greedy_tokens(decode.decode_weights(lively, CFG, kernels="pallas"))
    np.testing.assert_array_equal(got, want)
    assert len(set(want[0])) > 3  # the tokens change: a wrong step would show


def test_the_gpu_calls_check_of_the_fused_layers(one_buffer, monkeypatch):
    """benchmarks/gpu/check.py's fused_check, as a GPU runs it (here over one buffer in interpret mode, one layer):
    the fused steps agree with XLA's, and a failure of the fused layers is a field of the record, not an exception."""
    from benchmarks.gpu import check

    config = CFG.replace(n_layer=1)
    params = random_params(config, seed=5)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.n_vocab, (2, 10)), jnp.int32)
    cached, _ = check.cached_logits(params, config, tokens)
    result = check.fused_check(params, config, tokens, cached)
    assert result["fused_vs_xla_cached_bf16_rel_err"] < 1e-5 and result["fused_same_argmax"] == 1.0, result

    def fails(*args, **kwargs):
        raise RuntimeError("Triton could not compile ln_linear")

    monkeypatch.setattr(fused_decode, "ln_linear", fails)
    jax.clear_caches()
    assert check.fused_check(params, config, tokens, cached) == {
        "fused_error": "RuntimeError: Triton could not compile ln_linear"
    }


# --- lowering for CUDA, and the XLA path unchanged -------------------------------------------------------------------
def loop_args(weights):
    """decode_chunk's arguments at batch 1 over a one-buffer cache of 32 slots (values do not matter: lowered only)."""
    cache = kv_cache.init_cache(CFG, 1, CFG.n_ctx, one_buffer=True)
    keys = jax.random.split(jax.random.key(0), 1)
    state = DecodeState(cache, jnp.zeros(1, jnp.int32), jnp.zeros(1, bool), None, keys, jnp.int32(1))
    static = dict(config=CFG, sampling=SamplingConfig(top_k=40), window=16, steps_per_block=8)
    return (weights, state, np.int32(8), np.zeros(1, bool), np.int32(-1)), static


@NEEDS_TRITON
def test_the_fused_decode_loop_lowers_for_cuda_with_five_kernels_per_layer(params):
    """The step as a GPU would compile it (traced for a GPU stand-in; no GPU here): Pallas calls through Triton,
    5 per layer in the loop's one step, each a custom call (benchmarks/kernels.py: one kernel)."""
    args, static = loop_args(decode.decode_weights(params, CFG, kernels="pallas"))
    jax.clear_caches()  # a trace for the CPU (interpret mode) must not be reused
    try:
        with traced_for_a_gpu():
            exported = jax.export.export(
                decode_chunk, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)]
            )(*args, **static)
    finally:
        jax.clear_caches()
    text = exported.mlir_module()
    assert text.count(f"stablehlo.custom_call @{TRITON}") == 5 * CFG.n_layer
    assert text.count('name = "cached_attention"') == CFG.n_layer and "mosaic_gpu" not in text


def test_the_fused_step_updates_its_buffer_in_place_once(params):
    """The compiled decode loop (XLA:CPU, the kernels interpreted; XLA:GPU places copies with the same pass, the
    kernels' calls reading the buffer as operands): one in-place write of the buffer per step and no copy of it,
    as tests/test_kv_cache.py checks for XLA's layers."""
    args, static = loop_args(decode.decode_weights(params, CFG, kernels="pallas"))
    computations, entry = kernels.parse_hlo(decode_chunk.lower(*args, **static).compile().as_text())
    buffer = f"= f32[{CFG.n_layer},2,{CFG.n_head},{CFG.n_ctx},{CFG.head_dim}]"  # what makes the whole buffer
    made = kernels.launches(computations, entry, matching=buffer)  # over one block of 8 steps
    assert list(made.elements()) == ["fusion:kLoop"] * static["steps_per_block"]


@NEEDS_TRITON
@pytest.mark.parametrize("batch,window,unroll", [(1, 192, 32), (8, 128, 1)])
def test_gpt2_124m_bfloat16_steps_lower_for_cuda(batch, window, unroll, monkeypatch):
    """The GPU call's shapes (124M in bf16, a 192-slot cache, the windows its chunks take) and the largest batch the
    fused layers take: every kernel's tiles meet Triton's constraints, their loops unrolled (124M's) or not (longer
    rows'). Abstract weights: nothing is allocated."""
    monkeypatch.setattr(fused_decode, "MAX_UNROLL", unroll)
    config = get_config("124M", dtype="bfloat16")
    weights = jax.eval_shape(lambda p: decode.decode_weights(p, config, kernels="pallas"), abstract_params(config))
    cache = jax.eval_shape(lambda: kv_cache.init_cache(config, batch, 192, one_buffer=True))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    state = DecodeState(cache, *(jax.ShapeDtypeStruct((batch,), t) for t in (jnp.int32, bool)), None, keys,
                        jax.ShapeDtypeStruct((), jnp.int32))  # fmt: skip
    jax.clear_caches()
    try:
        with traced_for_a_gpu():
            exported = jax.export.export(
                decode_chunk, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)]
            )(weights, state, np.int32(8), np.zeros(batch, bool), np.int32(-1), config=config,
              sampling=SamplingConfig(top_k=40), window=window, steps_per_block=8)  # fmt: skip
    finally:
        jax.clear_caches()
    assert exported.mlir_module().count(f"stablehlo.custom_call @{TRITON}") == 5 * config.n_layer


def lowered_text(function, *args, **static) -> str:
    return function.lower(*args, **static).as_text()


def test_the_xla_path_is_unchanged(params):
    """Default weights and kernels="xla" give one program; "pallas" another (so the comparison can fail), except
    where the fused layers do not apply: the CPU's per-layer cache, a prefill of more than MAX_COLUMNS tokens, a
    server's per-row cache."""
    xla, default = decode.decode_weights(params, CFG, kernels="xla"), decode.decode_weights(params, CFG)
    pallas = decode.decode_weights(params, CFG, kernels="pallas")
    args, static = loop_args(default)
    texts = {w.kernels + str(i): lowered_text(decode_chunk, w, *args[1:], **static) for i, w in
             enumerate([default, xla, pallas])}  # fmt: skip
    assert texts["xla0"] == texts["xla1"] != texts["pallas2"]
    per_layer = kv_cache.init_cache(CFG, 1, CFG.n_ctx, one_buffer=False)
    one = (jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))
    forward = jax.jit(decode.forward, static_argnames=("config", "window"))
    assert lowered_text(forward, pallas, CFG, *one, per_layer) == lowered_text(forward, default, CFG, *one, per_layer)
    many = (jnp.zeros((1, fused_decode.MAX_COLUMNS + 1), jnp.int32), jnp.ones((1, fused_decode.MAX_COLUMNS + 1), bool))
    buffer = kv_cache.init_cache(CFG, 1, CFG.n_ctx, one_buffer=True)
    long_prefill = [lowered_text(forward, w, CFG, *many, buffer, window=0) for w in (pallas, default)]
    assert long_prefill[0] == long_prefill[1]
    per_row = kv_cache.init_cache(CFG, 1, CFG.n_ctx, one_buffer=True, per_row=True)  # a server's
    assert lowered_text(forward, pallas, CFG, *one, per_row) == lowered_text(forward, default, CFG, *one, per_row)
    assert lowered_text(forward, pallas, CFG, *one, buffer) != lowered_text(forward, default, CFG, *one, buffer)
    with pytest.raises(ValueError, match="kernels='triton': choose one of xla, pallas"):
        decode.decode_weights(params, CFG, kernels="triton")
