"""`cadenza serve` as clients see it: a real server in a subprocess, driven by the openai client and raw HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from cadenza import LLM, SamplingParams  # noqa: E402
from tests.conftest import budget_for, make_mixtral, prompt_ids  # noqa: E402

KEY = "test-key-123"
NAME = "tiny-mixtral"


class Server:
    """`python -m cadenza serve ...` on a free port; stderr goes to a file (read for the ready line)."""

    def __init__(self, model, tmp_path, *args: str, env: dict | None = None):
        self.log = tmp_path / f"server-{time.monotonic_ns()}.log"
        # one thread: on a small shared CI box, two processes of two spinning OpenMP threads each crawl
        engine = ["--device", "cpu", "--dtype", "float32", "--cpu-threads", "1"]
        cmd = [sys.executable, "-m", "cadenza", "serve", "--model", str(model), *engine, "--port", "0"]
        cmd += ["--log-level", "warning", *args]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 120
        while True:
            m = re.search(r"serving .* at (http://127\.0\.0\.1:\d+)/v1", self.stderr())
            if m:
                self.url = m.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{self.stderr()}")
            time.sleep(0.05)
        self.http = httpx.Client(base_url=self.url, timeout=60, trust_env=False)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, key: str | None = KEY):
        http = httpx.Client(trust_env=False, timeout=60)
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, http_client=http)

    def metrics(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        return {k: float(v) for k, v in re.findall(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def model(mixtral_dir):
    return mixtral_dir[0]


@pytest.fixture(scope="module")
def llm(model):
    """The same model in this process, on one thread as the servers: what their answers are checked against."""
    threads = torch.get_num_threads()
    yield LLM(model, device="cpu", dtype="float32", cpu_threads=1)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """Batches up to 8 sequences; needs the API key."""
    s = Server(model, tmp_path_factory.mktemp("srv"), "--max-batch", "8", "--api-key", KEY, "--served-model-name", NAME)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A tiny model with a context of 4096: requests that run long enough to be cut short."""
    return make_mixtral(tmp_path_factory.mktemp("long"), max_position_embeddings=4096)[0]


@pytest.fixture(scope="module")
def narrow(long_model, tmp_path_factory):
    """One slot, a queue of one, experts offloaded (the GPU side emulated on the CPU); no API key."""
    budget = budget_for(long_model, residents=2)
    s = Server(
        long_model,
        tmp_path_factory.mktemp("narrow"),
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--gpu-memory",
        f"{budget}B",
    )
    yield s
    s.stop()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def assert_error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# --- the openai client ---------------------------------------------------------------------------------------------


def test_health_and_models(server):
    assert server.http.get("/health").json() == {"status": "ok"}
    models = server.client().models.list().data
    assert [m.id for m in models] == [NAME]
    assert server.http.get(f"/v1/models/{NAME}", headers={"Authorization": f"Bearer {KEY}"}).json()["id"] == NAME


