"""Pallas kernels for a decode step of a few columns, in `decode.py`'s layout, and the layers that run them.

A GPU decode step at batch 1 is bound by how many kernels it launches (an H200 ran 193 of about 2 us each per step of
124M in bf16, issue 20), because XLA fuses none of a layer's matmuls with the layer norm before it, the bias,
activation and residual after it, or the attention between them. Here each layer runs five kernels:

    ln_linear        layer norm ln_1 + c_attn (+ bias): the new queries, keys and values `[3D, M]`
    attention        the new queries over the W cached slots of this layer and over the new tokens themselves, as
                     `ops.cached_attention` (float32 logits and softmax), straight from `[3D, M]` and the one buffer
    linear_residual  attn/c_proj (+ bias) + the residual
    ln_linear        layer norm ln_2 + mlp/c_fc (+ bias) + GELU
    linear_residual  mlp/c_proj (+ bias) + the residual

The issue's third group (output projection + residual + ln_2 + MLP up + GELU) is two kernels: a layer norm needs
every feature of the residual, which the programs of one kernel compute apart (each a tile of output rows) and
cannot share without a grid-wide barrier, which generic Pallas has not; computing the whole c_proj in every program
instead would read it once per program. The cache write stays XLA's: one write per step of every layer's keys and
values into the one buffer (`kv_cache.py`), between the layers as `decode.layers_one_buffer_cache` places it (so
nothing copies the buffer). So a step launches 5 L Pallas kernels (60 for 124M's 12 layers) beside XLA's embedding,
masks, final layer norm, head, draw, write and loop bookkeeping (not countable without a GPU: an estimate of 15 to
25 there), about 75 to 85 per batch-1 step against the 193 of 2026-11-30. The issue's 60 needs fewer kernels per
layer than programs without a grid-wide barrier allow; a persistent kernel that synchronises its programs would.

The math is `ops.py`'s at the same precision: matmul inputs in the compute dtype, products summed in float32 and
rounded to the compute dtype where XLA's matmul rounds its output, then the bias, GELU and residual in the compute
dtype by the same jnp ops as `decode.py` (so a backend treats them alike: on this CPU the bf16 kernels give XLA's
results bit for bit; an epilogue in float32 rounded once moved them by a bf16 rounding); layer norms, attention
logits and softmax in float32, the probabilities rounded to the compute dtype before they weigh the values. Only the
order of the float32 sums differs.

Backends. The kernels use generic Pallas only (refs, `pl.ds`, `pl.program_id`, loops, jnp), so the same
code runs in Pallas' interpret mode on a CPU (the tests; chosen by `interpret()` from the traced-for device) and
lowers for CUDA. On CUDA they lower through Triton (`pltriton.CompilerParams`), not Mosaic GPU, which jax 0.10.2
cannot lower them to: its `pallas_call` lowering has no dot_general, copies at most 256 elements per block dimension
(a 768-wide row is more), needs 16-byte strides (a 1-column activation has 2) and rejected the reductions and
broadcasts a matrix-vector product needs ("Incompatible FragmentedArray layouts"); the Mosaic GPU forms that would
(`plgpu.kernel`, TMA, WGMMA) cannot run in interpret mode here. Triton's constraint that every loaded value has
power-of-two dimensions is met by loading in tiles: up to `TILE_ROWS` output rows per program (`_rows_per_program`),
`TILE_COLS` input features per load (each a power of two dividing the size), one column of activations at a time.
The tests prove the lowering on a CPU (jax.export of the decode loop for CUDA, 124M's shapes included); Triton's
compilation of these kernels to PTX happens on a card only, first in the GPU call (its check and decode parts).

Which path runs: `DecodeWeights.kernels` ("xla", the default everywhere, or "pallas"), static, so a jitted
sampler keys on it and the XLA path's program is what it was. "pallas" runs these layers where they apply: a
one-buffer cache (accelerators' layout) at a shared index and at most `MAX_COLUMNS` new tokens in all (B * T); any
other call (a long prefill, the CPU's per-layer cache, a server's per-row cache) runs XLA's layers, silently: the
choice is per call. The rule for switching a backend's default to "pallas":
only after the GPU call (`benchmarks/gpu`, decode part, the `"kernels": "pallas"` points) measured it faster there
than "xla" at batch 1, with the same tokens; until then nothing picks it by default.
Axis legend: as `decode.py`'s; M = B*T columns, O and I a linear layer's output and input features, C input features
per load, R output rows per program.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gpt2_jax.config import GPT2Config
from gpt2_jax.model import kv_cache, ops

try:  # deprecated from jax 0.11: a JAX without it still imports decode.py, and runs the kernels in interpret mode
    from jax.experimental.pallas import triton as pltriton
except ImportError:
    pltriton = None

Array = jax.Array
MAX_COLUMNS = 8  # new tokens per call (B * T) the fused layers take: decode steps of small batches
TILE_ROWS = 32  # output rows per program, at most
MIN_PROGRAMS = 128  # programs per matmul kernel, at least, where its rows allow: about one per SM of an H100/H200
TILE_COLS = 256  # input features per load, at most
SLOT_TILE = 128  # cache slots per load, at most
MAX_UNROLL = 32  # tile loops of at most this many tiles are unrolled (`_tiles`)
# Untuned (no GPU here): 4 warps per program, and 2 stages so that Triton prefetches a loop's next tile while it
# sums the current one. The GPU call's A/B is where these get chosen.
_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2) if pltriton else None


def applies(cache: dict[str, Any], columns: int) -> bool:
    """Whether the fused layers take a call of `columns` new tokens (B * T) over `cache` (see the module doc): the
    one buffer at a shared index (a sampler's; a server's per-row indices run XLA's layers, untested here)."""
    return "kv" in cache and not cache["index"].ndim and columns <= MAX_COLUMNS


def interpret() -> bool:
    """Pallas' interpret mode where the forward is traced for a CPU (`ops.target_device`): the CPU has no lowering."""
    return ops.target_device().platform == "cpu"


def _pow2_tile(n: int, cap: int) -> int:
    """The largest power of two dividing `n`, at most `cap`: a tile Triton can load, that splits `n` evenly."""
    return min(n & -n, cap)


def _tiles(n: int, body: Any, init: Any) -> Any:
    """`body(i, carry)` over tiles i = 0 .. n - 1: unrolled where n <= MAX_UNROLL (124M's loops take 3 to 12 tiles),
    so that the compiler can issue every tile's load before the first sum needs it (the loads do not depend on the
    sums), else a `lax.fori_loop`. The same sums in the same order either way."""
    if n > MAX_UNROLL:
        return jax.lax.fori_loop(0, n, body, init)
    for i in range(n):
        init = body(i, init)
    return init


def _rows_per_program(n_out: int) -> int:
    """Output rows per program of a matmul kernel: a tile of at most TILE_ROWS, halved until there are at least
    MIN_PROGRAMS programs (or one row each). A decode step's matmuls are reads of the weights, and a GPU reads at its
    full bandwidth only with most SMs busy: 768 rows (124M's c_proj) make 192 programs of 4 rows, not 24 of 32."""
    R = _pow2_tile(n_out, TILE_ROWS)
    while R > 1 and n_out // R < MIN_PROGRAMS:
        R //= 2
    return R


# --- the kernels ------------------------------------------------------------------------------------------------------
def _matvec_columns(w_ref: Any, row0: Array, column: Any, n_in: int, R: int, M: int) -> list[Array]:
    """Float32 sums `[R]` per column m of w[row0 : row0 + R, :] @ column(m, c0, C), the input loaded a tile at a time
    (`column` returns its features c0 .. c0 + C of column m in the compute dtype)."""
    C = _pow2_tile(n_in, TILE_COLS)

    def tile(c: Array, acc: tuple[Array, ...]) -> tuple[Array, ...]:
        w_RC = w_ref[pl.ds(row0, R), pl.ds(c * C, C)].astype(jnp.float32)
        return tuple(a + jnp.sum(w_RC * column(m, c * C, C).astype(jnp.float32)[None, :], axis=1) for m, a in
                     enumerate(acc))  # fmt: skip

    return list(_tiles(n_in // C, tile, tuple(jnp.zeros((R,), jnp.float32) for _ in range(M))))


def _ln_linear_kernel(x_ref, g_ref, b_ref, w_ref, bias_ref, out_ref, *, eps: float, gelu: bool, R: int) -> None:
    """out[rows] = linear(layer_norm(x)) for this program's R rows, GELU after it if `gelu`: every program computes
    the column statistics itself (2 D M reads, small beside its R x D weights; programs cannot share them)."""
    D, M = x_ref.shape
    C = _pow2_tile(D, TILE_COLS)
    dtype = out_ref.dtype

    def total(f: Any, m: int) -> Array:
        return _tiles(D // C, lambda c, s: s + jnp.sum(f(x_ref[pl.ds(c * C, C), m])), jnp.float32(0))

    stats = []
    for m in range(M):
        mean = total(lambda x: x.astype(jnp.float32), m) / D
        var = total(lambda x, mean=mean: jnp.square(x.astype(jnp.float32) - mean), m) / D
        stats.append((mean, jax.lax.rsqrt(var + eps)))

    def normed(m: int, c0: Array, C: int) -> Array:
        x = x_ref[pl.ds(c0, C), m].astype(jnp.float32)
        mean, rstd = stats[m]
        return ((x - mean) * rstd * g_ref[pl.ds(c0, C)] + b_ref[pl.ds(c0, C)]).astype(dtype)

    row0 = pl.program_id(0) * R
    bias = bias_ref[pl.ds(row0, R)]
    for m, acc in enumerate(_matvec_columns(w_ref, row0, normed, D, R, M)):
        y = acc.astype(dtype) + bias  # XLA's matmul rounds its output; the bias is added in the compute dtype
        out_ref[pl.ds(row0, R), m] = ops.gelu(y) if gelu else y


def _linear_residual_kernel(a_ref, x_ref, w_ref, bias_ref, out_ref, *, R: int) -> None:
    """out[rows] = x[rows] + linear(a)[rows] for this program's R rows."""
    n_in, M = a_ref.shape
    row0 = pl.program_id(0) * R
    bias = bias_ref[pl.ds(row0, R)]
    column = lambda m, c0, C: a_ref[pl.ds(c0, C), m]
    for m, acc in enumerate(_matvec_columns(w_ref, row0, column, n_in, R, M)):
        out_ref[pl.ds(row0, R), m] = x_ref[pl.ds(row0, R), m] + (acc.astype(out_ref.dtype) + bias)


def _attention_kernel(layer_ref, qkv_ref, new_mask_ref, *rest, N: int, T: int, W: int) -> None:
    """One attention problem h = (row b, head n) per program: T queries over the row's W cached slots of this
    layer (masked by the row's cache mask) and its T new keys (masked by new_mask), one float32 softmax over both
    parts; written into the head's rows of the output `[D, M]` (the layout c_proj takes)."""
    kv_ref, cache_mask_ref, out_ref = rest if W else (None, None, rest[0])
    h = pl.program_id(0)
    b, n = h // N, h % N
    D, K = qkv_ref.shape[0] // 3, out_ref.shape[0] // N
    SC = _pow2_tile(W, SLOT_TILE) if W else 1
    dtype, scale, low = out_ref.dtype, K**-0.5, jnp.finfo(jnp.float32).min
    layer = layer_ref[0]

    def new_token(part: int, u: int) -> Array:  # [K]: query (0), key (1) or value (2) of this row's new token u
        return qkv_ref[pl.ds(part * D + n * K, K), b * T + u].astype(jnp.float32)

    def cached(kind: int, s: Array) -> Array:  # [SC, K]: keys (0) or values (1) at slots s * SC .. (s + 1) * SC
        return kv_ref[layer, kind, h, pl.ds(s * SC, SC), :].astype(jnp.float32)

    def one_query(t: int) -> Array:
        q = new_token(0, t)
        new = [jnp.where(new_mask_ref[b, t, u] != 0, jnp.sum(new_token(1, u) * q) * scale, low) for u in range(T)]

        def cached_logits(s: Array) -> Array:
            logits = jnp.sum(cached(0, s) * q[None, :], axis=1)
            return jnp.where(cache_mask_ref[b, pl.ds(s * SC, SC)] != 0, logits * scale, low)

        # The maximum and the sum of exponentials over both parts, the cache's with a running maximum.
        top, total = functools.reduce(jnp.maximum, new), jnp.float32(0)
        if W:
            step = lambda s, carry: _running_softmax(carry, cached_logits(s))
            top, total = _tiles(W // SC, step, (top, total))
        total = total + sum(jnp.exp(logit - top) for logit in new)
        # Probabilities rounded to the compute dtype before they weigh the values; each part rounded, then summed.
        probs = [(jnp.exp(logit - top) / total).astype(dtype).astype(jnp.float32) for logit in new]
        out = sum(p * new_token(2, u) for u, p in enumerate(probs)).astype(dtype)
        if not W:
            return out

        def weigh(s: Array, acc: Array) -> Array:
            p = (jnp.exp(cached_logits(s) - top) / total).astype(dtype).astype(jnp.float32)
            return acc + jnp.sum(p[:, None] * cached(1, s), axis=0)

        return out + _tiles(W // SC, weigh, jnp.zeros((K,), jnp.float32)).astype(dtype)

    for t in range(T):
        out_ref[pl.ds(n * K, K), b * T + t] = one_query(t)


def _running_softmax(carry: tuple[Array, Array], logits: Array) -> tuple[Array, Array]:
    """(maximum, sum of exp(logit - maximum)) updated with a tile of logits. The running maximum starts at the new
    tokens' (finite: every query sees itself), so masked logits always contribute exp(low - finite) = 0."""
    top, total = carry
    new_top = jnp.maximum(top, jnp.max(logits))
    return new_top, total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - new_top))


# --- the calls ------------------------------------------------------------------------------------------------------
def _call(kernel: Any, grid: int, out_shape: jax.ShapeDtypeStruct, name: str) -> Any:
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(grid,), interpret=interpret(), name=name,
                          compiler_params=_PARAMS)  # fmt: skip


def ln_linear(x_IM: Array, ln: dict[str, Array], p: dict[str, Array], eps: float, *, gelu: bool = False) -> Array:
    """`linear(layer_norm(x))` (`decode.py`'s), GELU after it if `gelu`, in one kernel: `[O, M]` in x's dtype."""
    n_out = p["w_OI"].shape[0]
    R = _rows_per_program(n_out)
    kernel = functools.partial(_ln_linear_kernel, eps=eps, gelu=gelu, R=R)
    out = jax.ShapeDtypeStruct((n_out, x_IM.shape[1]), x_IM.dtype)
    call = _call(kernel, n_out // R, out, "ln_linear_gelu" if gelu else "ln_linear")
    return call(x_IM, ln["g"], ln["b"], p["w_OI"], p["b"])


def linear_residual(a_IM: Array, x_OM: Array, p: dict[str, Array]) -> Array:
    """`x + linear(a)` (`decode.py`'s) in one kernel: `[O, M]` in x's dtype."""
    n_out = p["w_OI"].shape[0]
    R = _rows_per_program(n_out)
    out = jax.ShapeDtypeStruct(x_OM.shape, x_OM.dtype)
    call = _call(functools.partial(_linear_residual_kernel, R=R), n_out // R, out, "linear_residual")
    return call(a_IM, x_OM, p["w_OI"], p["b"])


def attention(
    qkv_3DM: Array, new_mask_BTT: Array, kv_L2HSK: Array | None, layer: int, cache_mask_BS: Array | None, W: int,
    n_head: int,
) -> Array:  # fmt: skip
    """`ops.cached_attention` of the new tokens (queries, keys, values in `qkv_3DM`, c_attn's output) over the first
    W slots of layer `layer` in the one buffer (none with W 0) and over themselves, in one kernel: `[D, M]`, the
    heads' outputs in the layout c_proj takes."""
    B, T = new_mask_BTT.shape[:2]
    kernel = functools.partial(_attention_kernel, N=n_head, T=T, W=W)
    operands = [jnp.full((1,), layer, jnp.int32), qkv_3DM, new_mask_BTT.astype(jnp.int32)]
    if W:
        operands += [kv_L2HSK, cache_mask_BS.astype(jnp.int32)]
    out = jax.ShapeDtypeStruct((qkv_3DM.shape[0] // 3, qkv_3DM.shape[1]), qkv_3DM.dtype)
    return _call(kernel, B * n_head, out, "cached_attention")(*operands)


def layers(
    weights: Any, x_DM: Array, cache: dict[str, Any], ctx: dict[str, Array], W: int, write: Array | bool,
    config: GPT2Config,
) -> tuple[Array, dict[str, Any]]:  # fmt: skip
    """`decode.layers_one_buffer_cache` in the fused kernels: the same blocks, reads and one write of the buffer."""
    eps, L, N, K = config.layer_norm_epsilon, config.n_layer, config.n_head, config.head_dim
    B, T = ctx["new_mask_BTT"].shape[:2]
    kv_L2HSK, new = cache["kv"], []
    # The masks as the kernels read them, converted once for every layer (int32: no boolean refs in a kernel).
    new_mask_BTT, cache_mask_BS = (ctx[name].astype(jnp.int32) for name in ("new_mask_BTT", "cache_mask_BS"))
    for layer, p in enumerate(weights.h):
        qkv_3DM = ln_linear(x_DM, p["ln_1"], p["attn/c_attn"], eps)
        new.append(qkv_3DM[config.n_embd :].reshape(2, N, K, B, T).transpose(0, 3, 1, 4, 2).reshape(2, B * N, T, K))
        if W and layer == L - 1:  # the one write, where decode.layers_one_buffer_cache makes it (kv_cache.py: why)
            kv_L2HSK = kv_cache.write(kv_L2HSK, jnp.stack(new), cache["index"], write)
        a_DM = attention(qkv_3DM, new_mask_BTT, kv_L2HSK, layer, cache_mask_BS, W, N)
        x_DM = linear_residual(a_DM, x_DM, p["attn/c_proj"])
        h_FM = ln_linear(x_DM, p["ln_2"], p["mlp/c_fc"], eps, gelu=True)
        x_DM = linear_residual(h_FM, x_DM, p["mlp/c_proj"])
    if not W:
        kv_L2HSK = kv_cache.write(kv_L2HSK, jnp.stack(new), cache["index"], write)
    return x_DM, {"kv": kv_L2HSK}
