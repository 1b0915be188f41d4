"""The HTTP side: FastAPI routes, the API-key check, request counting and OpenAI-shaped errors.

Handlers read the body on the asyncio loop (at most --max-request-bytes), parse, render and tokenize it on a worker
thread (so that a huge prompt never stalls /health or the streams), hand sequences to the engine thread
(`EngineWorker.submit`) and await their tokens; they never touch the model. A client that goes away cancels its
sequences (queued ones leave the queue at once): a stream when Starlette sees the disconnect (the generator is
cancelled), a plain request through a task that waits for the disconnect message.

Every request gets one log line (logger cadenza.server.access): its id, method, path, status (499 when the client
went away first), token counts, latency and time to first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from cadenza.server.errors import APIError, invalid_request, param_of
from cadenza.server.metrics import Metrics
from cadenza.server.protocol import Context, Parsed, parse_chat, parse_completion
from cadenza.server.responses import Output, Responder, TokenText
from cadenza.server.schemas import ChatCompletionRequest, CompletionRequest
from cadenza.server.worker import EngineWorker, Submission, shutting_down

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
# POST endpoints that take a JSON body: any other content type is refused (415), so that a page on another site
# cannot make the server generate with a "simple" cross-site request (a form, or fetch with text/plain)
JSON_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
PARSE_THREADS = 4
MAX_JSON_DEPTH = 64  # arrays / objects inside each other; OpenAI's bodies need a handful
DISCONNECTED = object()  # put in a request's queue when its client goes away
CLIENT_CLOSED = 499  # the status logged and counted for a request whose client went away before its answer ended

access_log = logging.getLogger("cadenza.server.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def too_large(limit: int) -> APIError:
    return APIError(
        f"The request body is larger than this server accepts ({limit} bytes, --max-request-bytes). Send a shorter "
        "prompt or conversation, or start the server with a larger --max-request-bytes.",
        status=413,
        code="request_too_large",
    )


@dataclass
class RequestLog:
    """What a request's log line says; the handlers fill in token counts and the first token's time."""

    id: str
    method: str
    path: str
    t0: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    t_first: float | None = None
    disconnected: bool = False  # the client went away before the answer ended (a stream cut short)

    def token(self) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.completion_tokens = (self.completion_tokens or 0) + 1

    def fields(self, status: int, t_end: float) -> dict:
        def ms(t: float | None) -> float | None:
            return None if t is None else round((t - self.t0) * 1000, 1)

        return {
            "request_id": self.id,
            "method": self.method,
            "path": self.path,
            "status": status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": ms(t_end),
            "ttft_ms": ms(self.t_first),
        }


def logged_status(status: int, disconnected: bool) -> int:
    """The status a request is logged and counted with: 499 when its client left before the answer ended (the 200
    of a stream cut short, say), else the one sent."""
    return CLIENT_CLOSED if disconnected else status


def format_request(f: dict) -> str:
    """A request's log line as text: `<id> POST /v1/completions 200 prompt=12 completion=16 1234.5ms ttft=80.1ms`."""
    line = f"{f['request_id']} {f['method']} {f['path']} {f['status']}"
    if f["prompt_tokens"] is not None:
        line += f" prompt={f['prompt_tokens']} completion={f['completion_tokens'] or 0}"
    line += f" {f['latency_ms']}ms"
    if f["ttft_ms"] is not None:
        line += f" ttft={f['ttft_ms']}ms"
    return line


