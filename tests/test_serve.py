"""`gpt2-jax serve` as clients use it: the official `openai` package against the server in a subprocess on
127.0.0.1 (a port the system picks), a tiny random model. Completions, streaming, n > 1, stop strings, logprobs,
echo, greedy output equal to sample.py's, 32 concurrent requests, every kind of bad input, a client that goes away
mid-stream, SIGTERM. Waits are bounded hang guards, never timings."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from gpt2_jax import sample, serve
from gpt2_jax.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"
MAX_LEN = 64
START_TIMEOUT_S = 240  # import, build and compile on a loaded 2-core machine


class Server:
    """`python -m gpt2_jax.serve` in a subprocess; `url` once it listens."""

    def __init__(self, *flags: str) -> None:
        args = [
            "--model",
            "scratch:tiny",
            "--model_name",
            "tiny",
            "--port",
            "0",
            "--max_len",
            str(MAX_LEN),
            "--api_key",
            KEY,
            *flags,
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "gpt2_jax.serve", *args]
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.log: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.log.append(line)
            found = re.search(r"serving \S+ at (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                self.url = found.group(1)
                # Keep reading (a full pipe would stop the server at its next log line); `stop` joins it.
                self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
                self.reader.start()
                return
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise AssertionError("the server did not start:\n" + "".join(self.log))

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120, **kw)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        finally:
            self.proc.kill()
        self.reader.join(timeout=60)
        return code


@pytest.fixture(scope="module")
def server():
    s = Server("--max_batch", "8", "--chunk", "2", "--max_body_bytes", "4096")
    yield s
    assert s.stop() == 0, "".join(s.log)


def complete(server: Server, **kw):
    return server.client().completions.create(model="tiny", **kw)


def readme_example() -> str:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("### Serve\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_start_up_note_names_the_compute_dtype_and_why(server):
    compiled = next(line for line in server.log if line.startswith("note: compiled in"))
    assert compiled.rstrip().endswith(
        "; float32 weights and compute (the default on CPUs, where 16-bit matmuls are slower)"
    )


def test_readme_example_runs_against_the_server(server, capsys):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 5
    code = code.replace("http://127.0.0.1:8000/v1", f"{server.url}/v1").replace('"124M"', '"tiny"')
    exec(compile(code.replace('api_key="unused"', f'api_key="{KEY}"'), "README.md", "exec"), {})
    reply = complete(server, prompt="The meaning of life is", max_tokens=40, temperature=0)
    assert capsys.readouterr().out == reply.choices[0].text + "\n"


def test_greedy_is_sample_py_at_temperature_0_token_for_token(server, capsys):
    prompt = "Hello, I'm a language model,"
    flags = ["--model", "scratch:tiny", "--prompt", prompt, "--temperature", "0", "--length", "30", "--format", "jsonl"]
    assert sample.main([*flags, "--seed", "0"]) == 0
    expected = json.loads(capsys.readouterr().out)
    reply = complete(server, prompt=prompt, max_tokens=30, temperature=0, logprobs=0)
    choice = reply.choices[0]
    assert choice.text == expected["text"] and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(expected["tokens"]) == reply.usage.completion_tokens == 30
    assert "".join(choice.logprobs.tokens) == choice.text and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert reply.usage.prompt_tokens == len(sample.load_sampler("scratch:tiny", None).tokenizer.encode(prompt))


def test_streaming_sends_the_same_text_in_pieces_and_ends_with_done(server):
    body = {"model": "tiny", "prompt": ["One", "Two"], "max_tokens": 12, "seed": 3, "n": 2, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth(), timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts, reasons = ["", "", "", ""], [None] * 4
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["text"]
        reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    whole = complete(server, prompt=["One", "Two"], max_tokens=12, seed=3, n=2)
    assert texts == [c.text for c in whole.choices] and reasons == ["length"] * 4
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    assert len(set(texts)) == 4  # n choices differ; the order is OpenAI's: prompt i's choice j at i * n + j


def test_stop_strings_echo_and_seeds(server):
    full = complete(server, prompt="Stop here", max_tokens=24, temperature=0).choices[0].text
    stop = full[10:14]
    reply = complete(server, prompt="Stop here", max_tokens=24, temperature=0, stop=[stop, "never"])
    assert reply.choices[0].text == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"
    echoed = complete(server, prompt="Stop here", max_tokens=24, temperature=0, echo=True).choices[0].text
    assert echoed == "Stop here" + full
    a, b, c = (complete(server, prompt="x", max_tokens=10, seed=s).choices[0].text for s in (1, 1, 2))
    assert a == b != c


def test_32_concurrent_requests_each_get_their_own_answer(server):
    requests = [
        dict(prompt=f"Request number {i}", max_tokens=6 + i, seed=i, temperature=[0, 0.7, 1.0, 1.3][i % 4], top_p=0.9)
        for i in range(8)
    ]
    compiled = httpx.get(f"{server.url}/health").json()["compiled"]
    alone = [complete(server, **r).choices[0].text for r in requests]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda i: complete(server, **requests[i % 8]).choices[0].text, range(32)))
    assert together == [alone[i % 8] for i in range(32)]
    assert httpx.get(f"{server.url}/health").json()["compiled"] == compiled > 0  # varied traffic, no new compile


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# Python 3.11's JSON reader stops at 1000 levels, 3.13's goes deeper: a 400 either way, never a 500.
DEEP = ("nested too deeply", "'prompt' must be")
BAD = {  # name: (body, status, a phrase of the message, or phrases one of which it holds)
    "invalid JSON": (b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    "not UTF-8": (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    "not an object": (b"[1, 2]", 400, "JSON object"),
    "unknown field": ({"prompt": "x", "temprature": 0.5}, 400, "Unrecognized request argument supplied: temprature"),
    "wrong type": ({"prompt": "x", "max_tokens": "ten"}, 400, "'max_tokens' must be a whole number"),
    "bool as a number": ({"prompt": "x", "temperature": True}, 400, "'temperature' must be a number"),
    "no prompt": ({"max_tokens": 3}, 400, "needs 'prompt'"),
    "prompt too long": ({"prompt": [1] * (MAX_LEN + 1), "max_tokens": 1}, 400, "maximum context length"),
    "max_tokens past the context": ({"prompt": "x", "max_tokens": MAX_LEN}, 400, "maximum context length"),
    "top_k over the cap": ({"prompt": "x", "top_k": 101}, 400, "'top_k' must be a whole number at least 1"),
    "token outside the vocabulary": ({"prompt": [50257]}, 400, "outside the vocabulary"),
    "unsupported penalty": ({"prompt": "x", "presence_penalty": 0.5}, 400, "not supported"),
    "echo with logprobs": ({"prompt": "x", "echo": True, "logprobs": 1}, 400, "not supported"),
    "another model": ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    "body too large": ({"prompt": "x" * 5000}, 413, "larger than"),
    # Python 3.11's JSON reader stops at 1000 levels, 3.13's goes deeper: a 400 either way, never a 500.
    "nested deeply": (
        b'{"model": "tiny", "prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        400,
        ("nested too deeply", "'prompt' must be"),
    ),
    "NaN": (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "not valid JSON"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_an_openai_error_with_one_sentence(server, name):
    body, status, phrase = BAD[name]
    content = body if isinstance(body, bytes) else json.dumps({"model": "tiny", **body}).encode()
    r = httpx.post(f"{server.url}/v1/completions", content=content, headers=auth(), timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    phrases = phrase if isinstance(phrase, tuple) else (phrase,)
    assert any(p in error["message"] for p in phrases), error["message"]
    assert error["message"].endswith(".") and "\n" not in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_the_api_key_is_required(server):
    for headers in ({}, auth("wrong")):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # probes need no key


def test_a_client_that_goes_away_mid_stream_frees_its_row(server):
    health = lambda: httpx.get(f"{server.url}/health", timeout=30).json()
    cancelled = health()["cancelled"]
    # 32 choices through 8 rows: still far from done when the client leaves, however the machine schedules it.
    body = {"model": "tiny", "prompt": "Go on", "max_tokens": MAX_LEN - 8, "stream": True, "n": 32}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth(), timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 60
    while (h := health())["active_rows"] or h["waiting"] or h["cancelled"] == cancelled:
        assert time.monotonic() < deadline, f"the row was not freed: {h}"
        time.sleep(0.1)


def test_a_lone_surrogate_in_the_prompt_is_replaced_not_a_crash(server):
    """`"\\ud800"` is valid JSON; the tokenizer cannot encode it, so it becomes U+FFFD, as bad bytes do."""
    content = b'{"model": "tiny", "prompt": "Hello \\ud800 world", "max_tokens": 3, "temperature": 0, "echo": true}'
    r = httpx.post(f"{server.url}/v1/completions", content=content, headers=auth(), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("Hello \ufffd world")
    assert complete(server, prompt="x", max_tokens=1).choices  # and the server lives


def test_a_streaming_client_that_leaves_right_after_sending_frees_its_rows(server):
    """The request is sent whole and the socket closed at once. Its 32 choices (8 rows) must be dropped, not decoded
    to the end (where none would count as cancelled)."""
    health = lambda: httpx.get(f"{server.url}/health", timeout=30).json()
    cancelled = health()["cancelled"]
    body = json.dumps({"model": "tiny", "prompt": "Go on", "max_tokens": MAX_LEN - 8, "stream": True, "n": 32})
    host, port = server.url.removeprefix("http://").split(":")
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request.encode())
    deadline = time.monotonic() + 120
    while (h := health())["active_rows"] or h["waiting"]:
        assert time.monotonic() < deadline, f"the rows were not freed: {h}"
        time.sleep(0.1)
    assert h["cancelled"] - cancelled >= 16  # the 8 seated first might finish on a very slow machine; not 16 more


def test_a_port_in_use_is_one_sentence_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            run_cli(serve.main, ["--model", "no/such/model", "--port", str(port)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: Cannot listen on 127.0.0.1:{port} (") and err.count("\n") == 1


def test_a_stream_whose_client_is_gone_before_its_first_byte_cancels_its_jobs():
    """In process: the ASGI `receive` says the client left as soon as the body is read, and `send` yields to the
    event loop (as uvicorn's does while a socket's buffer is full), so the response is cancelled while it sends its
    headers, before its events' generator ever starts (whose own cleanup then never runs). The jobs must be
    cancelled all the same; the engine (not started here) would otherwise decode them to max_tokens."""
    from gpt2_jax.model.decode import decode_weights
    from gpt2_jax.serving.app import create_app
    from gpt2_jax.serving.engine import Engine
    from gpt2_jax.weights.loading import load_model

    model = load_model("scratch:tiny")
    engine = Engine(decode_weights(model.params, model.config), model.config, model.tokenizer, max_len=MAX_LEN)
    app = create_app(engine, "tiny")
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 8, "stream": True, "n": 3}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await asyncio.sleep(0)
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert len(engine.waiting) == 3 and all(job.cancelled for job in engine.waiting)
    assert not [m for m in sent if m.get("body")]  # nothing reached the client


def test_a_full_queue_answers_429_with_retry_after():
    """In process, the engine not started: nothing leaves the queue, so the next request cannot fit."""
    from gpt2_jax.model.decode import decode_weights
    from gpt2_jax.serving.app import create_app
    from gpt2_jax.serving.engine import Engine, Job
    from gpt2_jax.serving.rows import Settings
    from gpt2_jax.weights.loading import load_model

    model = load_model("scratch:tiny")
    engine = Engine(decode_weights(model.params, model.config), model.config, model.tokenizer, max_queue=2)
    engine.submit([Job([1], Settings(1, 1.0, 40, 1.0, 0, 0), (), lambda piece: None)])
    app = create_app(engine, "tiny")

    async def post(n: int) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": n})

    r = asyncio.run(post(2))
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_sigterm_finishes_the_request_in_flight_refuses_new_ones_and_exits_0():
    # 16 choices through one row, a token per chunk: the request is still in flight when uvicorn (which checks for
    # a signal every 0.1 s) begins its shutdown, however fast the machine.
    s = Server("--max_batch", "1", "--chunk", "1")
    n, length = 16, MAX_LEN - 8
    body = {"model": "tiny", "prompt": "Keep going", "max_tokens": length, "stream": True, "temperature": 0, "n": n}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, headers=auth(), timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while True:  # the listening socket closes at once
            try:
                httpx.get(f"{s.url}/health", timeout=30)
            # Refused outright, or (on a loaded machine) accepted into the backlog just before the listening socket
            # closed and then reset unanswered: either way no new request is served.
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                break
            assert time.monotonic() < deadline, "the server still accepts connections after SIGTERM"
            time.sleep(0.05)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    pieces = [json.loads(line.removeprefix("data: "))["choices"][0] for line in [first, *rest[:-1]]]
    texts, reasons = [""] * n, [None] * n
    for p in pieces:
        texts[p["index"]] += p["text"]
        reasons[p["index"]] = p["finish_reason"] or reasons[p["index"]]
    assert reasons == ["length"] * n and texts == [complete_sample_text("Keep going", length)] * n
    assert s.proc.wait(timeout=60) == 0
    s.reader.join(timeout=60)
    assert "Waiting for connections to close" in "".join(s.log)  # the request was still in flight at SIGTERM


def complete_sample_text(prompt: str, length: int) -> str:
    """The greedy text sample.py's Python API gives, to check the drained request's text whole."""
    sampler = sample.load_sampler("scratch:tiny", None)
    return sampler.generate([prompt], length=length, temperature=0)[0][0]
