"""The summary (no device needed): the call's records read back, each goal of the training issue (21) and the
decoding issue (20) met or not, into OUT/summary.txt and OUT/<card>-verify-<date>.json (benchmarks/results/ keeps
it; `python -m benchmarks.report` reads its points). The entry point runs it last, whatever happened before.

    python -m benchmarks.gpu.summary --out DIR [--dry]      # again, from DIR/records.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from benchmarks import report
from benchmarks import serve as serve_bench
from benchmarks.gpu.common import DRY, DRY_SIZES, SIZES, Sizes, read_records

MFU_GOAL, LLMC_GOAL, NANOGPT_GOAL = 0.50, 1.15, 1.3
BATCH1_GOAL_TOKENS_PER_S, BANDWIDTH_GOAL, BANDWIDTH_STRETCH = 4000.0, 0.30, 0.50
BATCH1_GOAL_KERNELS_PER_STEP = 60  # issue 20: launches per batch-1 decode step (193 in the 2026-11-30 trace)
SECTIONS = {  # the results JSON's lists of records, by the records' kind
    "checks": "check", "numerics": "numerics", "shards": "shards", "peer_builds": "peer_build", "wheels": "wheels",
    "lora": "lora", "profile": "profile", "topk": "topk", "skipped": "skipped", "parts": "part",
}  # fmt: skip
PREVIOUS = (  # benchmarks/README.md: one H200, 2026-11-30 (benchmarks/results/h200-verify-2026-11-30.json)
    "previous (NVIDIA H200, 2026-11-30): train batch 32 476,551 tok/s (41.2%), batch 64 500,920 (43.3%); decode "
    "batch 1 2,153 tok/s, 0.451 ms/step; batch 64 80,980 tok/s, 0.775 ms/step, 16.4% of the bound"
)


def ok(p: dict) -> bool:
    return "error" not in p and p.get("tokens_per_s") is not None


def best(points: list[dict]) -> dict | None:
    return max(points, key=lambda p: p["tokens_per_s"], default=None)


def train_points(points: list[dict], peer: str | None) -> list[dict]:
    return [p for p in points if p["job"] == "train" and p.get("peer") == peer and ok(p)]


def decode_point(
    points: list[dict], part: str, batch: int, new_tokens: int, sampling: str = "top-k 40", kernels: str = "xla"
) -> dict | None:
    return next((p for p in points if p["part"] == part and p["job"] == "decode" and ok(p) and p["batch"] == batch
                 and p["new_tokens"] == new_tokens and p.get("sampling", "top-k 40") == sampling
                 and p.get("kernels", "xla") == kernels), None)  # fmt: skip


def fused_text(points: list[dict], batch: int, new_tokens: int) -> str | None:
    """The fused Pallas layers' batch-1 points beside XLA's (the A/B that decides a GPU's default): each sampling's
    tok/s, ms/step, kernels/step and its speed over XLA's point."""
    texts = []
    for sampling in ("top-k 40", "greedy"):
        fused, xla = (decode_point(points, "decode", batch, new_tokens, sampling, k) for k in ("pallas", "xla"))
        failed = [p for p in points if p.get("kernels") == "pallas" and p["job"] == "decode" and p.get("error")
                  and p["batch"] == batch and p.get("sampling", sampling) == sampling]  # fmt: skip
        if fused:
            over = f", {fused['tokens_per_s'] / xla['tokens_per_s']:.2f}x XLA's" if xla else ""
            texts.append(f"{sampling}: {decode_text(fused)}{over}")
        elif failed:
            texts.append(f"{sampling}: FAILED: {failed[0]['error']}")
    return "; ".join(texts) or None


def train_text(p: dict) -> str:
    return f"batch {p['batch']}: {p['tokens_per_s']:,.0f} tok/s, MFU {100 * p['mfu']:.1f}%"


def decode_text(p: dict) -> str:
    text = f"{p['tokens_per_s']:,.0f} tok/s, {p['per_token_ms']:.3f} ms/step"
    if p.get("bandwidth_fraction") is not None:
        text += f", {100 * p['bandwidth_fraction']:.1f}% of the bound ({p['bound_ms_per_step']:.3f} ms/step)"
    return text + (f", {p['kernels_per_step']:.0f} kernels/step" if p.get("kernels_per_step") is not None else "")


def goal(issue: int, name: str, target: str, measured: str | None, met: bool | None) -> dict[str, Any]:
    """met: True or False against the target; None where it was not measured or is for the record only."""
    return {"issue": issue, "goal": name, "target": target, "measured": measured or "not measured", "met": met}


def ratio_goal(name: str, target: float, ours: dict | None, theirs: dict | None) -> dict[str, Any]:
    text = met = None
    if ours and theirs:
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        text = f"ours {train_text(ours)} / {name} {train_text(theirs)} (our count) = {ratio:.2f}x"
        met = ratio >= target
    return goal(21, f"ours / {name}, each at its best batch", f">= {target}x tokens/s", text, met)


def training_goals(records: list[dict], points: list[dict], s: Sizes) -> list[dict]:
    ours = train_points(points, None)
    check = next((r for r in records if r["kind"] == "check"), None)
    check_text = check and (
        f"loss {check['loss']:.5f} vs {check['plain_loss']:.5f} (diff {check['loss_diff']:.2e}), grad norm "
        f"{check['grad_norm']:.4f} vs {check['plain_grad_norm']:.4f} ({100 * check['grad_norm_rel_diff']:.3f}%)"
    )
    lora = [r for r in records if r["kind"] == "lora"]
    lora_text = "; ".join(
        f"{r['variant']}: {r['error']}" if "error" in r else
        f"{r['variant']}{' (remat)' if r['remat'] else ''}: {1e3 * r['median_step_s']:,.0f} ms/step, device peak "
        + ("-" if r.get("device_peak_bytes") is None else f"{r['device_peak_bytes'] / 2**30:.2f} GiB")
        + f", {r['trainable_params']:,} trainable params"
        for r in lora
    )  # fmt: skip
    shards = next((r for r in records if r["kind"] == "shards"), None)
    llmc = train_points(points, "llm.c")
    on_shards = [any(p.get("data") == shards["train_pattern"] for p in who) for who in (ours, llmc)] if shards else []
    shard_text = shards and (
        f"{len(shards['shards'])} shards, {shards['tokens']:,} tokens ({shards['command']}); ours on them: "
        + ", llm.c: ".join("yes" if on else "no" for on in on_shards)
        + (f"; {shards['error']}" if shards.get("error") else "")
    )
    model = f"{s.preset}, T={s.seq}, {s.dtype}"
    lora_preset, lora_batch, lora_seq = s.lora
    return [
        goal(21, f"training {model}, ours", f"MFU >= {MFU_GOAL:.0%}", "; ".join(map(train_text, ours)),
             max((p["mfu"] >= MFU_GOAL for p in ours), default=None)),
        goal(21, "first step against a plain-loss step", "loss within 1e-2, grad norm within 1%", check_text,
             check and check["ok"]),
        ratio_goal("llm.c", LLMC_GOAL, best(ours), best(llmc)),
        ratio_goal("nanoGPT", NANOGPT_GOAL, best(ours), best(train_points(points, "nanoGPT"))),
        goal(22, "llm.c and ours train on gpt2-jax prepare's shards", "the same tokens", shard_text,
             shards["ok"] and all(on_shards) if shards and ours and llmc else None),
        goal(21, f"LoRA {lora_preset}, {s.dtype}, batch {lora_batch} x {lora_seq}",
             "for the record: peak bytes, step time", lora_text or None, None),
    ]  # fmt: skip


def decoding_goals(records: list[dict], points: list[dict], s: Sizes) -> list[dict]:
    one, many = s.decode_batches[0], s.decode_batches[-1]
    b1, greedy = decode_point(points, "decode", one, s.new_tokens), decode_point(points, "decode", one, s.new_tokens,
                                                                                  "greedy")  # fmt: skip
    b64, long = decode_point(points, "decode", many, s.new_tokens), decode_point(points, "decode", many, s.long_tokens)
    serve = [p for p in points if p["job"] == "serve" and "error" not in p]
    serve_text = "; ".join(
        f"{p['clients']} client{'s' if p['clients'] > 1 else ''}: {p['tokens_per_s']:,.0f} tok/s"
        + (f" ({p['speedup_vs_1']:.2f}x 1 client)" if p.get("speedup_vs_1") else "")
        + f", TTFT p99 {p['ttft_p99_s']:.3f} s"
        for p in serve
    )  # fmt: skip
    traces = [r for r in records if r["kind"] == "profile" and r.get("job") == "decode"]
    kernels = "; ".join(f"{k.removeprefix('decode_trace ')}: {v['kernels_per_step']:.0f} kernels/step, "
                        f"{100 * v['busy_ms_per_step'] / v['step_ms']:.0f}% busy" if v["kernels_per_step"] else
                        f"{k.removeprefix('decode_trace ')}: no device kernels in the trace"
                        for r in traces for k, v in r.items() if k.startswith("decode_trace"))  # fmt: skip
    failed = "; ".join(f"{r.get('kernels', 'xla')} layers: FAILED: {r['error']}" for r in traces if r.get("error"))
    kernels = "; ".join(filter(None, [kernels, failed]))
    return [
        goal(20, f"decode batch {one}, {s.prompt}+{s.new_tokens} tokens, top-k 40",
             f">= {BATCH1_GOAL_TOKENS_PER_S:,.0f} tok/s end to end", b1 and decode_text(b1),
             b1 and b1["tokens_per_s"] >= BATCH1_GOAL_TOKENS_PER_S),
        goal(20, f"kernels per batch-{one} decode step, top-k 40",
             f"<= {BATCH1_GOAL_KERNELS_PER_STEP} (counted in the compiled decode loop, benchmarks/kernels.py)",
             b1 and b1.get("kernels_per_step") is not None and f"{b1['kernels_per_step']:.1f}",
             b1 and b1.get("kernels_per_step") is not None and b1["kernels_per_step"] <= BATCH1_GOAL_KERNELS_PER_STEP),
        goal(20, f"decode batch {one}, greedy", "for the record", greedy and decode_text(greedy), None),
        goal(20, f"decode batch {many}", f">= {BANDWIDTH_GOAL:.0%} of the bandwidth bound (stretch "
             f"{BANDWIDTH_STRETCH:.0%})", b64 and decode_text(b64),
             b64 and b64["bandwidth_fraction"] >= BANDWIDTH_GOAL),
        goal(20, f"{s.long_tokens}-token generation, batch {many}", "for the record", long and decode_text(long), None),
        goal(20, f"decode batch {one} in the fused Pallas layers", "for the record: the default stays XLA's until "
             "this is faster", fused_text(points, one, s.new_tokens), None),
        goal(20, f"the server: {', '.join(map(str, s.serve[1]))} clients",
             "for the record: tok/s against 1 client, TTFT p99", serve_text, None),
        goal(20, "kernels per decode step (profile part's traces)", "for the record", kernels, None),
        goal(20, "decoding beside Hugging Face PyTorch", "for the record", pytorch_text(points), None),
    ]  # fmt: skip


def pytorch_text(points: list[dict]) -> str | None:
    parts = []
    for p in points:
        if p["part"] == "decode_pytorch" and p["job"] == "decode" and ok(p):
            cells = [f"{label} {p[ratio]:.2f}x" if p.get(ratio) is not None else f"{label} n/a"
                     for label, ratio in (("PyTorch", "ratio"), ("torch.compile", "ratio_compiled"))]  # fmt: skip
            parts.append(f"batch {p['batch']}: " + ", ".join(cells))
    return "; ".join(parts) or None


def card_name(device: dict) -> str:
    """A file-name slug for the card: 'h200' for 'NVIDIA H200', else the JAX device kind ('cpu')."""
    name = device.get("nvidia_smi", {}).get("name") or device.get("environment", {}).get("device_kind", "device")
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "device"


def peer_lines(points: list[dict]) -> list[str]:
    lines = []
    for p in points:
        if p.get("peer") and p["job"] == "train":
            if not ok(p):
                lines.append(f"{p['peer']:8s} batch {p['batch']:>3}: FAILED: {p.get('error')}")
                continue
            printed = "" if p.get("mfu_printed") is None else f", its own MFU line {100 * p['mfu_printed']:.1f}%"
            lines.append(f"{p['peer']:8s} batch {p['batch']:>3}: {p['tokens_per_s']:,.0f} tok/s, {p['step_ms']:.1f} "
                         f"ms/step, MFU {100 * p['mfu']:.1f}% (our count){printed}")  # fmt: skip
    return lines


def summary_lines(device: dict, goal_list: list[dict], records: list[dict], dry: bool = False) -> list[str]:
    smi, env = device.get("nvidia_smi", {}), device.get("environment", {})
    lines = ["DRY RUN at toy sizes: the goals' verdicts mean nothing here"] if dry else []
    lines.append(f"device: {env.get('device_kind', '?')}; nvidia-smi: " + ", ".join(f"{k} {v}" for k, v in smi.items()))
    if "bf16_matmul_tflops" in device:
        lines.append(
            f"ceilings: {device['bf16_matmul_tflops']:,.4g} TFLOP/s bf16 matmul, {device['copy_gb_per_s']:,.0f} GB/s "
            f"copy; MFU over {device['peak_flops'] / 1e12:,.4g} TFLOP/s ({device['peak_source']})"
        )
    for g in goal_list:
        verdict = {True: "met", False: "NOT met", None: "-"}[g["met"]]
        lines.append(f"[{verdict}] issue {g['issue']}: {g['goal']}: {g['target']}; measured: {g['measured']}")
    lines.append(PREVIOUS)
    numerics = next((r for r in records if r["kind"] == "numerics"), None)
    if numerics:
        shown = [f"{k} {v:.4g}" for k, v in numerics.items() if k.endswith("rel_err") or k == "fused_same_argmax"]
        if "fused_error" in numerics:  # the fused Pallas layers failed on the card (check.py's fused_check)
            shown.append(f"fused_error {numerics['fused_error']}")
        lines.append("check: " + ", ".join(shown))
    for r in records:
        if r["kind"] == "skipped" or (r["kind"] == "part" and r["status"] != "ok"):
            what = " ".join(str(r[k]) for k in ("peer", "job", "batch") if r.get(k) is not None)
            lines.append(f"{r['kind']}: {r['part']} {what}: {r.get('reason') or r.get('status')}")
        if r["kind"] in ("peer_build", "wheels") and r.get("ok") is False:
            lines.append(f"{r['kind']} failed: {r.get('error')}")
    points = [r for r in records if r["kind"] == "point"]
    for part in ("train", "decode", "decode_pytorch"):
        ours = [p for p in points if p["part"] == part and p["job"] in report.JOBS]
        if ours:
            lines += ["", f"--- {part}", report.format_table(ours)]
    lines += ["", "--- peers", *peer_lines(points)] if any(p.get("peer") for p in points) else []
    serve = [p for p in points if p["job"] == "serve"]
    lines += ["", "--- serve", serve_bench.format_table(serve)] if serve else []
    return lines


def write(out: str, dry: bool = DRY) -> str:
    """summary.txt and the results JSON from out/records.jsonl (a dry run's at toy sizes); the JSON's path."""
    records = read_records(out)
    device = next((r for r in records if r["kind"] == "device"), {})
    points = [r for r in records if r["kind"] == "point"]
    single = next((p["tokens_per_s"] for p in points if p["job"] == "serve" and p.get("clients") == 1 and ok(p)), None)
    for p in points:  # serve.py adds this once all its points are in; the part records each as it comes
        if p["job"] == "serve" and ok(p) and single:
            p["speedup_vs_1"] = p["tokens_per_s"] / single
    s = DRY_SIZES if dry else SIZES
    goal_list = training_goals(records, points, s) + decoding_goals(records, points, s)
    text = "\n".join(summary_lines(device, goal_list, records, dry)) + "\n"
    print(text, end="")
    with open(os.path.join(out, "summary.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    result = {
        "environment": device.get("environment", {}), "device": device, "goals": goal_list, "previous": PREVIOUS,
        **{key: [r for r in records if r["kind"] == kind] for key, kind in SECTIONS.items()}, "points": points,
    }  # fmt: skip
    name = f"{card_name(device)}-verify-{datetime.date.today().isoformat()}{'-dry' if dry else ''}.json"
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"results: {os.path.join(out, name)} (copy it into benchmarks/results/)")
    return os.path.join(out, name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the call's folder (records.jsonl)")
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--dry", action="store_true", help="the records are a dry run's")
    args = parser.parse_args(argv)
    write(args.out, args.dry or DRY)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
