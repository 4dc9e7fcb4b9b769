"""A peer's point, in the fields of ours (benchmarks/suite.py): `peer`, `job`, `preset`, `batch`, `seq`, `dtype`,
`tokens_per_s` (median, with min and max), `step_ms`, `mfu` and `model_flops_per_s` by our FLOP count (6N + 12LHQT,
N on the real 50,257-token vocabulary, gpt2_jax/model/flops.py) over the card's dense bf16 peak (`peak_flops`,
`peak_source`: the device part's, so every point of a call shares it). The peer's own printed lines and figures
(`printed`, `tokens_per_s_printed`, `mfu_printed`) are added beside them by llmc.py and nanogpt.py.
"""

from __future__ import annotations

import statistics
import subprocess
from typing import Any

from benchmarks.gpu.common import nvidia_smi, time_left
from gpt2_jax.config import get_config
from gpt2_jax.model.flops import flops_per_token, known_peak_flops


def peer_point(
    peer: str, preset: str, batch: int, seq: int, step_seconds: list[float], peak: tuple[float, str]
) -> dict[str, Any]:
    """The point of `peer` training `preset` at batch x seq, from its steady steps' seconds."""
    flops = flops_per_token(get_config(preset), seq)
    step_s = statistics.median(step_seconds)
    tokens_per_s = batch * seq / step_s
    return dict(
        peer=peer, job="train", preset=preset, batch=batch, seq=seq, dtype="bfloat16", step_ms=1e3 * step_s,
        tokens_per_s=tokens_per_s, tokens_per_s_min=batch * seq / max(step_seconds),
        tokens_per_s_max=batch * seq / min(step_seconds), flops_per_token=flops,
        model_flops_per_s=tokens_per_s * flops, mfu=tokens_per_s * flops / peak[0], peak_flops=peak[0],
        peak_source=peak[1],
    )  # fmt: skip


def card_peak(device: dict) -> tuple[float, str]:
    """The device record's peak, else the datasheet's for the card nvidia-smi names."""
    if device.get("peak_flops"):
        return device["peak_flops"], device["peak_source"]
    name = nvidia_smi().get("name", "")
    peak = known_peak_flops(name, "bfloat16")
    if peak is None:
        raise RuntimeError(f"no dense bf16 peak known for {name or 'this machine'}: the device part did not run")
    return peak, f"datasheet ({name})"


def run_peer(argv: list[str], folder: str, env: dict[str, str] | None = None) -> tuple[str, str | None]:
    """A peer's run within the part's time: (its output, an error or None)."""
    left = time_left() - 5
    if left < 15:
        return "", f"no time left ({left:.0f} s)"
    try:
        done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, timeout=left)
    except subprocess.TimeoutExpired as e:
        return (e.stdout or b"").decode(errors="replace"), f"stopped after {left:.0f} s"
    output = (done.stdout + done.stderr).decode(errors="replace")
    return output, None if done.returncode == 0 else f"exit code {done.returncode}"
