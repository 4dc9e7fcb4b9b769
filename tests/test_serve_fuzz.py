"""No request can make the server fail: generated bodies (hypothesis) against the app with its engine running, in
this process (Starlette's TestClient runs the app's lifespan, so the decode thread serves the valid ones).

Every answer must be a 200 or a 4xx carrying OpenAI's error object, and the server must serve a plain request
afterwards. The bodies: arbitrary JSON values (nested, huge integers, NaN and Infinity, every code point including
lone surrogates) in every field, arbitrary bytes, deep nesting, numbers past Python's 4300-digit cap. An exception
that still escapes (a real failure) is logged once and answered with the error object. The examples are derandomized
(the same ones every run: CI must not turn red by chance) and bounded in number; no timing is involved.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from gpt2_jax.model.decode import decode_weights
from gpt2_jax.serving import app as app_module
from gpt2_jax.serving import protocol
from gpt2_jax.serving.app import create_app
from gpt2_jax.serving.engine import Engine
from gpt2_jax.weights.loading import load_model

MODEL = "tiny"
MAX_LEN = 32  # bounds max_tokens, so any valid request decodes in a few chunks
MAX_QUEUE = 8  # bounds n: a request for more choices is a 400, not seconds of decoding
SETTINGS = settings(
    max_examples=120,
    deadline=None,  # a loaded machine decides how long an example takes, never whether it passes
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udc80", "\udfff"])
TEXT = st.text(st.characters() | SURROGATES, max_size=12)
NUMBERS = (
    st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, -1, 2**63, 2**64, 1e308, -0.0])
)
LEAVES = st.none() | st.booleans() | NUMBERS | TEXT
JSON_VALUES = st.recursive(
    LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12
)
PROMPTS = TEXT | st.lists(TEXT, max_size=3) | st.lists(st.integers(-5, 60_000), max_size=6) | JSON_VALUES


@pytest.fixture(scope="module")
def client():
    model = load_model(f"scratch:{MODEL}")
    weights = decode_weights(model.params, model.config)
    engine = Engine(weights, model.config, model.tokenizer, max_batch=4, max_len=MAX_LEN, chunk=2, max_queue=MAX_QUEUE)
    engine.warm_up()
    with TestClient(create_app(engine, MODEL, max_body_bytes=1 << 20), raise_server_exceptions=False) as c:
        yield c


def post(client: TestClient, content: bytes):
    return client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})


def check_answer(r) -> None:
    """A 200 with a completion (or a stream ending in [DONE]), or a 4xx with OpenAI's error object."""
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), r.text
        else:
            assert r.json()["object"] == "text_completion"
        return
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"].endswith("."), error


def check_alive(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


@st.composite
def bodies(draw) -> bytes:
    """A JSON object with a prompt, mostly the right model, and arbitrary values in a few fields (known or not)."""
    body = {"model": draw(st.sampled_from([MODEL, MODEL, MODEL, "gpt-4"]) | TEXT), "prompt": draw(PROMPTS)}
    fields = st.sampled_from([*protocol.FIELDS, "temprature", "\ud800"])
    for name in draw(st.sets(fields, max_size=3)):
        body[name] = draw(JSON_VALUES)
    if draw(st.booleans()):  # often a request the model can serve, so 200s are exercised too
        body.update(max_tokens=draw(st.integers(1, 4)), n=draw(st.integers(1, 3)))
    return json.dumps(body, allow_nan=True).encode()  # ASCII: a lone surrogate travels as a "\ud800" escape


@SETTINGS
@given(body=bodies())
def test_any_json_request_gets_a_200_or_an_openai_4xx(client, body):
    check_answer(post(client, body))


@settings(SETTINGS, max_examples=60)
@given(content=st.binary(max_size=64) | st.builds(lambda v: json.dumps(v, allow_nan=True).encode(), JSON_VALUES))
def test_any_bytes_get_a_200_or_an_openai_4xx(client, content):
    check_answer(post(client, content))


HOSTILE = {
    "nested deeply": b'{"model": "tiny", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "nested deeply in a field": b'{"model": "tiny", "prompt": "x", "stop": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
    "a lone surrogate in the prompt": b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 1}',
    "a lone surrogate in the model": b'{"model": "\\udfff", "prompt": "x"}',
    "a lone surrogate in a field name": b'{"model": "tiny", "prompt": "x", "\\ud800": 1}',
    "a lone surrogate in a stop string": b'{"model": "tiny", "prompt": "x", "stop": ["\\udc80"], "max_tokens": 1}',
    "UTF-8 of a surrogate": b'{"model": "tiny", "prompt": "\xed\xa0\x80"}',
    "a 5000-digit number": b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    "NaN": b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
    "Infinity": b'{"model": "tiny", "prompt": "x", "top_p": -Infinity}',
    "1e400": b'{"model": "tiny", "prompt": "x", "temperature": 1e400}',
    "a huge seed": b'{"model": "tiny", "prompt": "x", "seed": ' + str(2**70).encode() + b"}",
    "a deep value quoted in the message": b'{"model": "tiny", "prompt": "x", "n": ' + b"[" * 900 + b"]" * 900 + b"}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_bodies_get_an_answer_and_the_server_lives(client, name):
    r = post(client, HOSTILE[name])
    check_answer(r)
    if "surrogate in the prompt" in name or "stop string" in name:
        assert r.status_code == 200  # repaired (U+FFFD), not refused
    check_alive(client)


def test_an_unexpected_failure_is_logged_once_and_answered_with_the_error_object(client, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(protocol, "parse_completion", broken)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "RuntimeError" in r.json()["error"]["message"]
    err = capsys.readouterr().err
    assert err.count("RuntimeError: a bug") == 2 and err.count("failed inside the server") == 1  # line + traceback

    monkeypatch.undo()
    monkeypatch.setattr(app_module.protocol, "logprobs_of", broken)  # fails after the stream's 200 went out
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True, "logprobs": 0})
    events = [json.loads(line.removeprefix("data: ")) for line in r.text.splitlines() if line]
    assert r.status_code == 200 and events[-1]["error"]["type"] == "server_error"
    assert capsys.readouterr().err.count("failed inside the server") == 1
    monkeypatch.undo()
    check_alive(client)
