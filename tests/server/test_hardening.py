"""The server against hostile or careless clients, in this process: oversized, non-JSON and malformed bodies, clients
that leave while queued or mid-stream, CORS, the request log, and a bounded load test. The app is driven through raw
ASGI calls (a client that can leave when told) and Starlette's test client."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from cadenza import LLM  # noqa: E402
from cadenza.server.app import CLIENT_CLOSED, create_app, logged_status  # noqa: E402
from cadenza.server.errors import MAX_MESSAGE_CHARS  # noqa: E402
from cadenza.server.metrics import Metrics  # noqa: E402
from cadenza.server.protocol import Context  # noqa: E402
from cadenza.server.worker import EngineWorker  # noqa: E402
from tests.conftest import make_mixtral  # noqa: E402

HI = [{"role": "user", "content": "Hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
LIMIT = 256 * 1024  # --max-request-bytes of the test server
SLOTS, QUEUE = 2, 16


class Served:
    """An app over a worker on the tiny model, and what the tests look at."""

    def __init__(self, llm, **app_kw):
        self.llm = llm
        self.metrics = Metrics("m", llm.max_batch, QUEUE, "fp", "v")
        self.worker = EngineWorker(llm, max_queue=QUEUE, metrics=self.metrics)
        self.worker.start()
        ctx = Context(llm, "m", QUEUE)
        self.app = create_app(llm, self.worker, self.metrics, ctx, "fp", None, max_request_bytes=LIMIT, **app_kw)

    def close(self):
        self.worker.shutdown()
        self.worker.join(5)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """Two slots, a context of 4096: requests that run long enough to hold a slot while others queue."""
    threads = torch.get_num_threads()
    path = make_mixtral(tmp_path_factory.mktemp("long"), max_position_embeddings=4096)[0]
    yield LLM(path, device="cpu", dtype="float32", cpu_threads=1, max_batch=SLOTS)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(llm):
    s = Served(llm)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(served):
    with TestClient(served.app) as c:
        yield c


def error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def still_serving(client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    r = client.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text


# --- a client that can leave: raw ASGI --------------------------------------------------------------------------


class Call:
    """One request to the app; `leave` (an Event) makes its client disconnect. `chunks`: the body in pieces."""

    def __init__(self, app, method: str, path: str, body=None, headers=None, chunks=None, leave_on_data=False):
        self.app, self.method, self.path = app, method, path
        raw = json.dumps(body).encode() if body is not None else b""
        self.chunks = list(chunks) if chunks is not None else [raw]
        self.headers = {"content-type": "application/json", **(headers or {})}
        self.leave = asyncio.Event()
        self.leave_on_data = leave_on_data
        self.status: int | None = None
        self.response_headers: dict[str, str] = {}
        self.body = b""

    async def __call__(self) -> Call:
        async def receive():
            if self.chunks:
                chunk = self.chunks.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}
            await self.leave.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.response_headers = {k.decode(): v.decode() for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                self.body += message.get("body", b"")
                if self.leave_on_data and b"data: {" in self.body:
                    self.leave.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.encode(), v.encode()) for k, v in self.headers.items()],
            "client": ("127.0.0.1", 5000),
            "server": ("testserver", 80),
        }
        await self.app(scope, receive, send)
        return self

    def json(self):
        return json.loads(self.body)


async def until(cond, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# --- bodies ---------------------------------------------------------------------------------------------------------


def test_body_over_the_limit_gets_413_by_length_and_while_read(client, served):
    big = {"prompt": "x" * (LIMIT + 10), "max_tokens": 1}
    err = error(client.post(COMPLETIONS, json=big), 413)
    assert err["code"] == "request_too_large" and "--max-request-bytes" in err["message"]
    # chunked (no Content-Length): refused once the bytes read pass the limit, the rest never read
    pieces = [b'{"prompt": "', *[b"x" * 16384] * 64, b'"}']
    call = asyncio.run(Call(served.app, "POST", COMPLETIONS, chunks=pieces)())
    assert call.status == 413 and call.json()["error"]["code"] == "request_too_large"
    assert len(call.chunks) > 40  # stopped reading early
    still_serving(client)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
def test_post_that_is_not_json_gets_415(client, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = json.dumps({"prompt": "Hello", "max_tokens": 2})
    err = error(client.post(COMPLETIONS, content=body, headers=headers), 415)
    assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
    err = error(client.post(CHAT, content=json.dumps({"messages": HI}), headers=headers), 415)
    still_serving(client)


@pytest.mark.parametrize(
    "path, raw, param, words",
    [
        (COMPLETIONS, '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt", "lone UTF-16 surrogate"),
        (CHAT, '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content", "surrogate"),
        (COMPLETIONS, '{"prompt": ["ok", "\\ud800"]}', "prompt[1]", "surrogate"),
        (COMPLETIONS, '{"prompt": "x", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}", "metadata", "levels"),
        (COMPLETIONS, '{"prompt": "x", "metadata": ' + "[" * 500 + "]" * 500 + "}", "metadata" + "[0]" * 63, "deep"),
        (CHAT, '{"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"messages": 1}}',
         "chat_template_kwargs.messages", "cannot set 'messages'"),
    ],
)  # fmt: skip
def test_malformed_input_is_a_400_naming_the_field(client, path, raw, param, words):
    r = client.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    err = error(r)
    assert err["param"] == param and words in err["message"], err
    still_serving(client)


def test_error_bodies_are_bounded(client):
    stops = [f"stop string number {i} " * 20 for i in range(200)]
    r = client.post(COMPLETIONS, json={"prompt": "x", "stop": stops})
    err = error(r)
    assert err["param"] == "stop" and len(err["message"]) <= MAX_MESSAGE_CHARS and "left out" in err["message"]
    assert "Use a string or a list of at most" in err["message"]  # the fix, at the end, survives
    assert len(r.content) < 2 * MAX_MESSAGE_CHARS


def test_models_shows_a_name_not_a_path(client, llm):
    card = client.get("/v1/models").json()["data"][0]
    assert card["root"] == llm.checkpoint.path.name and "/" not in card["root"]


# --- the event loop stays free ----------------------------------------------------------------------------------


def test_tokenizing_a_huge_prompt_does_not_stall_the_loop(served, monkeypatch):
    """While a prompt is being tokenized (slowed here to 1 s), /health answers at once."""
    tokenizer = served.llm.tokenizer
    encode = tokenizer.encode

    def slow_encode(*args, **kw):
        time.sleep(1.0)
        return encode(*args, **kw)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)

    async def scenario():
        slow = asyncio.create_task(Call(served.app, "POST", COMPLETIONS, {"prompt": "Hi", "max_tokens": 1})())
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        health = await Call(served.app, "GET", "/health")()
        return time.monotonic() - t0, health, await slow

    waited, health, slow = asyncio.run(scenario())
    assert health.status == 200 and waited < 0.5, waited
    assert slow.status == 200


def test_a_long_prompt_tokenizes_without_holding_the_loop(served, monkeypatch):
    """A ~240 KB prompt takes the tokenizer a while; /health, asked once the encode has begun, answers in a fraction
    of that time (the encode runs on a parsing thread and lets go of the GIL), and the ids are a plain encode's."""
    import threading

    backend = served.llm.tokenizer._backend
    if not hasattr(backend, "tok"):
        pytest.skip("not a tokenizer.json backend")
    text = "Hello wörld, the quick brown fox jumps over 13 lazy dogs. " * 3900
    t0 = time.monotonic()
    plain = backend.tok.encode(text, add_special_tokens=True).ids
    encode_s = time.monotonic() - t0
    assert served.llm.tokenizer.encode(text) == plain

    began, began_at = threading.Event(), []

    class Watched:  # the Rust tokenizer, telling when an encode begins
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, name):
            if name.startswith("encode") and not began.is_set():
                began_at.append(time.monotonic())
                began.set()
            return getattr(self.tok, name)

    monkeypatch.setattr(backend, "tok", Watched(backend.tok))

    async def scenario():
        big = asyncio.create_task(Call(served.app, "POST", COMPLETIONS, {"prompt": text, "max_tokens": 1})())
        await until(began.is_set, "the encode to begin")  # a loop held by the encode wakes only after it
        health = await Call(served.app, "GET", "/health")()
        health_s = time.monotonic() - began_at[0]
        return await big, health, health_s

    big, health, health_s = asyncio.run(scenario())
    assert big.status == 400 and big.json()["error"]["code"] == "context_length_exceeded"
    assert health.status == 200 and health_s < 0.5 * encode_s, (health_s, encode_s)


