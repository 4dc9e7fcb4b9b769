"""The GPU call (`python -m benchmarks.gpu`) end to end at toy sizes on this CPU (`--dry`): every part in its own
process, the records, the summary and the results file a real call leaves in $OUT. Its own file so that the test
suite's workers share it out with the rest (it takes minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HANG_S = 900  # a subprocess still running after this is hung: a loaded machine may be ten times slower, not this


@pytest.mark.slow  # every part of the call at toy sizes, each its own process: 3-5 minutes on 2 cores
def test_gpu_call_dry_run_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "benchmarks.gpu", "--out", str(out), "--work", str(work), "--dry"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([*command, "--budget", "1200"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=HANG_S + 600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(["gpu.log", "records.jsonl", "summary.txt", next(out.glob("*.json")).name])
    records = [json.loads(line) for line in (out / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    parts = {r["part"]: r["status"] for r in records if r["kind"] == "part"}
    from benchmarks.gpu.__main__ import PARTS

    assert parts == {p.name: "ok" for p in PARTS}, parts  # every part ran and ended well, in its own process
    kinds = {r["kind"] for r in records}
    assert {"device", "shards", "numerics", "check", "peer_build", "lora", "profile", "topk"} <= kinds
    points = [r for r in records if r["kind"] == "point"]
    shards = next(r for r in records if r["kind"] == "shards")
    assert shards["ok"] and shards["tokens"] == 456_429  # data/shakespeare through gpt2-jax prepare
    train = [p for p in points if p["part"] == "train"]
    assert [p["batch"] for p in train] == [4, 8] and all(p["data"] == shards["train_pattern"] for p in train)
    decode = [(p["batch"], p["new_tokens"], p["sampling"]) for p in points if p["part"] == "decode" and
              p["job"] == "decode"]  # fmt: skip
    assert decode == [(1, 16, "top-k 40"), (1, 16, "greedy"), (8, 16, "top-k 40"), (8, 96, "top-k 40")]
    # The fused Pallas layers' A/B runs on a GPU only (a CPU's points would be XLA's): the dry run says it skipped it.
    assert any(r["kind"] == "skipped" and r.get("kernels") == "pallas" and r["part"] == "decode" for r in records)
    assert [p["clients"] for p in points if p["job"] == "serve"] == [1, 4]
    assert all(p["pytorch_tokens_per_s"] > 0 for p in points if p["part"] == "decode_pytorch" and p["job"] == "decode")
    assert [r["variant"] for r in records if r["kind"] == "lora" and "error" not in r] == ["lora", "full"]
    peers = [r for r in records if r["kind"] == "skipped" and r.get("peer")]
    assert [(r["peer"], r["batch"], r["reason"]) for r in peers] == [
        ("llm.c", 4, "no GPU (dry run)"), ("llm.c", 8, "no GPU (dry run)"),
        ("nanoGPT", 4, "no GPU (dry run)"), ("nanoGPT", 8, "no GPU (dry run)"),
    ]  # fmt: skip
    assert "-e d12 -b 4 -t 64" in peers[0]["command"] and "--batch_size=4" in peers[2]["command"]
    build = next(r for r in records if r["kind"] == "peer_build")
    assert build["dry"] and "-l:libcudnn.so.9" in build["commands"][2]  # the commands it would run, printed
    text = (out / "summary.txt").read_text(encoding="utf-8")
    assert text.startswith("DRY RUN at toy sizes") and "[-] issue 21: ours / llm.c" in text
    log = (out / "gpu.log").read_text(encoding="utf-8")
    assert "=== topk" in log and "llm.c build, in" in log and "=== done in" in log
