"""OpenAI's completions API as this server speaks it: the request checked field by field, errors, response shapes.

`parse_completion` turns a request body (bytes) into a `Completion` or raises `ApiError`, whose `body()` is
OpenAI's error object with one sentence saying what was wrong and what to do. Fields: OpenAI's that apply to GPT-2
(`model`, `prompt` as a string, a list of strings, a list of token ids or a list of those; `max_tokens`,
`temperature` (0 = greedy), `top_p`, `n`, `stop`, `seed`, `stream`, `stream_options.include_usage`, `logprobs`,
`echo`, `user` ignored), plus `top_k`. OpenAI fields that GPT-2 sampling here does not implement (`best_of`,
`frequency_penalty`, `presence_penalty`, `logit_bias`, `suffix`) are accepted only at their neutral values, and an
unknown field is refused, as OpenAI refuses it: a misspelt setting never silently does nothing.

`logprobs`: each chosen token's log-probability under the model's distribution at the request's temperature
(at temperature 0, the raw distribution), before top-k and top-p: OpenAI's definition. `top_logprobs` is null:
the alternatives are not computed, and `echo` with `logprobs` (which would need the prompt's) is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from gpt2_jax.sampling.text import encode_prompt
from gpt2_jax.serving.choice import Piece
from gpt2_jax.serving.engine import MAX_TOP_K
from gpt2_jax.tokenizers.base import Tokenizer
from gpt2_jax.unicode import repair_json

DEFAULT_MAX_TOKENS = 16  # OpenAI's
DEFAULT_TOP_K = 40  # the sampler's (sampling.processors.SamplingConfig)
MAX_STOPS = 4  # OpenAI's
MAX_LOGPROBS = 5  # OpenAI's
MAX_N = 128


class ApiError(Exception):
    """An HTTP error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, **kw) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = kw.get("type", "invalid_request_error")
        self.headers: dict[str, str] = kw.get("headers", {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Completion:
    """A checked completions request."""

    prompts: list[list[int]]  # token ids of each prompt
    prompt_texts: list[str]  # for `echo`
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool


def _integer(low: int, high: float) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            upper = "" if high == math.inf else f" and at most {high}"
            raise ApiError(400, f"'{name}' must be a whole number at least {low}{upper}, got {_shown(value)}.", name)
        return value

    return check


def _number(low: float, high: float, low_open: bool = False) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or not (low < value if low_open else low <= value) or value > high:
            where = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            raise ApiError(400, f"'{name}' must be a number in {where}, got {_shown(value)}.", name)
        return float(value)

    return check


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {_shown(value)}.", name)
    return value


def _neutral(*allowed: Any) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value not in allowed:
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out.", name)
        return value

    return check


def _stops(name: str, value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings.", name)
    return tuple(s for s in stops if s)


def _stream_options(name: str, value: Any) -> bool:
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise ApiError(400, "'stream_options' may only hold 'include_usage' (true or false).", name)
    return _boolean("stream_options.include_usage", value.get("include_usage", False))


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string, got {_shown(value)}.", name)
    return value


# name: (check, default when absent or null)
FIELDS: dict[str, tuple[Callable[[str, Any], Any], Any]] = {
    "model": (_string, None),
    "prompt": (lambda name, value: value, None),  # checked with the tokenizer, in `_prompts`
    "max_tokens": (_integer(1, math.inf), DEFAULT_MAX_TOKENS),
    "temperature": (_number(0, 2), 1.0),
    "top_p": (_number(0, 1, low_open=True), 1.0),
    "top_k": (_integer(1, MAX_TOP_K), DEFAULT_TOP_K),
    "n": (_integer(1, MAX_N), 1),
    "stop": (_stops, ()),
    "seed": (_integer(-(2**63), 2**64 - 1), None),
    "stream": (_boolean, False),
    "stream_options": (_stream_options, False),
    "logprobs": (_integer(0, MAX_LOGPROBS), None),
    "echo": (_boolean, False),
    "user": (_string, None),
    "best_of": (_neutral(1), 1),
    "frequency_penalty": (_neutral(0), 0),
    "presence_penalty": (_neutral(0), 0),
    "logit_bias": (_neutral({}), {}),
    "suffix": (_neutral(""), ""),
}


def parse_completion(body: bytes, model_name: str, tokenizer: Tokenizer, max_len: int, n_vocab: int) -> Completion:
    """The request in `body`, checked; `ApiError` (400, 404 for another model) with one sentence if it is bad."""
    request = _json_object(body)
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {_cut(unknown[0])}.", _cut(unknown[0]))
    for required in ("model", "prompt"):
        if request.get(required) is None:
            raise ApiError(400, f"The request needs '{required}'.", required)
    values = {
        name: default if request.get(name) is None else check(name, request[name])
        for name, (check, default) in FIELDS.items()
    }
    if values["model"] != model_name:
        message = f"The model '{_cut(values['model'])}' does not exist here; this server serves '{model_name}'."
        raise ApiError(404, message, "model", "model_not_found")
    if values["echo"] and values["logprobs"] is not None:
        raise ApiError(400, "'echo' with 'logprobs' (the prompt's log-probabilities) is not supported.", "echo")
    if values["stream_options"] and not values["stream"]:
        raise ApiError(400, "'stream_options' applies only with 'stream': true.", "stream_options")
    prompts, texts = _prompts(values["prompt"], tokenizer, n_vocab)
    for ids in prompts:
        if len(ids) + values["max_tokens"] > max_len:
            raise ApiError(
                400,
                f"This model's maximum context length is {max_len} tokens, however you requested "
                f"{len(ids) + values['max_tokens']} tokens ({len(ids)} in your prompt; {values['max_tokens']} for the "
                "completion). Please reduce your prompt or completion length.",
                "max_tokens",
                "context_length_exceeded",
            )
    return Completion(
        prompts, texts, values["max_tokens"], values["temperature"], values["top_p"], values["top_k"], values["n"],
        values["stop"], values["seed"], values["stream"], values["stream_options"], values["logprobs"], values["echo"],
    )  # fmt: skip


def _prompts(prompt: Any, tokenizer: Tokenizer, n_vocab: int) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt: a string, a list of strings, a list of ids or a list of id lists."""
    is_ids = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    if isinstance(prompt, str) or is_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or is_ids(p) for p in prompt):
        message = "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists."
        raise ApiError(400, message, "prompt")
    ids = [encode_prompt(tokenizer, p) if isinstance(p, str) else p for p in prompt]
    bad = [t for p in ids for t in p if not 0 <= t < n_vocab]
    if bad:
        raise ApiError(400, f"Token id {bad[0]} in 'prompt' is outside the vocabulary of {n_vocab}.", "prompt")
    return ids, [p if isinstance(p, str) else tokenizer.decode(p) for p in prompt]


def _json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, every string in it valid Unicode; any body that is not is a 400, never a 500."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"The request body is not valid UTF-8 (byte {e.start}); send JSON encoded as UTF-8.")
    try:
        request = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"The request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}).")
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply to read; send a flat JSON object.")
    except ValueError as e:  # Python's cap on the digits of an integer (4300)
        raise ApiError(400, f"The request body holds a number this server cannot read ({e}).")
    if not isinstance(request, dict):
        raise ApiError(400, "The request body must be a JSON object with 'model' and 'prompt'.")
    # Keys and the strings the server reads or repeats in a message: a "\ud800" escape is valid JSON, but no
    # encoder (the tokenizer's, the response's) takes a lone surrogate.
    request = {repair_json(k)[0]: v for k, v in request.items()}
    for name in ("model", "user"):
        if isinstance(request.get(name), str):
            request[name] = repair_json(request[name])[0]
    for name in ("prompt", "stop"):
        request[name] = _repair_strings(request.get(name))
    return request


def _no_constant(name: str) -> float:
    raise ApiError(400, f"The request body is not valid JSON ({name} is no JSON value; send a number).")


def _repair_strings(value: Any) -> Any:
    """A string, or a list of them, with lone surrogates replaced; anything else as it is (checked later)."""
    if isinstance(value, str):
        return repair_json(value)[0]
    if isinstance(value, list):
        return [repair_json(v)[0] if isinstance(v, str) else v for v in value]
    return value


def _shown(value: Any) -> str:
    """A request value as a message quotes it: JSON, cut short (a value can be a megabyte, or nested deep)."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):
        text = f"a {type(value).__name__}"
    return _cut(text)


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- responses ---------------------------------------------------------------------------------------------------
def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def choice(index: int, text: str, logprobs: dict[str, list] | None, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def logprobs_of(pieces: list[Piece], offset: int = 0) -> dict[str, list]:
    """OpenAI's logprobs object for these pieces (text offsets counted from `offset`)."""
    return {
        "tokens": [t for p in pieces for t in p.tokens],
        "token_logprobs": [lp for p in pieces for lp in p.logprobs],
        "top_logprobs": None,
        "text_offset": [offset + o for p in pieces for o in p.offsets],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def completion_object(
    id_: str, model: str, choices: list[dict[str, Any]], usage_: dict[str, int] | None = None
) -> dict[str, Any]:
    body = {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def models_object(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "gpt2-jax"}
