"""The decode part (issue 20) and the decode_pytorch part: our sampler's decode loop on the card, as
`python -m benchmarks --job decode` measures it (benchmarks/suite.py over benchmarks/decode.py).

decode: GPT-2 124M in bf16, a 16-token prompt, no early stop:
  - batch 1, 128 new tokens, top-k 40 and greedy: tokens/s end to end (prefill included), ms per decode step, and
    every field the decode job's points carry (kernels_per_step where benchmarks/decode.py measures it; the profile
    part counts kernels from a trace too);
  - batch 64, 128 new tokens, top-k 40: the same, and the fraction of the bandwidth bound (bandwidth.py: the weights
    in bf16 and the valid KV cache per step over a copy measured in the same process);
  - batch 64, 1000 new tokens: the long generation (windowed attention over the filled cache only);
  - last, the A/B of the fused Pallas layers (model/fused_decode.py): the batch-1 top-k 40 and greedy points again
    with `"kernels": "pallas"`, the same fields. Last, so that a kernel that fails to compile (recorded as that
    point's error) or runs long costs no other point; a GPU switches its default only on what these show. Not on a
    CPU (the dry run): the fused layers run over accelerators' one-buffer cache, and a CPU's points would be XLA's.
decode_pytorch: the batch-1 and batch-64 128-token points again, beside Hugging Face `generate` on the same card,
eagerly and under torch.compile (benchmarks/compare.py), in the same process.
"""

from __future__ import annotations

import dataclasses
import time

import jax

from benchmarks import suite
from benchmarks.gpu.common import DEADLINE, Sizes, record


def sweep(sizes: Sizes, batch: int, new_tokens: int, temperature: float = 1.0) -> suite.Sweep:
    return suite.Sweep(
        "decode", (sizes.preset,), (batch,), seq=sizes.prompt, new_tokens=new_tokens, dtype=sizes.dtype,
        temperature=temperature, torch_compile=sizes.torch_compile,
    )  # fmt: skip


def measure(out: str, sweeps: list[suite.Sweep], sizes: Sizes, *, pytorch: bool = False) -> None:
    """Every point of `sweeps` through the benchmark runner (a failed point keeps its error), each recorded as it
    is measured; a sweep is skipped once too little time is left for it."""
    runner = suite.Runner(compare=pytorch, log=lambda line: print(line, flush=True))
    for s in sweeps:
        if time.time() + sizes.point_s * (2 if pytorch else 1) > DEADLINE:
            record(out, "skipped", job=s.job, batch=s.batches[0], new_tokens=s.new_tokens, reason="time limit")
            continue
        for point in runner.run([s]):
            record(out, "point", **point)


def run(out: str, work: str, sizes: Sizes) -> None:
    one, many = sizes.decode_batches[0], sizes.decode_batches[-1]
    sweeps = [sweep(sizes, one, sizes.new_tokens), sweep(sizes, one, sizes.new_tokens, temperature=0.0)]
    sweeps += [sweep(sizes, many, sizes.new_tokens), sweep(sizes, many, sizes.long_tokens)]
    if jax.default_backend() == "cpu":
        record(out, "skipped", job="decode", batch=one, kernels="pallas", reason="no GPU (dry run): the fused layers "
               "run over an accelerator's one-buffer cache")  # fmt: skip
    else:
        sweeps += [dataclasses.replace(s, kernels="pallas") for s in sweeps[:2]]
    measure(out, sweeps, sizes)


def run_pytorch(out: str, work: str, sizes: Sizes) -> None:
    measure(out, [sweep(sizes, b, sizes.new_tokens) for b in sizes.decode_batches], sizes, pytorch=True)
