"""One prepared call on a lent H100/H200 that measures the accelerator goals (issue 13) on the project's code as it
is: the training step train.py builds, the sampler's decode loop, and nothing patched in. Run by gpu_verify.sh:

    OUT=/dir bash benchmarks/gpu_verify.sh                              # on the device (~8 minutes)
    GPT2_JAX_BENCH_DRY=1 OUT=/tmp/vout bash benchmarks/gpu_verify.sh    # the same phases at toy sizes, any CPU

Each phase is its own process, `python -m benchmarks.gpu_verify PHASE --out DIR`, under a time limit; every
measurement is one JSON line appended to DIR/records.jsonl as soon as it exists, so a crash or a timeout loses one
phase, not the call, and GPU_VERIFY_DEADLINE (a Unix time) makes a phase skip the points it can no longer finish.

    device          nvidia-smi's name, power limit and max clocks (they tell SXM from NVL parts), the JAX device and
                    environment, a bf16 matmul and a device copy (the card's ceilings, gpu_check.ceilings)
    train           124M, T=1024, bf16 compute, fp32 params and AdamW (benchmarks/train.py: build_train_step as
                    train.py runs it) at batch 32 and 64: tokens/s, MFU (855 MFLOP/token over the card's dense
                    bf16 peak); at batch 32 the first step's loss and gradient norm against a plain-loss step
                    (logits from GPT2.apply, float32 softmax cross-entropy) on the same params and batch
    decode          124M bf16, 16-token prompt, 128 new tokens, top-k 40, batch 1 and 64 (benchmarks/decode.py: the
                    sampler's prefill and decode loop): tokens/s end to end, ms/step, fraction of the bandwidth
                    bound (bandwidth.py); then a 1000-token generation at batch 64
    train_pytorch   the batch-32 training point beside Hugging Face PyTorch, eager and under torch.compile
    decode_pytorch  the 128-token decode points beside PyTorch `generate`, eager and compiled
    train_variant, decode_variant   the batch-32 training point / the 128-token decode points again, under the
                    XLA_FLAGS that gpu_verify.sh sets (cuBLASLt, Triton GEMMs)
    summary         no device needed: DIR/<card>-verify-<date>.json (environment, device, checks, goals, the
                    previous figures, every point; `python -m benchmarks.report` reads it, benchmarks/results/
                    keeps it) and DIR/summary.txt, which says for each goal whether it was met
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import compare, report, suite
from benchmarks import train as train_bench
from benchmarks.gpu_check import ceilings
from gpt2_jax.model.flops import peak_flops
from gpt2_jax.model.transformer import GPT2, init_params

DRY = os.environ.get("GPT2_JAX_BENCH_DRY") == "1"
PHASES = ("device", "train", "decode", "train_pytorch", "decode_pytorch", "train_variant", "decode_variant", "summary")
DEADLINE = float(os.environ.get("GPU_VERIFY_DEADLINE", "inf"))


@dataclasses.dataclass(frozen=True)
class Sizes:
    preset: str
    dtype: str
    seq: int  # training tokens per row
    train_batches: tuple[int, ...]  # the first also gets the loss check, PyTorch and the flag variants
    decode_batches: tuple[int, ...]  # the first: the batch-1 goal; the last: the bandwidth goal and the long run
    prompt: int
    new_tokens: int
    long_tokens: int
    matmul_n: int  # of the bf16 matmul ceiling
    point_s: float  # a phase starts a point only with this many seconds left (twice that beside PyTorch)
    torch_compile: str  # backend of the torch.compile column


SIZES = Sizes("124M", "bfloat16", 1024, (32, 64), (1, 64), 16, 128, 1000, 8192, 40.0, "inductor")
# The dry run checks the plumbing: torch.compile's graph capture without inductor's minutes of code generation.
DRY_SIZES = Sizes("tiny", "float32", 64, (4, 8), (1, 8), 16, 16, 96, 512, 5.0, "eager")

# The goals of issue 13, and the figures before it (README.md: one H200, 2026-11-28).
MFU_GOAL, LOSS_TOLERANCE, GRAD_NORM_TOLERANCE = 0.50, 1e-2, 0.01
BATCH1_GOAL_TOKENS_PER_S, BANDWIDTH_GOAL, BANDWIDTH_STRETCH = 4000.0, 0.30, 0.50
BATCH1_GOAL_KERNELS_PER_STEP = 60  # issue 20: launches per batch-1 decode step (193 in the 2026-11-30 trace)
PREVIOUS = {
    "card": "NVIDIA H200, 2026-11-28 (benchmarks/README.md)",
    "train_32": {"tokens_per_s": 467_237, "mfu": 0.404},
    "decode_1": {"tokens_per_s": 2_300, "per_token_ms": 0.42, "bandwidth_fraction": 0.168},
    "decode_64": {"tokens_per_s": 62_178, "per_token_ms": 1.01, "bandwidth_fraction": 0.121},
}


def record(out: str, kind: str, **fields: Any) -> None:
    """Append one record to out/records.jsonl (and print it)."""
    fields = {"kind": kind, **fields, "xla_flags": os.environ.get("XLA_FLAGS", ""), "time": time.time()}
    line = json.dumps(fields, default=float)
    print(line, flush=True)
    with open(os.path.join(out, "records.jsonl"), "a", encoding="utf-8") as f:
        f.write(line + "\n")


def nvidia_smi() -> dict[str, str]:
    """The first GPU's name, power limits, max clocks, memory and driver as nvidia-smi prints them."""
    fields = ["name", "power.limit", "power.max_limit", "clocks.max.sm", "clocks.max.mem", "memory.total"]
    query = [f"--query-gpu={','.join([*fields, 'driver_version'])}", "--format=csv,noheader"]
    try:
        out = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": compare.one_line(e)}
    return dict(zip([*fields, "driver_version"], (v.strip() for v in out.splitlines()[0].split(","))))


