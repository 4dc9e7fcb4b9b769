"""The check part: correctness on the card before the timings lean on it (once benchmarks/gpu_check.py).

On a random GPT-2 124M: bf16 compute with cuDNN attention against an fp32 reference (`precision='highest'`, XLA
attention), cuDNN and XLA attention against each other in bf16, fp32 at the GPU's default precision (TF32), and
cached decoding as every sampler runs it (`model/decode.py`: prefill, then one token per step, in bf16) against one
full forward pass, and (off a CPU) its steps in the fused Pallas layers against XLA's, all on the device. One
'numerics' record of relative L2 errors, max abs errors, losses and the fused steps' greedy agreement.

    python -m benchmarks.gpu.check [--json out.json]     # alone, on any device (toy sizes off a GPU)
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu.common import Sizes, record
from gpt2_jax.config import get_config
from gpt2_jax.model import decode
from gpt2_jax.model.transformer import GPT2, init_params


def rel_err(x: jax.Array, ref: jax.Array) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def correctness(preset: str = "124M", batch: int = 4, seq: int = 1024) -> dict[str, float]:
    base = get_config(preset)
    params = init_params(base, 0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq), 0, base.n_vocab)
    targets = jnp.roll(tokens, -1, axis=1)

    def run(cfg):
        logits = jax.jit(lambda p, t: GPT2(cfg).apply({"params": p}, t))(params, tokens)
        loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()
        return logits, float(loss)

    with jax.default_matmul_precision("highest"):
        ref_logits, ref_loss = run(base.replace(dtype="float32", attention="xla"))
    out: dict[str, float] = {"fp32_loss": ref_loss}
    variants = {
        "bf16_xla": base.replace(dtype="bfloat16", attention="xla"),
        "fp32_default_precision": base.replace(dtype="float32", attention="xla"),
    }
    if jax.default_backend() == "gpu":
        variants["bf16_cudnn"] = base.replace(dtype="bfloat16", attention="cudnn")
    results = {}
    for name, cfg in variants.items():
        logits, loss = run(cfg)
        results[name] = logits
        out[f"{name}_rel_err"] = rel_err(logits, ref_logits)
        out[f"{name}_max_abs"] = float(jnp.abs(logits - ref_logits).max())
        out[f"{name}_loss"] = loss
    if "bf16_cudnn" in results:
        out["cudnn_vs_xla_bf16_rel_err"] = rel_err(results["bf16_cudnn"], results["bf16_xla"])

    # Cached decode vs one full forward, both bf16 on the device.
    cached, first = cached_logits(params, variants["bf16_xla"], tokens)
    out["cached_vs_full_bf16_rel_err"] = rel_err(cached, results["bf16_xla"][:, first : first + cached.shape[1]])
    if jax.default_backend() != "cpu":  # the fused layers run over accelerators' one-buffer cache only
        out.update(fused_check(params, variants["bf16_xla"], tokens, cached))
    return out


def fused_check(params, cfg, tokens, cached: jax.Array) -> dict[str, float | str]:
    """The same cached decode in the fused Pallas layers (model/fused_decode.py: the steps, at most 8 rows) against
    XLA's `cached`: relative L2 error, max abs error, and the fraction of positions whose argmax (the greedy token)
    agrees. A kernel that fails on the card is `fused_error`, and the other checks stand."""
    try:
        fused, _ = cached_logits(params, cfg, tokens, kernels="pallas")
    except Exception as e:
        return {"fused_error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    same = jnp.mean(jnp.argmax(fused, -1) == jnp.argmax(cached, -1))
    return {"fused_vs_xla_cached_bf16_rel_err": rel_err(fused, cached),
            "fused_vs_xla_cached_bf16_max_abs": float(jnp.abs(fused - cached).max()),
            "fused_same_argmax": float(same)}  # fmt: skip


def cached_logits(params, cfg, tokens, kernels: str = "xla") -> tuple[jax.Array, int]:
    """Logits `[B, t1 - t0 + 1, V]` of the sampler's cached forward from position t0 - 1 on, and t0 - 1: the first
    t0 tokens prefilled, then one step per token up to t1, jitted as sampling/loop.py runs it (config static, cache
    donated), in the layers `kernels` picks (decode.decode_weights)."""
    batch, seq = tokens.shape
    t0, t1 = min(64, seq // 2), min(128, seq)
    weights = decode.decode_weights(params, cfg, kernels=kernels)
    forward = jax.jit(decode.forward, static_argnums=1, donate_argnums=4)
    cache = decode.init_cache(cfg, batch, t1)
    logits, cache = forward(weights, cfg, tokens[:, :t0], jnp.ones((batch, t0), bool), cache)
    pieces = [logits]
    for t in range(t0, t1):
        logits, cache = forward(weights, cfg, tokens[:, t : t + 1], jnp.ones((batch, 1), bool), cache)
        pieces.append(logits)
    return jnp.stack(pieces, axis=1), t0 - 1


def run(out: str, work: str, sizes: Sizes) -> None:
    preset, batch, seq = sizes.check
    record(out, "numerics", preset=preset, batch=batch, seq=seq, **correctness(preset, batch, seq))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    on_gpu = device.platform == "gpu"  # elsewhere: a smoke test at toy sizes
    result = {"device": device.device_kind, **(correctness() if on_gpu else correctness("tiny", 2, 64))}
    for key, value in result.items():
        print(f"  {key}: {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
