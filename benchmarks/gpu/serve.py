"""The serve part (issue 20): `gpt2-jax serve` on the card under 1, 16 and 64 concurrent streaming clients, as

    python -m benchmarks --job serve --preset 124M --clients 1,16,64 --dtype bfloat16

runs it (benchmarks/serve.py: random 124M weights in bf16, 16 rows, 16-token prompts, 128 new tokens, temperature 1,
top-k 40, 4 requests per client). Each point is recorded as it is measured: aggregate tokens/s, time to first token
and latency (p50, p99), the server's warm-up compile; the summary divides each tokens/s by the 1-client point's.
The server is a subprocess: this process leaves the GPU to it.
"""

from __future__ import annotations

from benchmarks import serve as serve_bench
from benchmarks.gpu.common import Sizes, record

SECONDS_PER_POINT = 120  # serve's default: no new request after this


def run(out: str, work: str, sizes: Sizes) -> None:
    preset, clients, requests, new_tokens = sizes.serve
    command = f"python -m benchmarks --job serve --preset {preset} --clients {','.join(map(str, clients))} "
    command += f"--requests {requests} --new_tokens {new_tokens} --dtype {sizes.dtype}"
    recorded: list[dict] = []

    def on_point(points: list[dict]) -> None:
        for point in points[len(recorded) :]:
            recorded.append(record(out, "point", **point, command=command))

    serve_bench.run(
        preset=preset, clients=clients, seq=sizes.prompt, new_tokens=new_tokens, requests=requests,
        seconds=SECONDS_PER_POINT, max_batch=16, chunk=None,
        dtype=sizes.dtype, log=lambda line: print(line, flush=True), on_point=on_point,
    )  # fmt: skip