# --- phases on the device --------------------------------------------------------------------------------------------
def phase_device(out: str, sizes: Sizes) -> None:
    device = jax.devices()[0]
    peak, source = peak_flops(device, sizes.dtype)
    record(
        out, "device", environment=report.environment(), nvidia_smi=nvidia_smi(), peak_flops=peak,
        peak_source=source, **ceilings(sizes.matmul_n),
    )  # fmt: skip


def measure(out: str, phase: str, sweeps: list[suite.Sweep], sizes: Sizes, *, pytorch: bool = False) -> list[dict]:
    """Every point of `sweeps` through the benchmark runner (a failed point keeps its error), each recorded as it
    is measured; points are skipped once too little time is left."""
    runner = suite.Runner(compare=pytorch, log=lambda line: print(line, flush=True))
    points = []
    for sweep in sweeps:
        if time.time() + sizes.point_s * (2 if pytorch else 1) > DEADLINE:
            record(out, "skipped", phase=phase, job=sweep.job, batch=sweep.batches[0], reason="time limit")
            continue
        for point in runner.run([sweep]):
            record(out, "point", phase=phase, **point)
            points.append(point)
    return points


def train_sweep(sizes: Sizes, batch: int) -> suite.Sweep:
    return suite.Sweep(
        "train", (sizes.preset,), (batch,), seq=sizes.seq, dtype=sizes.dtype, torch_compile=sizes.torch_compile
    )


def decode_sweep(sizes: Sizes, batch: int, new_tokens: int) -> suite.Sweep:
    return suite.Sweep(
        "decode", (sizes.preset,), (batch,), seq=sizes.prompt, new_tokens=new_tokens, dtype=sizes.dtype,
        torch_compile=sizes.torch_compile,
    )  # fmt: skip


def phase_train(out: str, sizes: Sizes) -> None:
    first, *rest = sizes.train_batches
    (point,) = measure(out, "train", [train_sweep(sizes, first)], sizes) or [{}]
    if "first_loss" in point:
        record(out, "check", phase="train", **loss_check(point, plain_first_step(point)))
    measure(out, "train", [train_sweep(sizes, b) for b in rest], sizes)


