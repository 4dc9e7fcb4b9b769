"""The PyTorch columns of a benchmark point: Hugging Face GPT-2 run eagerly, and the same model under
`torch.compile`, so that a ratio is also against the strongest PyTorch a user would pick.

`benchmarks/train.py` and `benchmarks/decode.py` say what each side runs (the same step, the same generation);
this file turns PyTorch's timed runs into a point's fields. A column that cannot run (out of memory, a backend
that cannot compile on this machine: inductor needs a C++ compiler on a CPU) keeps its reason in the point, the
table shows it as 'n/a', and the rest of the run goes on. Fields, per column (`pytorch` eager, `pytorch_compiled`):

    {column}_tokens_per_s, {column}_tokens_per_s_min, {column}_tokens_per_s_max
                          median and spread over the timed runs (as many as ours)
    ratio, ratio_compiled ours over that column's median
    {column}_error        why the column is missing
    pytorch_compiled_backend   the torch.compile backend ('inductor'; the toy suite uses 'eager': Dynamo's graph
                          capture without code generation, the same plumbing in seconds)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from gpt2_jax.errors import first_line

COLUMNS = ("pytorch", "pytorch_compiled")
RATIO = {"pytorch": "ratio", "pytorch_compiled": "ratio_compiled"}
LABEL = {"pytorch": "PyTorch", "pytorch_compiled": "torch.compile"}


def one_line(error: BaseException) -> str:
    """An exception as one short line for a point's `error` fields: its type and the first line of its message."""
    return f"{type(error).__name__}: {first_line(error)}".rstrip(": ")[:300]


def columns(backend: str | None) -> list[tuple[str, str | None]]:
    """(column, torch.compile backend) pairs to time: eager, then compiled where a backend is asked for."""
    return [("pytorch", None)] + ([("pytorch_compiled", backend)] if backend else [])


def add_column(
    point: dict,
    column: str,
    tokens: int,
    seconds: Callable[[], list[float] | None],
    log: Callable[[str], None],
    backend: str | None = None,
) -> None:
    """Time one PyTorch column (`seconds()`: seconds per timed run, or None where there is no like-for-like run)
    and add its rate and ratio to `point`; a failure is kept in `{column}_error`, ours stays."""
    try:
        times = seconds()
    except Exception as e:
        log(f"{LABEL[column]} comparison failed: {one_line(e)}")
        times, point[f"{column}_error"] = None, one_line(e)
    finally:
        torch = sys.modules.get("torch")  # imported by the comparison, unless it failed before
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand PyTorch's cached blocks back for the JAX points
    if backend and (times is not None or f"{column}_error" in point):
        point[f"{column}_backend"] = backend
    if times is None:
        return
    rate = tokens / np.asarray(times, float)
    point[f"{column}_tokens_per_s"] = float(np.median(rate))
    point[f"{column}_tokens_per_s_min"] = float(rate.min())
    point[f"{column}_tokens_per_s_max"] = float(rate.max())
    point[RATIO[column]] = point["tokens_per_s"] / point[f"{column}_tokens_per_s"]


def ratio_text(point: dict) -> str:
    """' | PyTorch 448.3 tok/s, ratio 0.97x; torch.compile ...' for a progress line ('' without a comparison)."""
    parts = []
    for column in COLUMNS:
        if point.get(RATIO[column]) is not None:
            rate = point[f"{column}_tokens_per_s"]
            parts.append(f"{LABEL[column]} {rate:,.1f} tok/s, ratio {point[RATIO[column]]:.2f}x")
        elif point.get(f"{column}_error"):
            parts.append(f"{LABEL[column]} n/a ({point[f'{column}_error']})")
    return " | " + "; ".join(parts) if parts else ""


def compiled_text(point: dict) -> str:
    """The torch.compile column of `python -m benchmarks.train` / `.decode`'s progress lines ('' if not asked)."""
    if point.get("ratio_compiled"):
        rate, ratio = point["pytorch_compiled_tokens_per_s"], point["ratio_compiled"]
        return f"  | torch.compile {rate:9.1f} tok/s  ratio {ratio:.2f}x"
    error = point.get("pytorch_compiled_error")
    return f"  | torch.compile n/a ({error})" if error else ""
