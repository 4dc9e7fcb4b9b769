"""The lora part (issue 21): LoRA on GPT-2 1558M on the card, as

    python -m benchmarks.lora --preset 1558M --batch 1 --seq 1024 --dtype bfloat16 --repeats 3

measures it (benchmarks/lora.py: the step train.py runs over the state it builds, each variant in a process of its
own): the LoRA variant (rank 8 on c_attn) first, then full fine-tuning if time is left. Each gives its median step
time, compile time, trainable parameters, computed state bytes and the device's peak bytes in use, recorded as soon
as its process ends. A variant that runs out of device memory is tried once more with --remat.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.gpu.common import Sizes, record, time_left

VARIANTS = ("lora", "full")


def run(out: str, work: str, sizes: Sizes) -> None:
    preset, batch, seq = sizes.lora
    base = ["-m", "benchmarks.lora", "--preset", preset, "--batch", str(batch), "--seq", str(seq), "--dtype",
            sizes.dtype, "--repeats", "3"]  # fmt: skip
    for variant in VARIANTS:
        for remat in (False, True):
            argv = [*base, *(["--remat"] if remat else []), "--variant", variant]
            fields = dict(variant=variant, remat=remat, command="python " + " ".join(argv))
            left = time_left() - 5
            if left < 30:
                record(out, "skipped", job="lora", variant=variant, reason=f"time limit ({left:.0f} s left)")
                break
            try:
                done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired:
                record(out, "lora", **fields, error=f"stopped after {left:.0f} s")
                break
            print(done.stdout[-3000:] + done.stderr[-3000:], flush=True)
            result = next((line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
            if done.returncode == 0 and result:
                record(out, "lora", **(fields | json.loads(result)))
                break
            tail = done.stderr[-2000:]
            record(out, "lora", **fields, error=f"exit code {done.returncode}", output_tail=tail)
            out_of_memory = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
            if remat or not out_of_memory:
                break
