"""`python -m benchmarks --job serve` at toy size, so it cannot rot: its points, JSON and table; never its speed."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main as bench_main
from gpt2_jax.errors import UsageError


def test_serve_job_at_toy_size_writes_its_points(tmp_path, capsys):
    out = tmp_path / "serve.json"
    flags = ["--job", "serve", "--preset", "tiny", "--clients", "1,3", "--requests", "2", "--new_tokens", "8"]
    assert bench_main([*flags, "--max_batch", "2", "--json", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    assert [(p["clients"], p["requests"]) for p in points] == [(1, 2), (3, 6)]
    for p in points:
        assert not p.get("error") and p["tokens_per_s"] > 0 and p["max_len"] == 64 and p["warm_up_s"] > 0
        assert 0 < p["ttft_p50_s"] <= p["ttft_p99_s"] and p["ttft_p50_s"] <= p["latency_p50_s"] <= p["latency_p99_s"]
    assert points[0]["speedup_vs_1"] == 1
    table = capsys.readouterr().out.split("\n\n")[-1]
    assert table.split()[:3] == ["model", "clients", "requests"] and len(table.strip().splitlines()) == 3


def test_serve_job_refuses_bad_counts():
    with pytest.raises(UsageError, match="--requests"):
        bench_main(["--job", "serve", "--preset", "tiny", "--requests", "0"])
