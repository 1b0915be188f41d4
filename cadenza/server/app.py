"""The HTTP side: FastAPI routes, the API-key check, request counting and OpenAI-shaped errors.

Handlers parse and tokenize on the asyncio loop, hand sequences to the engine thread (`EngineWorker.submit`) and
await their tokens; they never touch the model. A client that goes away cancels its sequences: a stream when
Starlette sees the disconnect (the generator is cancelled), a plain request through a task that waits for the
disconnect message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from cadenza.server.errors import APIError, invalid_request
from cadenza.server.metrics import Metrics
from cadenza.server.protocol import Context, Parsed, parse_chat, parse_completion
from cadenza.server.responses import Output, Responder, TokenText
from cadenza.server.schemas import ChatCompletionRequest, CompletionRequest
from cadenza.server.worker import EngineWorker, Submission, shutting_down

ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
DISCONNECTED = object()  # put in a request's queue when its client goes away


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Gate:
    """ASGI middleware: counts every answer by endpoint and status (GET /metrics), and refuses /v1/ requests
    without the API key."""

    def __init__(self, app, metrics: Metrics, api_key: str | None):
        self.app, self.metrics, self.api_key = app, metrics, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        status = 500  # unless a response starts

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope) if self.api_key and path.startswith("/v1/") else None
            if refusal is not None:
                await error_response(refusal)(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.metrics.request(endpoint, status)

    def _refusal(self, scope) -> APIError | None:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
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


async def _read(request: Request, schema: type[BaseModel]):
    """The body as `schema`. Read here rather than by FastAPI, which parses only bodies sent as application/json
    (`curl -d` sends a form type); its failures go to the same handler as FastAPI's own."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(
            f"The request body is not valid JSON ({e}). Send a JSON object, e.g. "
            '{"model": "...", "prompt": "Hello"}, with Content-Type: application/json.'
        ) from None
    if not isinstance(body, dict):
        raise APIError(f"The request body must be a JSON object; got {type(body).__name__}.")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False), body=body) from None


async def _watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
    """The body is read, so the next message is the disconnect (the client left, or the answer went out)."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(DISCONNECTED)


async def _collect(sub: Submission, request: Request, responder: Responder) -> list[Output]:
    """Waits for every sequence of a plain (not streamed) request."""
    outputs = [responder.output() for _ in sub.jobs]
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
            outputs[event.index].add(event.step)
            if event.step.finish_reason is not None:
                left -= 1
        return outputs
    finally:
        watcher.cancel()
        if left:
            sub.cancel()


async def _stream(sub: Submission, responder: Responder):
    """Server-sent events: OpenAI's chunks, then `data: [DONE]`. A failure mid-stream is sent as an error event
    (the openai client raises it). If the client goes away, Starlette cancels this generator at its await."""
    outputs = [responder.output() for _ in sub.jobs]
    left = len(outputs)
    try:
        for chunk in responder.opening():
            yield chunk
        while left:
            event = await sub.queue.get()
            if event.error is not None or event.aborted:
                yield responder.error_event((event.error or shutting_down()).body())
                break
            out = outputs[event.index]
            out.add(event.step)
            for chunk in responder.step_chunks(event.index, event.step, out):
                yield chunk
            if event.step.finish_reason is not None:
                left -= 1
        if not left and responder.parsed.include_usage:
            yield responder.usage_chunk(outputs)
        yield "data: [DONE]\n\n"
    finally:
        if left:
            sub.cancel()


def create_app(llm, worker: EngineWorker, metrics: Metrics, ctx: Context, fingerprint: str, api_key: str | None):
    app = FastAPI(title="cadenza", docs_url=None, redoc_url=None, openapi_url=None)
    texts = TokenText(llm.tokenizer)
    started = int(time.time())
    card = {
        "id": ctx.model_name,
        "object": "model",
        "created": started,
        "owned_by": "cadenza",
        "root": str(llm.checkpoint.path),
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

    async def generate(request: Request, chat: bool):
        if chat:
            parsed: Parsed = parse_chat(ctx, await _read(request, ChatCompletionRequest))
        else:
            parsed = parse_completion(ctx, await _read(request, CompletionRequest))
        n = parsed.n
        sequences = [(ids, parsed.params[i * n + j]) for i, ids in enumerate(parsed.prompts) for j in range(n)]
        responder = Responder(parsed, chat, texts, fingerprint)
        sub = worker.submit(sequences)  # from here on, the sequences are cancelled if this request ends early
        if parsed.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(_stream(sub, responder), media_type="text/event-stream", headers=headers)
        return JSONResponse(responder.body(await _collect(sub, request, responder)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    app.add_middleware(Gate, metrics=metrics, api_key=api_key)
    return app
