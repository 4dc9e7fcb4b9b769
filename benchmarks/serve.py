"""Serving benchmark: `gpt2-jax serve` under 1, 4, 16, 64... concurrent streaming clients on loopback.

    python -m benchmarks --job serve                               # 124M (random weights), the CPU goal's points
    python -m benchmarks --job serve --preset tiny --clients 1,4 --requests 2 --new_tokens 16   # a quick check

The server runs in a subprocess (`python -m gpt2_jax.serve`, its compile done before the first point), the clients
here, in one asyncio loop: each sends `--requests` streaming completions back to back (a `--seq`-token prompt given
as token ids, `--new_tokens` tokens, temperature 1, top-k 40), starting no new one after `--seconds`. Per point:
aggregate tokens/s (every completion token over the point's wall time), time to first token (request sent to its
first text) and per-request latency (sent to `[DONE]`), median and p99, and the ratio of tokens/s to the 1-client
point's. Random weights rarely draw `<|endoftext|>`; the tokens counted are the server's own `usage` counts.

Fields of a point: job ('serve'), preset, n_layer, n_embd, dtype, clients, requests (completed), seq, new_tokens,
max_batch, chunk, max_len, tokens_per_s, ttft_p50_s, ttft_p99_s, latency_p50_s, latency_p99_s, wall_s,
speedup_vs_1 (where a 1-client point was measured), warm_up_s (the server's compile), error (a failed point).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_jax.config import get_config
from gpt2_jax.sampling.generate import cache_slots

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 900  # load and compile a 124M model on a loaded CPU
REQUEST_TIMEOUT_S = 600
Log = Callable[[str], None]


class ServerProcess:
    """`python -m gpt2_jax.serve` on 127.0.0.1 at a port the system picks; stopped with SIGTERM."""

    def __init__(self, flags: Sequence[str], log: Log) -> None:
        # The checkout first, then whatever else was on the path (a folder of carried wheels, say).
        paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "gpt2_jax.serve", "--port", "0", "--log_level", "warning", *flags]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.warm_up_s: float | None = None
        deadline = time.monotonic() + START_TIMEOUT_S
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            lines.append(line)
            compiled = re.search(r"compiled in ([\d.]+) s: (.*)", line)
            if compiled:
                self.warm_up_s = float(compiled.group(1))
                log(f"server: {line.strip()}")
            found = re.search(r"serving \S+ at (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                self.url = found.group(1)
                # Keep reading: a pipe nobody empties would stop the server at its next log line once full.
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()
                return
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise RuntimeError("the server did not start: " + "".join(lines[-20:]))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: Any, url: str, body: dict[str, Any]) -> dict[str, float]:
    """One streaming completion: its time to first text, latency and completion tokens."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return {"ttft_s": latency if first is None else first, "latency_s": latency, "tokens": tokens}


async def run_clients(url: str, model: str, clients: int, requests: int, seconds: float, body: dict) -> dict:
    import httpx

    body = {"model": model, **body, "stream": True, "stream_options": {"include_usage": True}}
    results: list[dict[str, float]] = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()

        async def client_loop(i: int) -> None:
            for j in range(requests):
                if time.perf_counter() - start > seconds:
                    return
                results.append(await one_request(client, url, {**body, "seed": i * requests + j}))

        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        wall = time.perf_counter() - start
    ttft, latency = (np.asarray([r[k] for r in results]) for k in ("ttft_s", "latency_s"))
    return {
        "clients": clients,
        "requests": len(results),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p99_s": float(np.percentile(latency, 99)),
        "wall_s": wall,
    }


def run(
    *,
    preset: str,
    clients: Sequence[int],
    seq: int,
    new_tokens: int,
    requests: int,
    seconds: float,
    max_batch: int,
    chunk: int | None,
    dtype: str,
    log: Log = print,
    on_point: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Start the server, measure each concurrency in turn (after one warm request), stop it; the points."""
    config = get_config(preset)
    max_len = cache_slots(seq + new_tokens, config.n_ctx)
    flags = ["--model", f"scratch:{preset}", "--model_name", preset, "--max_batch", str(max_batch)]
    flags += ["--max_len", str(max_len), "--dtype", dtype]
    flags += ["--chunk", str(chunk)] if chunk else []
    base = dict(job="serve", preset=preset, n_layer=config.n_layer, n_embd=config.n_embd, dtype=dtype, seq=seq)
    base |= dict(new_tokens=new_tokens, max_batch=max_batch, chunk=chunk, max_len=max_len)
    body = {"prompt": [int(t) for t in np.random.default_rng(0).integers(0, 50000, seq)], "max_tokens": new_tokens}
    body |= {"temperature": 1.0, "top_k": 40}
    server = ServerProcess(flags, log)
    points: list[dict] = []
    try:
        asyncio.run(run_clients(server.url, preset, 1, 1, seconds, body))  # first-request costs, outside the points
        for n in clients:
            try:
                point = dict(base, **asyncio.run(run_clients(server.url, preset, n, requests, seconds, body)))
            except Exception as e:  # keep the other points
                point = dict(base, clients=n, error=f"{type(e).__name__}: {e}")
            point["warm_up_s"] = server.warm_up_s
            points.append(point)
            log(describe(point))
            if on_point:
                on_point(points)
    finally:
        server.stop()
    single = next((p["tokens_per_s"] for p in points if p.get("clients") == 1 and not p.get("error")), None)
    for p in points:
        if single and not p.get("error"):
            p["speedup_vs_1"] = p["tokens_per_s"] / single
    return points


def describe(p: dict) -> str:
    if p.get("error"):
        return f"FAILED serve {p['preset']} {p['clients']} clients: {p['error']}"
    return (
        f"serve {p['preset']} {p['clients']:>3} clients: {p['tokens_per_s']:.1f} tok/s, TTFT p50 "
        f"{p['ttft_p50_s']:.2f} s p99 {p['ttft_p99_s']:.2f} s, latency p50 {p['latency_p50_s']:.2f} s p99 "
        f"{p['latency_p99_s']:.2f} s ({p['requests']} requests in {p['wall_s']:.1f} s)"
    )


COLUMNS = [  # (header, field, format)
    ("model", "preset", "{}"), ("clients", "clients", "{}"), ("requests", "requests", "{}"),
    ("prompt+new", None, None), ("rows", "max_batch", "{}"), ("tok/s", "tokens_per_s", "{:.1f}"),
    ("x 1 client", "speedup_vs_1", "{:.2f}x"), ("TTFT p50 s", "ttft_p50_s", "{:.2f}"),
    ("TTFT p99 s", "ttft_p99_s", "{:.2f}"), ("latency p50 s", "latency_p50_s", "{:.2f}"),
    ("latency p99 s", "latency_p99_s", "{:.2f}"),
]  # fmt: skip


def format_table(points: Sequence[dict]) -> str:
    rows = [[h for h, _, _ in COLUMNS]]
    for p in points:
        cells = []
        for _, field, fmt in COLUMNS:
            value = f"{p['seq']}+{p['new_tokens']}" if field is None else p.get(field)
            cells.append("-" if value is None else value if field is None else fmt.format(value))
        rows.append(cells if not p.get("error") else [p["preset"], str(p["clients"]), "FAILED: " + p["error"]])
    widths = [
        max(len(r[i]) for r in rows if i < len(r) and not r[-1].startswith("FAILED")) for i in range(len(rows[0]))
    ]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
