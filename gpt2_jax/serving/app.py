"""The HTTP side: a FastAPI app with OpenAI's `/v1/completions` and `/v1/models`, and `/health`.

Each request's choices become `engine.Job`s; the engine's thread hands their pieces to this event loop through
`call_soon_threadsafe`, one asyncio queue per request. A streaming request sends each piece as a server-sent event
as it comes (a chunk of decode steps at a time) and ends with `data: [DONE]`; a client that goes away cancels its
jobs, which frees their rows at the engine's next chunk boundary (a streaming client is noticed at the next send,
a waiting one within `DISCONNECT_POLL_S`). Limits: the body size (413), the engine's queue (429 with Retry-After),
an API key when one is set (401; /health stays open for probes). Every error is OpenAI's error object: a body
that is no JSON object the server can read (bad bytes, deep nesting, NaN) is a 400 (protocol.py), and an exception
nothing else answered is logged once and answered as a 500 (`InternalErrors`), so no request drops a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2_jax.console import warn
from gpt2_jax.serving import protocol
from gpt2_jax.serving.choice import Piece
from gpt2_jax.serving.engine import Closed, Engine, Job, QueueFull
from gpt2_jax.serving.protocol import ApiError, Completion
from gpt2_jax.serving.rows import Settings

DISCONNECT_POLL_S = 0.5
RETRY_AFTER_S = 1


def create_app(
    engine: Engine, model_name: str, *, api_key: str | None = None, max_body_bytes: int = 1 << 20
) -> FastAPI:
    """The app over a warmed-up `engine`; the engine's thread runs while the app does (its lifespan)."""
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        # uvicorn has stopped accepting and waited for the requests in flight; anything left gets an error.
        engine.close(timeout=5)

    app = FastAPI(title="gpt2-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(InternalErrors)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        error = ApiError(
            e.status_code, f"{request.method} {request.url.path}: {e.detail}.", type="invalid_request_error"
        )
        return JSONResponse(error.body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(
                401, "Missing or incorrect API key; send 'Authorization: Bearer KEY'.", code="invalid_api_key"
            )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        status = "failed" if engine.failed else "closing" if engine.closing else "ok"
        return {"status": status, "model": model_name, **engine.stats(), "compiled": engine.compiled()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [protocol.models_object(model_name, created)]}

    @app.get("/v1/models/{model}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        authorize(request)
        if model != model_name:
            raise ApiError(404, f"The model '{model}' does not exist here; this server serves '{model_name}'.", "model")
        return protocol.models_object(model_name, created)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        authorize(request)
        body = await read_body(request, max_body_bytes)
        config = engine.config
        req = protocol.parse_completion(body, model_name, engine.tokenizer, engine.max_len, config.n_vocab)
        queue: asyncio.Queue[tuple[int, Piece | Exception]] = asyncio.Queue()
        seed = int.from_bytes(os.urandom(4), "little") if req.seed is None else req.seed
        jobs = submit(engine, req, queue, seed)
        if req.stream:
            return JobsStream(stream(req, jobs, queue, model_name), jobs)
        try:
            return await collect(request, req, jobs, queue, model_name)
        finally:
            cancel(jobs)

    return app


class InternalErrors:
    """The last guard: an exception no handler answered (a bug, a failing device) is logged once, with its cause and
    traceback, and answered with OpenAI's error object (500), never a dropped connection. A client that left while
    its body was read is nobody's error: there is no one to answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except ClientDisconnect:
            return
        except Exception as e:
            log_internal_error(f"{scope['method']} {scope['path']}", e)
            if not started:  # a response under way (a stream) cannot change its status; the stream says it itself
                error = ApiError(
                    500, f"The server failed on this request ({type(e).__name__}); it was logged.", type="server_error"
                )
                await JSONResponse(error.body(), status_code=500)(scope, receive, send)


def log_internal_error(what: str, error: BaseException) -> None:
    trace = "".join(traceback.format_exception(error)).rstrip()
    warn(f"{what} failed inside the server: {type(error).__name__}: {error}\n{trace}")


class JobsStream(StreamingResponse):
    """The server-sent events of a streaming request. However the response ends (finished, failed, or its client
    gone, even before its first byte, when the events' generator never starts and its own cleanup never runs) its
    jobs are cancelled, so their rows are freed at the engine's next chunk boundary."""

    def __init__(self, events: AsyncIterator[str], jobs: list[Job]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.jobs = jobs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            cancel(self.jobs)


async def read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"The request body is larger than this server's limit of {limit} bytes.")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_big
    return bytes(body)


def submit(engine: Engine, req: Completion, queue: asyncio.Queue, seed: int) -> list[Job]:
    """One job per (prompt, choice), OpenAI's order: choice i*n + j is prompt i's j-th."""
    loop = asyncio.get_running_loop()

    def sink(index: int):
        def put(piece: Piece | Exception) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
                loop.call_soon_threadsafe(queue.put_nowait, (index, piece))

        return put

    if len(req.prompts) * req.n > engine.max_queue:
        message = (
            f"The request asks for {len(req.prompts) * req.n} completions (prompts x n), more than this server's queue "
            f"of {engine.max_queue} holds; send fewer at once."
        )
        raise ApiError(400, message, "n")
    jobs = []
    for prompt in req.prompts:
        for j in range(req.n):
            settings = Settings(req.max_tokens, req.temperature, req.top_k, req.top_p, seed, j)
            jobs.append(Job(prompt, settings, req.stop, sink(len(jobs))))
    try:
        engine.submit(jobs)
    except QueueFull:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        message = f"The server is busy (its queue of {engine.max_queue} is full); retry after {RETRY_AFTER_S} s."
        raise ApiError(429, message, type="rate_limit_error", headers=headers)
    except Closed as e:
        raise ApiError(503, f"{e}; no new requests are taken.", type="server_error")
    return jobs


def cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled = True  # finished jobs ignore it; the others free their rows


def prefix(req: Completion, index: int) -> str:
    return req.prompt_texts[index // req.n] if req.echo else ""


def engine_error(error: Exception) -> ApiError:
    return ApiError(503, f"The request could not finish: {error}.", type="server_error")


async def collect(request: Request, req: Completion, jobs: list[Job], queue: asyncio.Queue, model: str) -> Any:
    pieces: list[list[Piece]] = [[] for _ in jobs]
    finished, checked = 0, time.monotonic()
    while finished < len(jobs):
        if time.monotonic() - checked > DISCONNECT_POLL_S:  # pieces may keep coming for a client long gone
            if await request.is_disconnected():
                return None
            checked = time.monotonic()
        try:
            index, piece = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            continue
        if isinstance(piece, Exception):
            raise engine_error(piece)
        pieces[index].append(piece)
        finished += piece.finish_reason is not None
    choices = []
    for index, ps in enumerate(pieces):
        text = prefix(req, index) + "".join(p.text for p in ps)
        logprobs = protocol.logprobs_of(ps) if req.logprobs is not None else None
        choices.append(protocol.choice(index, text, logprobs, ps[-1].finish_reason))
    usage = protocol.usage(sum(map(len, req.prompts)), sum(ps[-1].completion_tokens for ps in pieces))
    return protocol.completion_object(protocol.new_id(), model, choices, usage)


async def stream(req: Completion, jobs: list[Job], queue: asyncio.Queue, model: str) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece, a usage chunk if asked for, then [DONE]."""
    id_ = protocol.new_id()
    event = lambda body: f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
    started = [False] * len(jobs)
    finished, completion_tokens = 0, 0
    try:
        while finished < len(jobs):
            index, piece = await queue.get()
            if isinstance(piece, Exception):
                yield event(engine_error(piece).body())
                return
            text = piece.text if started[index] else prefix(req, index) + piece.text
            started[index] = True
            logprobs = protocol.logprobs_of([piece]) if req.logprobs is not None else None
            yield event(
                protocol.completion_object(id_, model, [protocol.choice(index, text, logprobs, piece.finish_reason)])
            )
            finished += piece.finish_reason is not None
            completion_tokens += piece.completion_tokens
        if req.include_usage:
            usage = protocol.usage(sum(map(len, req.prompts)), completion_tokens)
            yield event(protocol.completion_object(id_, model, [], usage))
        yield "data: [DONE]\n\n"
    except Exception as e:  # the status (200) is sent: say it in the stream, as OpenAI's streams do
        log_internal_error("a streaming completion", e)
        yield event(
            ApiError(
                500, f"The server failed on this request ({type(e).__name__}); it was logged.", type="server_error"
            ).body()
        )
    finally:
        cancel(jobs)  # the client went away (or all is done): free the rows at once