# --- CORS, the log, the warning -----------------------------------------------------------------------------------


def test_cors_headers_only_with_allowed_origins(served, llm):
    origin = {"Origin": "https://app.example.com"}
    with TestClient(served.app) as c:
        r = c.get("/v1/models", headers=origin)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    s = Served(llm, allowed_origins=["https://app.example.com"])
    try:
        with TestClient(s.app) as c:
            r = c.get("/v1/models", headers=origin)
            assert r.headers["access-control-allow-origin"] == "https://app.example.com"
            preflight = {
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            }
            r = c.options(COMPLETIONS, headers=preflight)
            assert r.status_code == 200 and "POST" in r.headers["access-control-allow-methods"]
            r = c.get("/v1/models", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in r.headers
    finally:
        s.close()


def test_request_log_lines(served, client, caplog):
    caplog.set_level(logging.INFO, logger="cadenza.server.access")
    r = client.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    (record,) = [rec for rec in caplog.records if getattr(rec, "request", {}).get("request_id") == rid]
    f = record.request
    assert f["method"] == "POST" and f["path"] == COMPLETIONS and f["status"] == 200
    assert f["prompt_tokens"] == r.json()["usage"]["prompt_tokens"] and f["completion_tokens"] == 3
    assert f["latency_ms"] >= f["ttft_ms"] > 0
    assert record.getMessage().startswith(f"{rid} POST {COMPLETIONS} 200 prompt=")
    # the JSON line, with a timestamp
    from cadenza.server.serve import JsonFormatter, TextFormatter

    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == rid and line["status"] == 200 and line["ts"].endswith("Z")
    assert TextFormatter().format(record).startswith("cadenza: 20")
    # a client's own id is kept; a refused request is logged too
    r = client.post(COMPLETIONS, content=b"x", headers={"Content-Type": "text/plain", "X-Request-Id": "abc-1"})
    assert r.status_code == 415 and r.headers["x-request-id"] == "abc-1"
    assert any(getattr(rec, "request", {}).get("request_id") == "abc-1" for rec in caplog.records)


def test_client_gone_mid_stream_is_logged_499(served, caplog):
    caplog.set_level(logging.INFO, logger="cadenza.server.access")
    assert logged_status(200, True) == CLIENT_CLOSED == 499 and logged_status(200, False) == 200
    body = {"prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}

    async def scenario():
        call = await Call(served.app, "POST", COMPLETIONS, body, leave_on_data=True)()
        await until(lambda: served.metrics.running == 0, "the stream's slot to free")
        return call

    call = asyncio.run(scenario())
    assert call.status == 200 and b"[DONE]" not in call.body
    rid = call.response_headers["x-request-id"]
    (record,) = [rec for rec in caplog.records if getattr(rec, "request", {}).get("request_id") == rid]
    assert record.request["status"] == 499 and record.request["completion_tokens"] >= 1
    assert served.metrics.requests[COMPLETIONS, 499] >= 1


def test_warning_for_a_keyless_non_loopback_bind(caplog):
    from cadenza.server.serve import exposure_warning

    with socket.socket() as loop_sock, socket.socket() as any_sock:
        loop_sock.bind(("127.0.0.1", 0))
        any_sock.bind(("0.0.0.0", 0))
        assert exposure_warning(loop_sock, None) is None
        assert exposure_warning(any_sock, "key") is None
        warning = exposure_warning(any_sock, None)
    assert "0.0.0.0" in warning and "--api-key" in warning


# --- load: clients that leave while queued ----------------------------------------------------------------------


def test_load_with_clients_leaving_while_queued(served):
    """Two long streams hold both slots; 12 clients (streamed and not) queue, then 4 more that leave while queued:
    they leave the queue at once (the gauge drops, a new request fits again), the 12 are served in full, and no
    slot or queue place is leaked."""
    worker, metrics = served.worker, served.metrics
    long = {"prompt": "Hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}

    def short(i: int) -> dict:
        body = {"prompt": f"Request {i}", "max_tokens": 4, "ignore_eos": True, "stream": i % 2 == 0}
        if i % 3 == 0:
            return {"messages": [{"role": "user", "content": f"Hi {i}"}], **body, "prompt": None}
        return body

    async def scenario():
        blockers = [Call(served.app, "POST", COMPLETIONS, long) for _ in range(SLOTS)]
        blocking = [asyncio.create_task(b()) for b in blockers]
        await until(lambda: metrics.running == SLOTS, "the long streams to take both slots")
        bodies = [short(i) for i in range(12)]
        others = [
            Call(served.app, "POST", CHAT if "messages" in b else COMPLETIONS, {k: v for k, v in b.items() if v})
            for b in bodies
        ]
        leavers = [Call(served.app, "POST", COMPLETIONS, {**short(1), "stream": i % 2 == 0}) for i in range(4)]
        running = [asyncio.create_task(c()) for c in others]
        await until(lambda: worker.waiting == 12, "12 queued")
        leaving = [asyncio.create_task(c()) for c in leavers]
        await until(lambda: worker.waiting == QUEUE, "the queue to fill")
        full = await Call(served.app, "POST", COMPLETIONS, {"prompt": "x", "max_tokens": 1})()
        assert full.status == 429
        for c in leavers:
            c.leave.set()
        await until(lambda: worker.waiting == 12 and metrics.waiting == 12, "the leavers to leave the queue", 1)
        assert metrics.running == SLOTS  # the blockers still hold the slots: nobody left by being served
        fits = asyncio.create_task(Call(served.app, "POST", COMPLETIONS, {"prompt": "x", "max_tokens": 1})())
        await until(lambda: worker.waiting == 13, "a new request to fit in the queue again", 1)
        await asyncio.gather(*leaving)
        for b in blockers:
            b.leave.set()
        await asyncio.gather(*blocking)
        done = await asyncio.wait_for(asyncio.gather(*running, fits), 60)
        # the answers are out; the engine thread settles its books at the end of its step
        settled = (lambda: metrics.running == 0 and len(worker.batch.free) == SLOTS and worker.waiting == 0
                   and metrics.waiting == 0)  # fmt: skip
        await until(settled, "the slots and the queue to empty")
        return blockers, leavers, done

    t0 = time.monotonic()
    blockers, leavers, done = asyncio.run(scenario())
    assert time.monotonic() - t0 < 30
    for call in done:
        assert call.status == 200, call.body
        if call.response_headers["content-type"].startswith("text/event-stream"):
            assert call.body.endswith(b"data: [DONE]\n\n") and b'"error"' not in call.body
    plain = [c.json()["usage"]["completion_tokens"] for c in done[:-1] if c.body.startswith(b"{")]
    assert plain and all(t == 4 for t in plain)
    assert all(c.status in (200, 499) for c in leavers) and all(b"[DONE]" not in c.body for c in leavers)
    assert all(b.status == 200 and b"[DONE]" not in b.body for b in blockers)
    assert worker.waiting == 0 and metrics.waiting == 0 and not worker.inbox


# --- the command line -----------------------------------------------------------------------------------------------


def test_serve_flags_json_log_cors_limit_and_warning(llm, tmp_path):
    """`cadenza serve` on all addresses without a key, JSON log lines, a 1 KiB body limit, one allowed origin."""
    import os
    import re
    import subprocess
    import sys

    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "cadenza", "serve", "--model", str(llm.checkpoint.path), "--device", "cpu"]
    cmd += ["--dtype", "float32", "--cpu-threads", "1", "--host", "0.0.0.0", "--port", "0", "--log-format", "json"]
    cmd += ["--max-request-bytes", "1KiB", "--allowed-origins", "https://app.example.com"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"serving .* at http://0\.0\.0\.0:(\d+)/v1", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{m.group(1)}", timeout=60, trust_env=False) as h:
            origin = {"Origin": "https://app.example.com"}
            r = h.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 2}, headers=origin)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin["Origin"]
            r = h.post(COMPLETIONS, json={"prompt": "x" * 2000})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            assert h.post(COMPLETIONS, content="{}", headers={"Content-Type": "text/plain"}).status_code == 415
            assert h.get("/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(15)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(x["level"] == "warning" and "without an API key" in x["message"] for x in lines), lines
    requests = [x for x in lines if "request_id" in x]
    assert [x["status"] for x in requests] == [200, 413, 415, 200], requests
    first = requests[0]
    assert first["path"] == COMPLETIONS and first["completion_tokens"] >= 1 and first["ttft_ms"] is not None
    assert all(x["ts"].endswith("Z") for x in lines)


def test_batch_drops_a_cancelled_request_from_its_queue(llm):
    """Batch.cancel on a queued sequence: it leaves the queue at once (finished, "abort"), never taking a slot."""
    from cadenza import SamplingParams
    from cadenza.batch import Batch
    from tests.conftest import prompt_ids

    batch = Batch(llm.engine, slots=1, length=64)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    first, queued = batch.add(prompt_ids(4), params), batch.add(prompt_ids(4), params)
    batch.step()  # the first takes the one slot
    batch.cancel(queued)
    assert queued.finished and queued.gen.finish_reason == "abort" and not batch.waiting and queued.slot is None
    batch.cancel(first)  # running: leaves at the next step
    batch.step()
    assert first.finished and batch.free == [0] and not batch.running
