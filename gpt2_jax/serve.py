"""The serve command: `gpt2-jax serve` (or `python -m gpt2_jax.serve`): a model behind OpenAI's completions API.

    gpt2-jax serve --model models/124M                          # http://127.0.0.1:8000/v1/completions
    gpt2-jax serve --model runs/run1 --host 0.0.0.0 --api_key KEY   # reachable from other machines, with a key

Loads the model (any path `sample.py` takes), compiles every shape the decode loop will use (and says how long
that took), then serves with uvicorn until Ctrl-C or SIGTERM: it stops accepting, lets the requests in flight
finish (at most --drain_timeout seconds) and exits 0. The flags are checked before JAX is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from gpt2_jax.cli import ArgumentParser, run_cli
from gpt2_jax.compile_cache import use_compile_cache
from gpt2_jax.console import note
from gpt2_jax.errors import UsageError, UserError
from gpt2_jax.hints import command_for
from gpt2_jax.precision import DEFAULT_DTYPE_HELP, resolve_compute_dtype

API_KEY_ENV = "GPT2_JAX_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=command_for("serve"), description="Serve a GPT-2 model over OpenAI's completions API.")
    p.add_argument(
        "--model",
        required=True,
        help="a model path of any format, a released GPT-2 (gpt2, 124M, ...), a Hub id, or scratch:NAME (random "
        "weights)",
    )
    p.add_argument("--model_name", help="the model id clients send (default: the --model folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for every network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api_key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set, else none)")
    p.add_argument("--max_batch", type=int, default=16, help="requests decoded at once (default 16)")
    p.add_argument("--max_len", type=int, help="cache slots per request: prompt + max_tokens (default: the context)")
    p.add_argument(
        "--chunk", type=int, help="decode steps between joins and streamed pieces (default: 4 on a CPU, else 16)"
    )
    p.add_argument("--max_queue", type=int, default=256, help="choices waiting for a row before 429 (default 256)")
    p.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--drain_timeout", type=float, default=30.0, help="seconds to finish requests on shutdown (30)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help=f"compute dtype (default: by the device: "
        f"{DEFAULT_DTYPE_HELP})"
    )  # fmt: skip
    p.add_argument(
        "--log_level", choices=("debug", "info", "warning", "error"), default="info",
        help="uvicorn's log level; info logs every request (default info)",
    )  # fmt: skip
    p.add_argument("--no_compile_cache", action="store_true", help="compile anew instead of reusing JAX's disk cache")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def check_flags(args: argparse.Namespace) -> None:
    for name in ("max_batch", "max_len", "chunk", "max_queue", "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}.")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must lie in 0-65535, got {args.port}.")
    if args.drain_timeout < 0:
        raise UsageError(f"--drain_timeout must be 0 or more seconds, got {args.drain_timeout}.")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_flags(args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    sock = bind(args.host, args.port)  # before the model loads: a port in use costs no start-up time
    use_compile_cache(not args.no_compile_cache)
    import uvicorn  # JAX and the web stack are imported after the flags are known to be good

    from gpt2_jax.model.decode import decode_weights
    from gpt2_jax.serving.app import create_app
    from gpt2_jax.serving.engine import Engine
    from gpt2_jax.weights.loading import load_model

    dtype = resolve_compute_dtype(args.dtype)
    model = load_model(args.model, dtype=dtype.dtype)
    if args.max_len is not None and args.max_len > model.config.n_ctx:
        raise UsageError(f"--max_len {args.max_len} is longer than the model's context of {model.config.n_ctx}.")
    engine = Engine(
        decode_weights(model.params, model.config), model.config, model.tokenizer,
        max_batch=args.max_batch, max_len=args.max_len, chunk=args.chunk, max_queue=args.max_queue,
    )  # fmt: skip
    seconds, shapes = engine.warm_up()
    note(f"compiled in {seconds:.1f} s: {shapes}; {dtype.dtype} weights and compute ({dtype.reason})")
    name = args.model_name or Path(str(args.model).rstrip("/")).name
    app = create_app(engine, name, api_key=api_key, max_body_bytes=args.max_body_bytes)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}/v1"  # --port 0: the port the system picked
    sock.listen(2048)  # now: connections from here on wait in the backlog until uvicorn accepts them
    note(f"serving {name} at {url}" + (" (API key required)" if api_key else ""))
    config = uvicorn.Config(app, timeout_graceful_shutdown=args.drain_timeout, log_level=args.log_level)
    draining_server_class()(config).run(sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening), or one sentence saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"Cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host.")
    return sock


def draining_server_class():
    """uvicorn's Server, but a SIGTERM or Ctrl-C ends in exit 0 once the requests in flight are done.

    uvicorn's own handlers drain too, then raise the signal again so that the process dies of it (exit -15); a
    service manager should see a clean stop instead. A second signal still forces the exit, as in uvicorn.
    """
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


if __name__ == "__main__":
    run_cli(main)