def plain_first_step(point: dict) -> dict[str, float]:
    """Loss and gradient norm of a plain-loss step on the params (seed 0), batch and config of a training point:
    float32 logits from GPT2.apply, softmax cross-entropy, no fused head."""
    config = train_bench.model_config(
        point["preset"], dtype=point["dtype"], attention=point["attention"], remat=point["remat"],
        scan_unroll=point["scan_unroll"],
    )  # fmt: skip
    batch_BT1 = jnp.asarray(train_bench.random_batch(config, point["batch"], point["seq"]))

    def plain_loss(params: Any, batch_BT1: jax.Array) -> jax.Array:
        logits_BTV = GPT2(config).apply({"params": params}, batch_BT1[:, :-1]).astype(jnp.float32)
        target_BT = jnp.take_along_axis(logits_BTV, batch_BT1[:, 1:, None], axis=-1)[..., 0]
        return (jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT).mean()

    loss, grads = jax.jit(jax.value_and_grad(plain_loss))(init_params(config, 0), batch_BT1)
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


def sweeps(phase: str, sizes: Sizes) -> list[suite.Sweep]:
    """The points of the phases that only measure: the first training batch, or the 128-token decode points (with
    the long generation after them in `decode`)."""
    if phase.startswith("train"):
        return [train_sweep(sizes, sizes.train_batches[0])]
    points = [decode_sweep(sizes, b, sizes.new_tokens) for b in sizes.decode_batches]
    long = [decode_sweep(sizes, sizes.decode_batches[-1], sizes.long_tokens)] if phase == "decode" else []
    return points + long


# --- the summary (no device) -----------------------------------------------------------------------------------------
def read_records(out: str) -> list[dict]:
    """records.jsonl's records; a line cut short by a killed phase is left out."""
    records = []
    path = os.path.join(out, "records.jsonl")
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def find(points: list[dict], phase: str, batch: int, new_tokens: int | None = None) -> dict | None:
    """The measured (not failed) point of `phase` at `batch`: a train point, or the decode point of `new_tokens`."""
    for p in points:
        if p["phase"] == phase and p["batch"] == batch and not p.get("error"):
            if (new_tokens is None and p["job"] == "train") or (p["job"] == "decode" and p["new_tokens"] == new_tokens):
                return p
    return None


def decode_text(p: dict) -> str:
    kernels = f", {p['kernels_per_step']:.0f} kernels/step" if p.get("kernels_per_step") is not None else ""
    return (
        f"{p['tokens_per_s']:,.0f} tok/s, {p['per_token_ms']:.3f} ms/step{kernels}, "
        f"{100 * p['bandwidth_fraction']:.1f}% of the bound ({p['bound_ms_per_step']:.3f} ms/step)"
    )


def goal(name: str, target: str, measured: str | None, met: bool | None) -> dict[str, Any]:
    """met: True or False against the target; None where it was not measured or is for the record only."""
    return {"goal": name, "target": target, "measured": measured or "not measured", "met": met}