def test_completion_equals_llm_generate(server, llm):
    c = server.client()
    want = llm.generate("Hello world", greedy(12, ignore_eos=True))
    r = c.completions.create(
        model=NAME, prompt="Hello world", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == NAME
    assert r.system_fingerprint.startswith("cadenza-0.")
    # streamed: the same text, in pieces
    pieces = list(
        c.completions.create(
            model=NAME, prompt="Hello world", max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert "".join(p.choices[0].text for p in pieces) == want.text
    assert pieces[-1].choices[0].finish_reason == "length"
    # token-id prompts, and several prompts in one request
    ids = prompt_ids(6)
    both = c.completions.create(
        model=NAME, prompt=[ids, "Hello world"], max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    want5 = [llm.generate(p, greedy(5, ignore_eos=True)).text for p in (ids, "Hello world")]
    assert [ch.text for ch in both.choices] == want5
    assert both.usage.prompt_tokens == 6 + len(want.prompt_token_ids) and both.usage.completion_tokens == 10


def test_chat_equals_llm_chat_streamed_and_not(server, llm):
    c = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    want = llm.chat(messages, greedy(10))
    r = c.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=10, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(llm.chat_prompt(messages))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    chunks = list(
        c.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_stop_strings(server, llm):
    c = server.client()
    free = llm.generate("Hello", greedy(30, ignore_eos=True)).text
    stop = free[10:13]
    want = llm.generate("Hello", greedy(30, ignore_eos=True, stop=[stop]))
    assert want.finish_reason == "stop"
    r = c.completions.create(
        model=NAME, prompt="Hello", max_tokens=30, temperature=0, stop=stop, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == want.text == free[: free.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = [
        p.choices[0].text
        for p in c.completions.create(
            model=NAME,
            prompt="Hello",
            max_tokens=30,
            temperature=0,
            stop=[stop, "zzz"],
            stream=True,
            extra_body={"ignore_eos": True},
        )
    ]
    assert "".join(streamed) == want.text and stop not in "".join(streamed)


def test_seed_reproducible_and_n(server):
    c = server.client()

    def sample(**kw):
        return c.completions.create(
            model=NAME, prompt="Once", max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True}, **kw
        )

    two = sample(n=2, seed=7)
    assert [ch.index for ch in two.choices] == [0, 1] and two.usage.completion_tokens == 16
    assert [ch.text for ch in sample(n=2, seed=7).choices] == [ch.text for ch in two.choices]
    # sample j of a seeded request uses seed + j
    assert sample(seed=7).choices[0].text == two.choices[0].text
    assert sample(seed=8).choices[0].text == two.choices[1].text
    chat = c.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "x"}], n=3, max_tokens=4, seed=1, stream=True
    )
    assert {ch.choices[0].index for ch in chat if ch.choices} == {0, 1, 2}


def test_logprobs(server, llm):
    c = server.client()
    messages = [{"role": "user", "content": "Hi"}]
    want = llm.chat(messages, greedy(6, ignore_eos=True, logprobs=True, top_logprobs=3))
    r = c.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry, lp, top in zip(content, want.logprobs, want.top_logprobs, strict=True):
        assert entry.logprob == pytest.approx(lp, abs=1e-4)
        assert bytes(entry.bytes) == entry.token.encode()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([x for _, x in top], abs=1e-4)
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy: the chosen one is the best
    legacy = (
        c.completions.create(
            model=NAME, prompt="Hello", max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .logprobs
    )
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.text_offset) == 5
    assert all(len(t) <= 2 for t in legacy.top_logprobs) and legacy.text_offset[0] == 0
    streamed = list(
        c.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=6,
            temperature=0,
            logprobs=True,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    tokens = [
        e.logprob for ch in streamed if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content
    ]
    assert tokens == pytest.approx(want.logprobs, abs=1e-4)


def test_concurrent_greedy_requests_batch_and_equal_single(server, llm):
    prompts = [prompt_ids(4 + i, seed=i) for i in range(8)]
    want = [llm.generate(p, greedy(16, ignore_eos=True)).text for p in prompts]
    before = server.metrics()
    c = server.client()

    def one(p):
        r = c.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].text, r.usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, prompts))
    assert got == [(text, 16) for text in want]
    after = server.metrics()
    steps = after["cadenza_decode_steps_total"] - before.get("cadenza_decode_steps_total", 0)
    tokens = after["cadenza_generation_tokens_total"] - before.get("cadenza_generation_tokens_total", 0)
    assert tokens == 8 * 16
    assert steps < tokens - 8  # decoded together: fewer passes than tokens (each sequence's first token is prefill)
    assert after["cadenza_batch_size_max"] >= 2
    assert after["cadenza_running_sequences"] == 0 and after["cadenza_waiting_sequences"] == 0


# --- bad input ---------------------------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors(server, llm):
    auth = {"Authorization": f"Bearer {KEY}"}

    def post(path, body, raw: bool = False):
        content = body if raw else json.dumps(body)
        return server.http.post(path, content=content, headers={**auth, "Content-Type": "application/json"})

    chat = "/v1/chat/completions"
    hi = [{"role": "user", "content": "Hi"}]
    assert_error(post("/v1/completions", "{not json", raw=True), 400)
    assert_error(post("/v1/completions", [1, 2]), 400)
    assert_error(post("/v1/completions", {"prompt": "x", "temperature": "hot"}), 400, "temperature")
    assert_error(post("/v1/completions", {"prompt": "x", "temperature": -1}), 400, "temperature")
    assert_error(post("/v1/completions", {"prompt": "x", "max_tokens": 2.5}), 400, "max_tokens")
    assert_error(post("/v1/completions", {"prompt": 5}), 400, "prompt")
    assert_error(post("/v1/completions", {"prompt": "x", "stop": 5}), 400, "stop")
    assert_error(post("/v1/completions", {"prompt": "x", "n": 0}), 400, "n")
    assert_error(post("/v1/completions", {"prompt": [99999]}), 400, "prompt")
    assert_error(post("/v1/completions", {"prompt": "x", "max_token": 5}), 400, "max_token", "unrecognized_argument")
    assert_error(post("/v1/completions", {"prompt": "x", "prompt_logprobs": -1}), 400, "prompt_logprobs")
    assert_error(post("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10}}), 400, "logit_bias")
    assert_error(post(chat, {"messages": hi, "model": "gpt-4"}), 404, "model", "model_not_found")
    assert_error(post(chat, {"messages": []}), 400, "messages")
    assert_error(post(chat, {"messages": "Hi"}), 400, "messages")
    assert_error(post(chat, {"messages": [{"role": "robot", "content": "x"}]}), 400, "messages[0].role")
    assert_error(post(chat, {"messages": hi, "tools": [{"type": "function"}]}), 400, "tools", "unsupported_parameter")
    assert_error(post(chat, {"messages": hi, "response_format": {"type": "json_object"}}), 400, "response_format")
    assert_error(post(chat, {"messages": hi, "stream_options": {"include_usage": True}}), 400, "stream_options")
    assert_error(post(chat, {"messages": hi, "top_logprobs": 2}), 400, "top_logprobs")
    context = llm.max_context
    err = assert_error(post(chat, {"messages": hi, "max_tokens": 10**6}), 400, "max_tokens", "context_length_exceeded")
    assert str(context) in err["message"] and str(10**6) in err["message"]
    err = assert_error(
        post("/v1/completions", {"prompt": prompt_ids(context + 5)}), 400, "prompt", "context_length_exceeded"
    )
    assert str(context + 5) in err["message"] and str(context) in err["message"]
    assert_error(server.http.get("/v1/nothing-here", headers=auth), 404)
    # the client maps them to its exceptions
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4", messages=hi)
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client().completions.create(model=NAME, prompt="x", max_tokens=10**6)
    # and the server goes on serving
    ok = server.client().completions.create(model=NAME, prompt="x", max_tokens=2)
    assert ok.usage.completion_tokens >= 1
    m = server.metrics()
    assert m['cadenza_requests_total{endpoint="/v1/completions",status="400"}'] >= 10


def test_api_key(server):
    body = {"prompt": "x", "max_tokens": 1}
    err = assert_error(server.http.post("/v1/completions", json=body), 401, code="invalid_api_key")
    assert "Authorization: Bearer" in err["message"]
    assert_error(server.http.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert server.http.get("/health").status_code == 200  # health and metrics need no key
    assert server.http.get("/metrics").status_code == 200


# --- load, disconnects, offloading ---------------------------------------------------------------------------------


def test_full_queue_gets_429_then_serves(narrow):
    body = {"prompt": "Hello", "max_tokens": 300, "ignore_eos": True}

    def one(_):
        with httpx.Client(base_url=narrow.url, timeout=60, trust_env=False) as h:
            return h.post("/v1/completions", json=body)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(4)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert assert_error(refused, 429)["type"] == "rate_limit_error"
    assert narrow.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_disconnected_clients_free_their_slot(narrow):
    def wait_for(cond, what: str):
        deadline = time.monotonic() + 10
        while not cond(narrow.metrics()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    aborts = 'cadenza_sequences_finished_total{reason="abort"}'
    before = narrow.metrics().get(aborts, 0)
    body = {"prompt": "Hello", "max_tokens": 4000, "ignore_eos": True}
    with (
        httpx.Client(base_url=narrow.url, timeout=60, trust_env=False) as h,
        h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert next(lines) == ""
    # the stream is closed with most of its 4000 tokens still to come
    wait_for(lambda m: m.get(aborts, 0) == before + 1 and m["cadenza_running_sequences"] == 0, "the stream's abort")
    # a plain request whose client gives up
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=narrow.url, timeout=0.3, trust_env=False) as h:
        h.post("/v1/completions", json=body)
    wait_for(lambda m: m.get(aborts, 0) == before + 2 and m["cadenza_running_sequences"] == 0, "the request's abort")
    # the one slot is free: the next request is served at once
    r = narrow.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_expert_work_and_cache_metrics(narrow):
    narrow.http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8})
    m = narrow.metrics()
    work = {side: m[f'cadenza_expert_work_total{{side="{side}"}}'] for side in ("gpu", "cpu", "fetched")}
    assert sum(work.values()) > 0
    assert 0 <= m["cadenza_fetch_cache_hit_rate"] <= 1
    assert m["cadenza_max_batch"] == 1 and m["cadenza_max_queue"] == 1
    assert m["cadenza_time_to_first_token_seconds_count"] >= 1
    # the speculative prefetch and adaptive placement report themselves (on by default)
    assert m["cadenza_prefetch_guessed_total"] >= m["cadenza_prefetch_used_total"] >= 0
    assert 0 <= m["cadenza_prefetch_precision"] <= 1 and 0 <= m["cadenza_prefetch_recall"] <= 1
    assert m["cadenza_experts_swapped_total"] >= 0


# --- shutdown and startup ---------------------------------------------------------------------------------------


def test_sigterm_during_a_stream_exits_cleanly(long_model, tmp_path):
    s = Server(long_model, tmp_path, env={"CADENZA_API_KEY": KEY})  # the key from the environment
    try:
        stream = s.client().completions.create(
            model=long_model.name, prompt="Hello", max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
        )
        first = next(iter(stream))
        assert first.choices[0].index == 0
        assert s.http.get("/v1/models").status_code == 401
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
        assert s.proc.wait(10) == 0
        assert time.monotonic() - t0 < 10
        assert "cadenza: server stopped" in s.stderr() and "Traceback" not in s.stderr()
        assert "cadenza: serving" in s.stderr() and "cadenza: cadenza:" not in s.stderr()  # one prefix a line
    finally:
        s.stop()


def test_serve_refuses_a_taken_port_and_a_missing_extra(model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "cadenza", "serve", "--model", str(model), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 2 and f"Cannot listen on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr
    code = "import sys; sys.modules['fastapi'] = None; from cadenza.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run(
        [sys.executable, "-c", code, "serve", "--model", str(model)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert r.returncode == 2 and "pip install 'cadenza[serve]'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# --- the engine thread, in this process -------------------------------------------------------------------------


def test_engine_thread_survives_a_failing_step_and_stops_on_shutdown(llm):
    import asyncio

    from cadenza.server.metrics import Metrics
    from cadenza.server.worker import EngineWorker

    metrics = Metrics("m", llm.max_batch, 4, "fp", "v")
    worker = EngineWorker(llm, max_queue=4, metrics=metrics)
    worker.start()
    ids = prompt_ids(5)

    async def run(params: SamplingParams, then=None):
        sub = worker.submit([(ids, params)])
        events = []
        while not events or not (events[-1].error or events[-1].aborted or events[-1].step.finish_reason):
            events.append(await asyncio.wait_for(sub.queue.get(), 30))
            if then is not None and len(events) == 2:
                then()
        return events

    def boom():
        raise RuntimeError("device lost")

    try:
        worker.batch.step = boom  # the next step fails; the thread makes itself a clean batch
        (event,) = asyncio.run(run(greedy(3)))
        assert event.error.status == 500 and "device lost" in event.error.message
        events = asyncio.run(run(greedy(5, ignore_eos=True)))
        assert [e.step.token_id for e in events] == llm.generate(ids, greedy(5, ignore_eos=True)).token_ids
        # shutdown: the sequence under way ends (aborted) at the end of the step, the thread exits
        events = asyncio.run(run(greedy(200, ignore_eos=True), then=worker.shutdown))
        assert events[-1].aborted and len(events) < 50
        assert worker.join(5) and not worker.alive
        assert metrics.finished["error"] == 1 and metrics.finished["abort"] == 1 and metrics.waiting == 0
    finally:
        worker.shutdown()
        worker.join(5)
