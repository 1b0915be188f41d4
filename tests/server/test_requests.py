"""Request validation in this process: the app's routes and its one validation handler, through Starlette's test
client (no socket, no subprocess), so that many malformed bodies cost milliseconds each."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


from cadenza import LLM, SamplingParams  # noqa: E402
from cadenza.sampling import MAX_TOP_LOGPROBS  # noqa: E402
from cadenza.server.schemas import IGNORED  # noqa: E402
from tests.server.serving import served_client  # noqa: E402

HI = [{"role": "user", "content": "Hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def client(mixtral_dir):
    threads = torch.get_num_threads()
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32", cpu_threads=1)
    try:
        with served_client(llm, max_queue=4) as c:
            yield c
    finally:
        torch.set_num_threads(threads)


def error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize(
    "path, body, param, code, words",
    [
        # JSON types as JSON has them
        (COMPLETIONS, {"prompt": "x", "max_tokens": "5"}, "max_tokens", None, "must be an integer; got string '5'"),
        (COMPLETIONS, {"prompt": "x", "max_tokens": True}, "max_tokens", None, "an integer; got boolean"),
        (COMPLETIONS, {"prompt": "x", "temperature": True}, "temperature", None, "must be a number"),
        (COMPLETIONS, {"prompt": "x", "stream": 1}, "stream", None, "must be true or false"),
        (COMPLETIONS, {"prompt": "x", "model": 5}, "model", None, "must be a string"),
        (COMPLETIONS, {"prompt": []}, "prompt", None, "an array of arrays of token ids (none empty)"),
        (COMPLETIONS, {"prompt": [True]}, "prompt", None, "must be a string, an array of strings"),
        (COMPLETIONS, {"prompt": "x", "stop": [1]}, "stop", None, "a string or an array of strings"),
        (COMPLETIONS, {"prompt": "x", "stop_token_ids": [1, "2"]}, "stop_token_ids", None, "an array of integers"),
        (CHAT, {"messages": HI, "stream": True, "stream_options": 1}, "stream_options", None, "must be an object"),
        (CHAT, {"messages": HI, "chat_template_kwargs": []}, "chat_template_kwargs", None, "must be an object"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", None, '"type": "text"'),
        (CHAT, {"messages": [{"content": "x"}]}, "messages[0].role", None, "is required"),
        (CHAT, {"messages": [HI[0], "Hi"]}, "messages[1]", None, "must be an object"),
        # ranges, and the sampling ones SamplingParams refuses in its own words
        (COMPLETIONS, {"prompt": "x", "max_tokens": -1}, "max_tokens", None, "at least 0; got -1"),
        (COMPLETIONS, {"prompt": "x", "logprobs": MAX_TOP_LOGPROBS + 1}, "logprobs", None, "at most"),
        (CHAT, {"messages": HI, "max_completion_tokens": 0}, "max_completion_tokens", None, "at least 1"),
        (COMPLETIONS, {"prompt": "x", "top_p": 0}, "top_p", None, "top_p=0."),
        (COMPLETIONS, {"prompt": "x", "seed": -1}, "seed", None, "seed=-1."),
        (COMPLETIONS, {"prompt": "x", "n": 5}, "n", None, "--max-queue"),
        # required, unknown and refused fields
        (COMPLETIONS, {}, "prompt", None, "'prompt' is required: the text"),
        (CHAT, {}, "messages", None, "'messages' is required: the conversation"),
        (CHAT, {"messages": HI, "max_token": 5}, "max_token", "unrecognized_argument", "Check its spelling"),
        (CHAT, {"messages": HI, "prompt": "x"}, "prompt", "unrecognized_argument", "messages"),
        (COMPLETIONS, {"prompt": "x", "messages": HI}, "messages", "unrecognized_argument", "prompt"),
        (COMPLETIONS, {"prompt": "x", "num_beams": 2}, "num_beams", "unsupported_parameter", "--num-beams"),
        (CHAT, {"messages": HI, "audio": {}}, "audio", "unsupported_parameter", "text only"),
        (CHAT, {"messages": HI, "tool_choice": "auto"}, "tool_choice", "unsupported_parameter", "function calling"),
        (CHAT, {"messages": HI, "modalities": ["audio"]}, "modalities", "unsupported_parameter", "text only"),
        (
            CHAT,
            {"messages": HI, "response_format": {"type": "text", "json_schema": {}}},
            "response_format",
            "unsupported_parameter",
            "structured output",
        ),
        (COMPLETIONS, {"prompt": "x", "suffix": "y"}, "suffix", "unsupported_parameter", "suffix"),
        (COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of", "unsupported_parameter", "best_of=3, n=1"),
        (COMPLETIONS, {"prompt": "x", "stream_options": {}}, "stream_options", None, "'stream' is true"),
        (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, "messages[0]", "unsupported_parameter", "tool"),
        (
            CHAT,
            {"messages": [HI[0], {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[1].content",
            "unsupported_parameter",
            "'image_url'",
        ),
        (CHAT, {"messages": HI, "top_logprobs": 1}, "top_logprobs", None, "needs 'logprobs': true"),
    ],
)
def test_bad_request_names_field_problem_and_fix(client, path, body, param, code, words):
    err = error(client.post(path, json=body))
    assert err["param"] == param and err["code"] == code, err
    assert words in err["message"], err["message"]


def test_loose_but_meaningful_values_are_accepted(client):
    # 2.0 as an integer, ignored bookkeeping fields, "off" values of refused features, a JSON type with a charset
    body = {"prompt": "Hello", "max_tokens": 2.0, "n": 1.0, "user": "u", "metadata": {}, "logit_bias": {}}
    r = client.post(COMPLETIONS, json={**body, "suffix": "", "best_of": 1, "stop": ["", "zz"], "top_k": -1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text
    charset = {"Content-Type": "application/json; charset=utf-8"}
    r = client.post(COMPLETIONS, content=json.dumps(body), headers=charset)
    assert r.status_code == 200, r.text
    messages = [
        {"role": "developer", "content": "Be brief.", "name": "d"},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None, "refusal": None},
        {"role": "user", "content": "Go on"},
    ]
    off = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"]}
    r = client.post(CHAT, json={"messages": messages, "max_tokens": 2, **off, "parallel_tool_calls": False})
    assert r.status_code == 200, r.text


def test_unrecognised_field_lists_what_is_accepted(client):
    message = error(client.post(COMPLETIONS, json={"prompt": "x", "max_token": 5}))["message"]
    assert "max_tokens" in message and "echo" in message and "messages" not in message
    assert all(name in message for name in IGNORED)


def test_body_that_is_not_a_json_object(client):
    typed = {"Content-Type": "application/json"}
    assert "not valid JSON" in error(client.post(COMPLETIONS, content=b"{nope", headers=typed))["message"]
    assert "JSON object; got list" in error(client.post(COMPLETIONS, json=[1]))["message"]


def test_prefill_chunk_bounds_each_steps_prompt_tokens(mixtral_dir):
    """--prefill-chunk 4: prompts are prefilled 4 tokens a step between decode steps; /metrics says so, answers
    are those of the whole-prefill server."""
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32", cpu_threads=1, max_batch=2)
    body = {"prompt": list(range(5, 35)), "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    want = llm.generate(list(range(5, 35)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)).text
    with served_client(llm, max_queue=4, prefill_chunk=4) as c:
        r = c.post(COMPLETIONS, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        text = c.get("/metrics").text
    assert "cadenza_prefill_chunk_tokens 4" in text and "cadenza_max_prefill_step_tokens 4" in text