def goals(records: list[dict], sizes: Sizes) -> list[dict[str, Any]]:
    points = [r for r in records if r["kind"] == "point"]
    found = [p for b in sizes.train_batches if (p := find(points, "train", b))]
    mfu = "; ".join(f"batch {p['batch']}: {100 * p['mfu']:.1f}% ({p['tokens_per_s']:,.0f} tok/s)" for p in found)
    checks = [r for r in records if r["kind"] == "check"]
    check = checks[0] if checks else None
    check_text = check and (
        f"loss {check['loss']:.5f} vs {check['plain_loss']:.5f} (diff {check['loss_diff']:.2e}), grad norm "
        f"{check['grad_norm']:.4f} vs {check['plain_grad_norm']:.4f} ({100 * check['grad_norm_rel_diff']:.3f}%)"
    )
    one, many = (
        find(points, "decode", b, sizes.new_tokens) for b in (sizes.decode_batches[0], sizes.decode_batches[-1])
    )
    long = find(points, "decode", sizes.decode_batches[-1], sizes.long_tokens)
    return [
        goal(f"training {sizes.preset}, T={sizes.seq}, {sizes.dtype}", f"MFU >= {MFU_GOAL:.0%}", mfu,
             max((p["mfu"] >= MFU_GOAL for p in found), default=None)),
        goal("first step against a plain-loss step", f"loss within {LOSS_TOLERANCE:g}, grad norm within "
             f"{GRAD_NORM_TOLERANCE:.0%}", check_text, check and check["ok"]),
        goal(f"decode batch {sizes.decode_batches[0]}, {sizes.prompt}+{sizes.new_tokens} tokens, top-k 40",
             f">= {BATCH1_GOAL_TOKENS_PER_S:,.0f} tok/s end to end", one and decode_text(one),
             one and one["tokens_per_s"] >= BATCH1_GOAL_TOKENS_PER_S),
        goal(f"kernels per batch-{sizes.decode_batches[0]} decode step", f"<= {BATCH1_GOAL_KERNELS_PER_STEP} "
             "(counted in the compiled decode loop, benchmarks/kernels.py)",
             one and one.get("kernels_per_step") is not None and f"{one['kernels_per_step']:.1f}",
             one and one.get("kernels_per_step") is not None
             and one["kernels_per_step"] <= BATCH1_GOAL_KERNELS_PER_STEP),
        goal(f"decode batch {sizes.decode_batches[-1]}", f">= {BANDWIDTH_GOAL:.0%} of the bandwidth bound "
             f"(stretch {BANDWIDTH_STRETCH:.0%})", many and decode_text(many)
             + (" (stretch met)" if many["bandwidth_fraction"] >= BANDWIDTH_STRETCH else ""),
             many and many["bandwidth_fraction"] >= BANDWIDTH_GOAL),
        goal(f"{sizes.long_tokens}-token generation, batch {sizes.decode_batches[-1]}", "reads only the filled "
             "cache (proven by the CPU tests; here its step time against the bound)", long and decode_text(long),
             None),
        goal("ratios against Hugging Face PyTorch in the same process", "for the record", pytorch_text(points), None),
        goal("XLA flag variants against the same points without them", "for the record", variant_text(points), None),
    ]  # fmt: skip


def pytorch_text(points: list[dict]) -> str | None:
    parts = []
    for p in points:
        if p["phase"].endswith("_pytorch") and p["job"] != "prefill" and not p.get("error"):
            cells = [
                f"{compare.LABEL[c]} {p[compare.RATIO[c]]:.2f}x" if p.get(compare.RATIO[c]) is not None
                else f"{compare.LABEL[c]} n/a ({p.get(c + '_error', 'not run')})"
                for c in compare.COLUMNS
            ]  # fmt: skip
            parts.append(f"{p['job']} batch {p['batch']}: " + ", ".join(cells))
    return "; ".join(parts) or None


def variant_text(points: list[dict]) -> str | None:
    parts = []
    for p in points:
        if p["phase"].endswith("_variant") and p["job"] != "prefill" and not p.get("error"):
            base = find(points, p["phase"].removesuffix("_variant"), p["batch"], p.get("new_tokens"))
            gain = f" ({p['tokens_per_s'] / base['tokens_per_s']:.3f}x)" if base else ""
            parts.append(f"{p['xla_flags']}: {p['job']} batch {p['batch']} {p['tokens_per_s']:,.0f} tok/s{gain}")
    return "; ".join(parts) or None


def card_name(device: dict) -> str:
    """A file-name slug for the card: 'h200' for 'NVIDIA H200', else the JAX device kind ('cpu')."""
    name = device.get("nvidia_smi", {}).get("name") or device.get("environment", {}).get("device_kind", "device")
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "device"


