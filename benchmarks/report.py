"""Benchmark output: the environment, a readable table, the JSON file and the tokens/s-against-batch plot.

    python -m benchmarks.report a.json b.json --json all.json --plot all.png   # merge runs, print one table

The JSON file is `{"environment": {...}, "points": [...]}`; `benchmarks/suite.py` documents the fields of a point.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import tempfile
from collections.abc import Sequence
from typing import Any

import jax

from benchmarks.host import cpu_model, package_version
from gpt2_jax.cli import run_cli
from gpt2_jax.errors import UserError

JOBS = ("train", "prefill", "decode")


def environment() -> dict[str, Any]:
    """Where the numbers came from: devices, library versions, XLA flags, date, host CPUs and load."""
    devices = jax.local_devices()
    return {
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "device_count": len(devices),
        "global_device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": package_version("jaxlib"),
        "flax": package_version("flax"),
        "optax": package_version("optax"),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_num_cpu_devices": jax.config.jax_num_cpu_devices,  # -1: not set (see benchmarks/__main__.py)
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host_cpu": cpu_model(),
        "host_cpu_count": os.cpu_count(),
        "host_load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def describe_environment(env: dict[str, Any]) -> str:
    load = env.get("host_load_average")
    return (
        f"{env['device_kind']} x{env['device_count']} ({env['platform']}), jax {env['jax']}, jaxlib {env['jaxlib']}, "
        f"flax {env['flax']}, optax {env['optax']}, torch {env['torch'] or 'not installed'}; "
        f"{env['host_cpu_count']} x {env.get('host_cpu') or 'CPU'}"
        + (f", load {load[0]:.1f}" if load else "")
        + f"; {env['date']}"
    )


# --- the table -------------------------------------------------------------------------------------------------
def _number(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _row(p: dict[str, Any], scaling: bool) -> list[str]:
    seq = f"{p['seq']}+{p['new_tokens']}" if p.get("new_tokens") else str(p["seq"])
    model = f"{p['preset']} {p['n_layer']}x{p['n_embd']}"
    remat = "on" if p.get("remat") else "off"
    unroll = str(p.get("scan_unroll") or "-")
    common = [p["job"], model, str(p["batch"]), seq, p["dtype"], p.get("attention", "-"), remat, unroll]
    common.append(str(p["devices"]))
    if p.get("error"):
        return [*common, f"FAILED: {p['error']}"]
    spread = f"{_number(p.get('tokens_per_s_min'))}-{_number(p.get('tokens_per_s_max'))}"
    memory = p.get("memory_peak_bytes")
    return [
        *common,
        _number(p["tokens_per_s"]),
        spread,
        *([_percent(p.get("scaling_efficiency"))] if scaling else []),
        _number(p.get("compile_s"), 1),
        _percent(p.get("mfu")),
        _number(p["model_flops_per_s"] / 1e12, 2) if p.get("model_flops_per_s") else "-",
        "-" if memory is None else f"{memory / 2**30:.1f}",
        _percent(p.get("bandwidth_fraction")),
        _number(p.get("kernels_per_step")),
        *_pytorch_cells(p, "pytorch", "ratio"),
        *_pytorch_cells(p, "pytorch_compiled", "ratio_compiled"),
    ]


def _pytorch_cells(p: dict[str, Any], column: str, ratio: str) -> list[str]:
    """tok/s and ratio of one PyTorch column (benchmarks/compare.py): 'n/a' where it could not run."""
    if p.get(ratio) is None:
        return ["n/a", "n/a"] if p.get(f"{column}_error") else ["-", "-"]
    return [_number(p[f"{column}_tokens_per_s"]), f"{p[ratio]:.2f}x"]


HEADER = [
    "job", "model", "batch", "seq", "dtype", "attn", "remat", "unroll", "dev", "tok/s", "min-max", "compile s", "MFU",
    "TFLOP/s", "peak GiB", "of BW", "kern/step", "PyTorch tok/s", "ratio", "torch.compile tok/s", "ratio",
]  # fmt: skip
SCALING_COLUMN = "scaling"  # after min-max, where any point has a scaling_efficiency
SCALING_NOTE = (
    "scaling: tokens/s over the 1-device tokens/s at the same global batch, over the ideal speed-up (N on N\n"
    "accelerators; 1 on a CPU, whose host devices share the same cores: there it is the cost of data parallelism,\n"
    "not a speed-up)."
)


def format_table(points: Sequence[dict[str, Any]]) -> str:
    """One aligned text row per point (median tokens/s, its min-max over the timed runs, and the rest); with a
    scaling column and a note under the table where points were measured on several device counts."""
    scaling = any(p.get("scaling_efficiency") is not None for p in points)
    header = list(HEADER)
    if scaling:
        header.insert(header.index("min-max") + 1, SCALING_COLUMN)
    rows = [header] + [_row(p, scaling) for p in points]
    widths = [max(len(r[i]) for r in rows if i < len(r) and not r[i].startswith("FAILED")) for i in range(len(header))]
    lines = []
    for r in rows:
        cells = [c.rjust(widths[i]) if i >= 2 else c.ljust(widths[i]) for i, c in enumerate(r[:-1])] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ([SCALING_NOTE] if scaling else []))


# --- files -----------------------------------------------------------------------------------------------------
def _atomic_write(path: str, write: Any, mode: str = "w") -> None:
    """Write through a temporary file in the same directory, fsync, rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str, env: dict[str, Any], points: Sequence[dict[str, Any]]) -> None:
    _atomic_write(path, lambda f: json.dump({"environment": env, "points": list(points)}, f, indent=1))


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"Cannot read benchmark results {path} ({e}); pass a file written by --json.")
    if not isinstance(data, dict) or "points" not in data:
        raise UserError(f"{path} holds no benchmark points; pass a file written by `python -m benchmarks --json`.")
    return data


