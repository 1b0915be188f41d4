"""Runs the server: the socket, the engine thread, uvicorn, and an orderly stop.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections; the engine thread finishes the step under way and ends
every sequence (streams get an error event and `data: [DONE]`, plain requests a 503); uvicorn waits for those
answers to go out (at most SHUTDOWN_GRACE_S), the thread is joined, and the process exits with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import signal
import socket
import sys
import time
from pathlib import Path

import uvicorn

from cadenza.errors import CadenzaError
from cadenza.log import TerminalHandler
from cadenza.server.app import DEFAULT_MAX_REQUEST_BYTES, create_app
from cadenza.server.metrics import Metrics
from cadenza.server.protocol import Context
from cadenza.server.worker import EngineWorker

SHUTDOWN_GRACE_S = 5.0
log = logging.getLogger(__name__)


def _timestamp(record: logging.LogRecord) -> str:
    ms = int(record.msecs)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z"


class TextFormatter(logging.Formatter):
    """`cadenza: message`; request lines (cadenza.server.access) with their UTC time first."""

    def format(self, record: logging.LogRecord) -> str:
        line = record.getMessage()
        if getattr(record, "request", None) is not None:
            line = f"{_timestamp(record)} {line}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return f"cadenza: {line}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, and a request's fields (request_id, method, path, status,
    prompt_tokens, completion_tokens, latency_ms, ttft_ms) or the message."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "request", None)
        if fields is not None:
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(log_format: str = "text", log_level: str = "info") -> None:
    """The server's lines (the address it listens on, engine failures, one line a request) go to stderr, as text
    or JSON lines, unless the program has set up logging itself; request lines show at --log-level info or
    debug."""
    logging.getLogger("cadenza.server.access").setLevel(logging.getLevelName(log_level.upper()))
    logger = logging.getLogger("cadenza.server")
    chain = logging.getLogger().handlers + logging.getLogger("cadenza").handlers + logger.handlers
    if any(not isinstance(h, TerminalHandler) for h in chain):
        return  # the program's own logging
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())  # as cadenza.log's handler
    logger.handlers = [handler]
    logger.propagate = False  # not twice, and not as cadenza.log's plain lines
    logger.setLevel(logging.INFO)


def exposure_warning(sock: socket.socket, api_key: str | None) -> str | None:
    """The warning for a server that other machines can reach without a key, else None."""
    if api_key:
        return None
    host = sock.getsockname()[0]
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host.split("%")[0]).is_loopback:
            return None
    return (
        f"listening on {host}, which other machines can reach, without an API key: anyone who reaches the port "
        "can generate. Pass --api-key (or set CADENZA_API_KEY), or listen on 127.0.0.1."
    )


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the weights load so that a taken port fails at once."""
    if not 0 <= port <= 65535:
        raise CadenzaError(f"--port {port} is not a TCP port. Use 1..65535 (0 picks a free one).")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise CadenzaError(
            f"Cannot listen on {host}:{port}: {e.strerror or e}. Choose another --port (or --host), or stop the "
            "program that uses it."
        ) from None
    return sock


def fingerprint(llm, version: str) -> str:
    """Changes when what answers changes: the weights' folder, the dtype, where experts live."""
    where = llm.placement.summary() if llm.placement is not None else str(llm.device)
    key = f"{Path(llm.checkpoint.path).resolve()}|{llm.dtype}|{where}|{llm.max_context}"
    return f"cadenza-{version}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Uvicorn(uvicorn.Server):
    """Tells the engine thread to stop as soon as the signal comes (from the loop: a signal handler must not
    take the worker's lock), and logs the address once it listens."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, ready_line: str):
        super().__init__(config)
        self.worker, self.ready_line = worker, ready_line
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and not self.should_exit:
            log.info(self.ready_line)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                self.loop.call_soon_threadsafe(self.worker.shutdown)


def serve(
    llm,
    sock: socket.socket,
    model_name: str,
    api_key: str | None,
    max_queue: int,
    log_level: str,
    adapt_bytes: int | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    allowed_origins: list[str] | None = None,
    log_format: str = "text",
    prefill_chunk: int | None = None,
) -> int:
    from cadenza import __version__

    configure_logging(log_format, log_level)
    warning = exposure_warning(sock, api_key)
    if warning is not None:
        log.warning(warning)
    fp = fingerprint(llm, __version__)
    metrics = Metrics(model_name, llm.max_batch, max_queue, fp, __version__, prefill_chunk)
    worker = EngineWorker(llm, max_queue, metrics, adapt_bytes, prefill_chunk)
    worker.start()
    ctx = Context(llm, model_name, max_queue)
    app = create_app(llm, worker, metrics, ctx, fp, api_key, max_request_bytes, allowed_origins)
    # cadenza logs each request itself (status 499 for a client gone, tokens, time to first token)
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=SHUTDOWN_GRACE_S
    )
    key = ", API key required" if api_key else ""
    ready = (
        f"serving '{model_name}' at {_url(sock)}/v1 (OpenAI-compatible{key}; {llm.max_batch} sequence(s) "
        f"decode together, up to {max_queue} more wait)"
    )
    server = _Uvicorn(config, worker, ready)
    # uvicorn re-raises the signal it stopped for once it has shut down; by then the work is done, and SIGTERM's
    # default action would turn a clean stop into a death by signal
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        worker.shutdown()
        if worker.join(SHUTDOWN_GRACE_S):
            llm.close()
        else:
            log.warning("the engine thread did not stop in time; exiting anyway.")
    log.info("server stopped.")
    return 0