def summary_lines(device: dict, goal_list: list[dict], records: list[dict], gpu_check: dict | None) -> list[str]:
    smi, env = device.get("nvidia_smi", {}), device.get("environment", {})
    lines = ["DRY RUN at toy sizes: the goals' verdicts mean nothing here"] if DRY else []
    lines.append(f"device: {env.get('device_kind', '?')}; nvidia-smi: " + ", ".join(f"{k} {v}" for k, v in smi.items()))
    if "bf16_matmul_tflops" in device:
        lines.append(
            f"ceilings: {device['bf16_matmul_tflops']:,.4g} TFLOP/s bf16 matmul, {device['copy_gb_per_s']:,.0f} GB/s "
            f"copy; MFU over {device['peak_flops'] / 1e12:,.4g} TFLOP/s ({device['peak_source']})"
        )
    for g in goal_list:
        verdict = {True: "met", False: "NOT met", None: "-"}[g["met"]]
        lines.append(f"[{verdict}] {g['goal']}: {g['target']}; measured: {g['measured']}")
    train, one, many = PREVIOUS["train_32"], PREVIOUS["decode_1"], PREVIOUS["decode_64"]
    lines.append(
        f"previous ({PREVIOUS['card']}): train batch 32 {train['tokens_per_s']:,} tok/s, MFU {train['mfu']:.1%}; "
        f"decode batch 1 {one['tokens_per_s']:,} tok/s, {one['per_token_ms']} ms/step; batch 64 "
        f"{many['tokens_per_s']:,} tok/s, {many['per_token_ms']} ms/step, {many['bandwidth_fraction']:.1%} of the bound"
    )
    if gpu_check:
        lines.append("gpu_check: " + ", ".join(f"{k} {v:.4g}" for k, v in gpu_check.items() if k.endswith("rel_err")))
    lines += [f"{r['kind']}: {r['phase']} {r.get('job', '')} batch {r.get('batch', '')}: {r.get('reason', '')}"
              for r in records if r["kind"] == "skipped"]  # fmt: skip
    points = [r for r in records if r["kind"] == "point"]
    for phase in dict.fromkeys(p["phase"] for p in points):
        flags = next(p["xla_flags"] for p in points if p["phase"] == phase)
        lines += ["", f"--- {phase}" + (f" (XLA_FLAGS={flags})" if flags else "")]
        lines.append(report.format_table([p for p in points if p["phase"] == phase]))
    return lines


def phase_summary(out: str, sizes: Sizes) -> None:
    records = read_records(out)
    device = next((r for r in records if r["kind"] == "device"), {})
    gpu_check_path = os.path.join(out, "gpu_check.json")
    gpu_check = json.load(open(gpu_check_path, encoding="utf-8")) if os.path.exists(gpu_check_path) else None
    goal_list = goals(records, sizes)
    text = "\n".join(summary_lines(device, goal_list, records, gpu_check)) + "\n"
    print(text, end="")
    with open(os.path.join(out, "summary.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    date = datetime.date.today().isoformat()
    name = f"{card_name(device)}-verify-{date}{'-dry' if DRY else ''}.json"
    result = {
        "environment": device.get("environment", {}), "device": device, "goals": goal_list, "previous": PREVIOUS,
        "checks": [r for r in records if r["kind"] == "check"], "gpu_check": gpu_check,
        "skipped": [r for r in records if r["kind"] == "skipped"],
        "points": [r for r in records if r["kind"] == "point"],
    }  # fmt: skip
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"results: {os.path.join(out, name)} (copy it into benchmarks/results/)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=PHASES)
    parser.add_argument("--out", required=True, help="folder of records.jsonl and the summary")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sizes = DRY_SIZES if DRY else SIZES
    if args.phase in ("device", "train", "summary"):
        {"device": phase_device, "train": phase_train, "summary": phase_summary}[args.phase](args.out, sizes)
    else:
        measure(args.out, args.phase, sweeps(args.phase, sizes), sizes, pytorch=args.phase.endswith("_pytorch"))


if __name__ == "__main__":
    main()