class Gate:
    """ASGI middleware: gives every request an id (X-Request-Id, the client's own when it sends a sane one) and a
    log line, counts every answer by endpoint and status (GET /metrics), refuses /v1/ requests without the API key,
    POSTs that are not JSON (415), and bodies over `max_body` bytes (413: by Content-Length at once, else while
    the body is read, never holding more than the limit)."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body: int = DEFAULT_MAX_REQUEST_BYTES):
        self.app, self.metrics, self.api_key, self.max_body = app, metrics, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        headers = dict(scope["headers"])
        asked = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = asked if _REQUEST_ID.fullmatch(asked) else uuid.uuid4().hex[:16]
        info = RequestLog(rid, scope["method"], path, time.perf_counter())
        scope["cadenza.request"] = info
        status = 500  # unless a response starts

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            try:
                await send(message)
            except OSError:  # the client went away (an ASGI 2.4 server says so here)
                info.disconnected = True
                raise

        read = 0

        async def bounded_receive():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_body:
                    raise too_large(self.max_body)  # answered by the app's APIError handler
            return message

        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                await error_response(refusal)(scope, receive, counting_send)
            else:
                await self.app(scope, bounded_receive, counting_send)
        except asyncio.CancelledError:  # the server gave up on it (shutdown), or the client left under a server
            info.disconnected = True  # that cancels the request's task
            raise
        finally:
            status = logged_status(status, info.disconnected)
            self.metrics.request(endpoint, status)
            fields = info.fields(status, time.perf_counter())
            access_log.info(format_request(fields), extra={"request": fields})

    def _refusal(self, scope, headers: dict) -> APIError | None:
        path = scope["path"]
        if self.api_key and path.startswith("/v1/"):
            refusal = self._key_refusal(headers)
            if refusal is not None:
                return refusal
        if scope["method"] == "POST" and path in JSON_ENDPOINTS:
            kind = headers.get(b"content-type", b"").decode("latin-1")
            media = kind.partition(";")[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                got = f"'{kind}'" if kind else "none"
                return APIError(
                    f"The request body must be JSON, sent with 'Content-Type: application/json' (got {got}; with "
                    "curl: -H 'Content-Type: application/json'). Other types are refused so that web pages cannot "
                    "make this server generate.",
                    status=415,
                    code="unsupported_media_type",
                )
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return too_large(self.max_body)
        return None

    def _key_refusal(self, headers: dict) -> APIError | None:
        header = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if not header:
            message = (
                "No API key provided. This server needs one: send the header 'Authorization: Bearer KEY' "
                "(the openai client: api_key=KEY)."
            )
        elif scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            message = "Incorrect API key provided. Send the key the server was started with (--api-key)."
        else:
            return None
        return APIError(message, status=401, code="invalid_api_key")


def _load(raw: bytes, schema: type[BaseModel]):
    """The body as `schema` (on the parsing thread). Parsed here rather than by FastAPI, which reads bodies whole;
    its failures go to the same handler as FastAPI's own."""
    try:
        body = json.loads(raw)
    except RecursionError:
        field = _deep_field(raw)
        raise APIError(
            f"The request body nests arrays / objects more than {MAX_JSON_DEPTH} levels deep"
            + (f" (in '{field}')" if field else "")
            + ". Send a flatter body.",
            param=field,
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(
            f"The request body is not valid JSON ({e}). Send a JSON object, e.g. "
            '{"model": "...", "prompt": "Hello"}, with Content-Type: application/json.'
        ) from None
    if not isinstance(body, dict):
        raise APIError(f"The request body must be a JSON object; got {type(body).__name__}.")
    _check_json(body)
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False), body=body) from None


