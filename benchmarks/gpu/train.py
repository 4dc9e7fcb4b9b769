"""The train part: ours, GPT-2 124M at T=1024 in bf16, at each training batch (32 and 64), on the shards llm.c
trains on.

Each point is benchmarks/train.py's `measure_point`: the step train.py builds (`build_train_step`: forward, backward,
clip, AdamW, state donated, layers unrolled on a GPU), fp32 params and AdamW state, cuDNN attention, the host synced
every step, median of 5 steps after the compile; MFU is 6N + 12LHQT per token (855 MFLOP) over the card's dense bf16
peak. Its batches come from the shards part's files through the training loop's own reader and sampler
(`read_token_stream`, `BatchSampler`, seed 0), put on the device before timing, one per step in turn. At the first
batch the first step's loss and gradient norm are checked against a plain-loss step (float32 logits from
`GPT2.apply`, softmax cross-entropy) on the same params and batch: within 1e-2 and 1%.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bandwidth, compare
from benchmarks import train as train_bench
from benchmarks.gpu.common import Sizes, record, shard_patterns, shards_ready, time_left
from gpt2_jax.config import GPT2Config
from gpt2_jax.data.batches import BatchSampler
from gpt2_jax.data.dataset import read_token_stream
from gpt2_jax.model.flops import peak_flops
from gpt2_jax.model.ops import attention_implementation
from gpt2_jax.model.transformer import GPT2, init_params
from gpt2_jax.tokenizers.gpt2_bpe import gpt2_tokenizer

LOSS_TOLERANCE, GRAD_NORM_TOLERANCE = 1e-2, 0.01


def shard_batches(work: str, batch: int, seq: int, count: int) -> list[np.ndarray]:
    """`count` batches of [batch, seq + 1] tokens from the training shards, as train.py draws them."""
    tokens = read_token_stream(shard_patterns(work)[0], gpt2_tokenizer(), progress=False).tokens
    sampler = BatchSampler(tokens, batch, seq, seed=0)
    return [sampler.next_batch() for _ in range(count)]


def run(out: str, work: str, sizes: Sizes) -> None:
    on_shards = shards_ready(work)
    if not on_shards:
        record(out, "skipped", job="train", reason="no shards (the shards part did not run): random tokens instead")
    peak = peak_flops(jax.devices()[0], sizes.dtype, measure_unknown=True)
    for i, batch in enumerate(sizes.train_batches):
        if time_left() < sizes.point_s:
            record(out, "skipped", job="train", batch=batch, reason="time limit")
            continue
        data = shard_batches(work, batch, sizes.seq, sizes.data_batches) if on_shards else None
        base = dict(job="train", preset=sizes.preset, batch=batch, seq=sizes.seq, dtype=sizes.dtype)
        try:
            point = train_bench.measure_point(sizes.preset, batch, sizes.seq, dtype=sizes.dtype, pytorch=False,
                                              peak=peak, data=data)  # fmt: skip
        except Exception as e:  # out of memory at 64, say: keep the other batch
            record(out, "point", **base, error=compare.one_line(e))
            continue
        config = train_bench.model_config(sizes.preset, dtype=sizes.dtype)
        point.update(bandwidth.memory_in_use(jax.devices()[0]), attention=attention_implementation(config),
                     repeats=5, data=shard_patterns(work)[0] if on_shards else "random tokens")  # fmt: skip
        record(out, "point", **point)
        if i == 0:
            first = data[0] if data else train_bench.random_batch(config, batch, sizes.seq)
            record(out, "check", job="train", **loss_check(point, plain_first_step(point, first)))


def plain_first_step(point: dict, batch_BT1: np.ndarray) -> dict[str, float]:
    """Loss and gradient norm of a plain-loss step on the params (seed 0), batch and config of a training point:
    float32 logits from GPT2.apply, softmax cross-entropy, no fused head."""
    config: GPT2Config = train_bench.model_config(
        point["preset"], dtype=point["dtype"], attention=point["attention"], remat=point["remat"],
        scan_unroll=point["scan_unroll"],
    )  # fmt: skip

    def plain_loss(params: Any, batch_BT1: jax.Array) -> jax.Array:
        logits_BTV = GPT2(config).apply({"params": params}, batch_BT1[:, :-1]).astype(jnp.float32)
        target_BT = jnp.take_along_axis(logits_BTV, batch_BT1[:, 1:, None], axis=-1)[..., 0]
        return (jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT).mean()

    loss, grads = jax.jit(jax.value_and_grad(plain_loss))(init_params(config, 0), jnp.asarray(batch_BT1))
    squares = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
    return {"loss": float(loss), "grad_norm": float(jnp.sqrt(squares))}


def loss_check(point: dict, plain: dict[str, float]) -> dict[str, Any]:
    """The production step's first loss and gradient norm (in `point`) against the plain-loss step's."""
    loss_diff = abs(point["first_loss"] - plain["loss"])
    norm_diff = abs(point["first_grad_norm"] / plain["grad_norm"] - 1)
    return dict(
        check="first step: production loss vs plain loss", batch=point["batch"], loss=point["first_loss"],
        plain_loss=plain["loss"], loss_diff=loss_diff, grad_norm=point["first_grad_norm"],
        plain_grad_norm=plain["grad_norm"], grad_norm_rel_diff=norm_diff,
        ok=loss_diff <= LOSS_TOLERANCE and norm_diff <= GRAD_NORM_TOLERANCE,
    )  # fmt: skip