def _series_label(p: dict[str, Any]) -> str:
    label = f"{p['preset']} {p['dtype']} seq {p['seq']}"
    if p.get("new_tokens"):
        label += f"+{p['new_tokens']}"
    if p["job"] == "train":
        label += f" {p.get('attention', '')}" + (" remat" if p.get("remat") else "")
    return label + (f" {p['devices']} dev" if p["devices"] > 1 else "")


def plot(path: str, points: Sequence[dict[str, Any]], title: str = "") -> None:
    """Tokens/s against batch size, one panel per job, one line per configuration (PyTorch dashed, torch.compile
    dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [p for p in points if not p.get("error")]
    jobs = [j for j in JOBS if any(p["job"] == j for p in good)]
    if not jobs:
        return
    fig, axes = plt.subplots(1, len(jobs), figsize=(5.5 * len(jobs), 4.2), squeeze=False)
    for ax, job in zip(axes[0], jobs):
        series: dict[str, list[dict[str, Any]]] = {}
        for p in good:
            if p["job"] == job:
                series.setdefault(_series_label(p), []).append(p)
        for label, ps in series.items():
            ps = sorted(ps, key=lambda p: p["batch"])
            batches = [p["batch"] for p in ps]
            line = ax.plot(batches, [p["tokens_per_s"] for p in ps], "o-", label=label)[0]
            for column, style, name in (("pytorch", "s--", "PyTorch"), ("pytorch_compiled", "^:", "torch.compile")):
                torch_ps = [p for p in ps if p.get(f"{column}_tokens_per_s")]
                if torch_ps:
                    ax.plot(
                        [p["batch"] for p in torch_ps], [p[f"{column}_tokens_per_s"] for p in torch_ps], style,
                        color=line.get_color(), alpha=0.6, label=f"{label} ({name})",
                    )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel("tokens/s")
        ax.set_title(job)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge benchmark JSON files, print one table, write JSON/plot.")
    parser.add_argument("inputs", nargs="+", help="files written by `python -m benchmarks --json`")
    parser.add_argument("--json", help="write the merged results here")
    parser.add_argument("--plot", help="write a PNG of tokens/s against batch size here")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    runs = [read_json(p) for p in args.inputs]
    env = runs[0].get("environment", {})
    points = [p for run in runs for p in run["points"]]
    if env:
        print(describe_environment(env))
    print(format_table(points))
    if args.json:
        write_json(args.json, env, points)
    if args.plot:
        plot(args.plot, points, describe_environment(env) if env else "")
    return 0


if __name__ == "__main__":
    run_cli(main)