def _check_json(body: dict) -> None:
    """Refuses values nested too deep and strings that are not valid Unicode (a lone UTF-16 surrogate such as
    "\\ud800", which JSON's escapes allow but no tokenizer or encoder takes), naming the field. Iterative: a
    value's depth is bounded here, not by Python's stack; numbers (a long prompt of token ids) cost one test each."""
    todo: list[tuple[dict | list, tuple, int]] = [(body, (), 0)]
    while todo:
        value, loc, depth = todo.pop()
        if depth >= MAX_JSON_DEPTH:
            field = param_of(loc)
            raise APIError(
                f"'{field}' nests arrays / objects more than {MAX_JSON_DEPTH} levels deep. Send a flatter value.",
                param=field,
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and not key.isascii():
                _check_text(key, loc)
            if isinstance(item, str):
                if not item.isascii():
                    _check_text(item, (*loc, key))
            elif isinstance(item, dict | list):
                todo.append((item, (*loc, key), depth + 1))


def _check_text(text: str, loc: tuple) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        field = param_of(loc) or "body"
        raise APIError(
            f"'{field}' is not valid Unicode text: it holds a lone UTF-16 surrogate ({text[e.start]!r} at character "
            f"{e.start}). Send surrogates only in pairs (an emoji is \\ud83d\\ude00), or send the text as UTF-8.",
            param=param_of(loc),
        ) from None


_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


def _deep_field(raw: bytes) -> str | None:
    """The top-level key under which `raw` nests deepest past MAX_JSON_DEPTH (only when parsing failed)."""
    depth, key, last = 0, None, None
    for m in _JSON_TOKEN.finditer(raw):
        token = m.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return key
        elif token in (b"]", b"}"):
            depth -= 1
        elif token == b":" and depth == 1 and last is not None:
            with contextlib.suppress(ValueError):
                key = str(json.loads(last))
        last = token if token.startswith(b'"') else None
    return None


async def _watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
    """The body is read, so the next message is the disconnect (the client left, or the answer went out)."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(DISCONNECTED)


async def _collect(sub: Submission, request: Request, responder: Responder, info: RequestLog) -> list[Output]:
    """Waits for every sequence of a plain (not streamed) request."""
    outputs = [responder.output(job.prompt_ids) for job in sub.jobs]
    left = len(outputs)
    watcher = asyncio.create_task(_watch_disconnect(request, sub.queue))
    try:
        while left:
            event = await sub.queue.get()
            if event is DISCONNECTED:
                raise APIError("The client closed the connection.", status=499, code="client_closed_request")
            if event.error is not None:
                raise event.error
            if event.aborted:
                raise shutting_down()
            info.token()
            outputs[event.index].add(event.step)
            if event.step.finish_reason is not None:
                left -= 1
        return outputs
    finally:
        watcher.cancel()
        if left:
            sub.cancel()


async def _stream(sub: Submission, responder: Responder, info: RequestLog):
    """Server-sent events: OpenAI's chunks, then `data: [DONE]`. A failure mid-stream is sent as an error event
    (the openai client raises it). If the client goes away, Starlette cancels this generator at its await (queued
    or not)."""
    outputs = [responder.output(job.prompt_ids) for job in sub.jobs]
    left = len(outputs)
    try:
        for chunk in responder.opening():
            yield chunk
        while left:
            event = await sub.queue.get()
            if event.error is not None or event.aborted:
                yield responder.error_event((event.error or shutting_down()).body())
                break
            info.token()
            out = outputs[event.index]
            out.add(event.step)
            for chunk in responder.step_chunks(event.index, event.step, out):
                yield chunk
            if event.step.finish_reason is not None:
                left -= 1
        if not left and responder.parsed.include_usage:
            yield responder.usage_chunk(outputs)
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        info.disconnected = True
        raise
    finally:
        if left:
            sub.cancel()


def model_root(llm) -> str:
    """Where the weights come from, without this machine's paths: the hub id, else the folder's (or file's) name."""
    hub_id = getattr(llm.checkpoint, "hub_id", None)
    return hub_id.repo_id if hub_id else Path(llm.checkpoint.path).name


def create_app(
    llm,
    worker: EngineWorker,
    metrics: Metrics,
    ctx: Context,
    fingerprint: str,
    api_key: str | None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    allowed_origins: list[str] | None = None,
):
    """The app. `allowed_origins`: web origins whose pages may call the server (CORS; none by default)."""
    app = FastAPI(title="cadenza", docs_url=None, redoc_url=None, openapi_url=None)
    texts = TokenText(llm.tokenizer)
    # bodies are parsed, chat templates rendered and prompts tokenized off the event loop, a few at a time (one
    # huge prompt does not hold up the others)
    parser = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="cadenza-parse")
    started = int(time.time())
    card = {
        "id": ctx.model_name,
        "object": "model",
        "created": started,
        "owned_by": "cadenza",
        "root": model_root(llm),
        "max_model_len": ctx.max_context,
    }

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return error_response(invalid_request(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 404:
            message = (
                f"Unknown endpoint {request.method} {request.url.path}. This server answers POST "
                "/v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics."
            )
            return error_response(APIError(message, status=404, code="not_found"))
        if e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}. See the API reference for the method."
            return error_response(APIError(message, status=405, code="method_not_allowed"))
        return error_response(APIError(str(e.detail), status=e.status_code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        message = f"Internal server error: {type(e).__name__}: {e}. This is a bug in cadenza; please report it."
        return error_response(APIError(message, status=500, type="server_error"))

    @app.get("/health")
    async def health():
        if worker.alive:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        ctx.check_model(model)
        return card

    def parse(raw: bytes, chat: bool) -> Parsed:
        if chat:
            return parse_chat(ctx, _load(raw, ChatCompletionRequest))
        return parse_completion(ctx, _load(raw, CompletionRequest))

    async def generate(request: Request, chat: bool):
        info: RequestLog = request.scope["cadenza.request"]
        raw = await request.body()
        parsed = await asyncio.get_running_loop().run_in_executor(parser, parse, raw, chat)
        info.prompt_tokens = sum(len(ids) for ids in parsed.prompts) * parsed.n
        n = parsed.n
        sequences = [(ids, parsed.params[i * n + j]) for i, ids in enumerate(parsed.prompts) for j in range(n)]
        responder = Responder(parsed, chat, texts, fingerprint)
        sub = worker.submit(sequences)  # from here on, the sequences are cancelled if this request ends early
        if parsed.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(_stream(sub, responder, info), media_type="text/event-stream", headers=headers)
        return JSONResponse(responder.body(await _collect(sub, request, responder, info)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    app.add_middleware(Gate, metrics=metrics, api_key=api_key, max_body=max_request_bytes)
    if allowed_origins:  # outside the gate: preflights are answered without a key, refusals carry the headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=allowed_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    return app
