"""Prompt log-probs on /v1/completions (echo + logprobs, max_tokens 0, vLLM's prompt_logprobs): the requests
lm-evaluation-harness's `local-completions` sends for loglikelihood tasks, answered with the engine's float32
teacher-forced log-probs, equal to `LLM.score`'s and transformers' own."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


from cadenza import LLM, SamplingParams  # noqa: E402
from cadenza.errors import CadenzaError  # noqa: E402
from cadenza.sampling import MAX_TOP_LOGPROBS  # noqa: E402
from tests.conftest import reference_logits  # noqa: E402
from tests.server.serving import served_client  # noqa: E402

COMPLETIONS = "/v1/completions"
TEXT = "The quick brown fox jumps over the lazy dog"
TOL = 1e-4


@pytest.fixture(scope="module")
def served(mixtral_dir):
    threads = torch.get_num_threads()
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32", cpu_threads=1, max_batch=2)
    try:
        with served_client(llm, max_queue=8) as c:
            yield c, llm, mixtral_dir[1]
    finally:
        torch.set_num_threads(threads)


def reference(llm, hf_model, ids):
    """Per token after the first: (LLM.score's log-prob, transformers' log-prob, transformers' greedy token)."""
    ours = torch.log_softmax(llm.score(ids), dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    theirs_all = torch.log_softmax(reference_logits(hf_model, ids), dim=-1)[:-1]
    theirs = theirs_all.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return ours.tolist(), theirs.tolist(), theirs_all.argmax(dim=-1).tolist()


def test_echo_logprobs_equal_score_and_transformers(served):
    client, llm, hf_model = served
    ids = llm.tokenizer.encode(TEXT)
    ours, theirs, _ = reference(llm, hf_model, ids)
    for prompt in (TEXT, ids):
        r = client.post(COMPLETIONS, json={"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == TEXT and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert lp["tokens"] == [llm._texts().text(t) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(ours, abs=1e-5)
        assert lp["token_logprobs"][1:] == pytest.approx(theirs, abs=TOL)
        assert lp["text_offset"][0] == 0 and len(lp["text_offset"]) == len(ids)
        for top, actual in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:], strict=True):
            assert 1 <= len(top) <= 3 and actual in top.values()  # the 2 best and the token itself
        assert r.json()["usage"]["completion_tokens"] == 0


def test_lm_eval_loglikelihood_requests(served):
    """The bodies lm-eval 0.4's local-completions sends for loglikelihood (a batch of token-id prompts or
    strings, echo, logprobs 1, max_tokens 1, temperature 0, a seed) and what it reads back: token_logprobs and
    top_logprobs from the context's length on, the generated token's last."""
    client, llm, hf_model = served
    context, continuation = llm.tokenizer.encode("The quick brown"), [280, 81, 84]
    full = context + continuation
    _, theirs, greedy = reference(llm, hf_model, full)
    want = sum(theirs[len(context) - 1 :])
    want_greedy = all(g == t for g, t in zip(greedy[len(context) - 1 :], continuation, strict=True))
    other = llm.tokenizer.encode("Hello there")
    for max_tokens in (1, 0):
        body = {"model": "m", "prompt": [full, other], "temperature": 0, "max_tokens": max_tokens, "logprobs": 1,
                "seed": 1234, "echo": True}  # fmt: skip
        r = client.post(COMPLETIONS, json=body)
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert len(choices) == 2
        lp = choices[0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(full) + max_tokens
        end = len(full)  # lm-eval slices [ctxlen:-1] with max_tokens 1: the same tokens
        tokens_logprobs = lp["token_logprobs"][len(context) : end]
        top_logprobs = lp["top_logprobs"][len(context) : end]
        assert sum(tokens_logprobs) == pytest.approx(want, abs=TOL)
        pairs = zip(tokens_logprobs, top_logprobs, strict=True)
        is_greedy = all(tok == pytest.approx(max(top.values()), abs=1e-6) for tok, top in pairs)
        assert is_greedy == want_greedy
        assert len(choices[1]["logprobs"]["token_logprobs"]) == len(other) + max_tokens
    # the same as text prompts (lm-eval with tokenized_requests=False)
    r = client.post(COMPLETIONS, json={"prompt": [TEXT, "Hello"], "echo": True, "logprobs": 1, "max_tokens": 1,
                                       "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].startswith(TEXT) and choice["finish_reason"] == "length"
    ids = llm.tokenizer.encode(TEXT)
    assert choice["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(
        reference(llm, hf_model, ids)[1], abs=TOL
    )


def test_lm_eval_loglikelihood_rolling(served):
    """loglikelihood_rolling: disjoint windows (prefix token + text), each scored as a loglikelihood request with
    a context of one token; their sum is the text's log-likelihood."""
    client, llm, hf_model = served
    ids = llm.tokenizer.encode(TEXT * 3)
    prefix, body, window = ids[0], ids[1:], 16
    total = 0.0
    for start in range(0, len(body), window):
        piece = body[start : start + window]
        context = [prefix] if start == 0 else body[start - 1 : start]
        prompt = context + piece
        r = client.post(COMPLETIONS, json={"prompt": [prompt], "echo": True, "logprobs": 1, "max_tokens": 1,
                                           "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        total += sum(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:-1])
        total_ref = sum(reference(llm, hf_model, prompt)[1])
        assert sum(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:-1]) == pytest.approx(total_ref, abs=TOL)
    assert total < 0


def generated(client) -> float:
    line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith("cadenza_generation_tokens_total"))
    return float(line.split()[-1])


def test_prompt_logprobs_field(served):
    client, llm, hf_model = served
    ids = llm.tokenizer.encode(TEXT)
    ours, theirs, _ = reference(llm, hf_model, ids)
    r = client.post(COMPLETIONS, json={"prompt": ids, "prompt_logprobs": 3, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    rows = choice["prompt_logprobs"]
    assert len(rows) == len(ids) and rows[0] is None
    scored = llm.prompt_logprobs(ids, top=3)
    for row, t, want, rank, top in zip(rows[1:], ids[1:], theirs, scored.ranks[1:], scored.top_logprobs[1:],
                                       strict=True):  # fmt: skip
        assert 3 <= len(row) <= 4 and str(t) in row
        assert row[str(t)]["logprob"] == pytest.approx(want, abs=TOL) and row[str(t)]["rank"] == rank
        assert row[str(t)]["decoded_token"] == llm._texts().text(t)
        for k, (a, alp) in enumerate(top, start=1):
            assert row[str(a)]["logprob"] == pytest.approx(alp, abs=TOL)
            assert row[str(a)]["rank"] == k or a == t
    assert len(choice["text"]) > 0 and choice["logprobs"] is None
    # score only, no echo: no token generated (nor counted)
    before = generated(client)
    r = client.post(COMPLETIONS, json={"prompt": ids, "prompt_logprobs": 0, "max_tokens": 0})
    assert generated(client) == before
    choice = r.json()["choices"][0]
    assert choice["text"] == "" and all(row is None or len(row) == 1 for row in choice["prompt_logprobs"])


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs", "at least 0"),
        ({"prompt": "x", "prompt_logprobs": MAX_TOP_LOGPROBS + 1}, "prompt_logprobs", "at most"),
        ({"prompt": "x", "prompt_logprobs": "2"}, "prompt_logprobs", "integer"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "scores the prompt only"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens", "at least 0"),
    ],
)
def test_refused_values_name_the_field(served, body, param, words):
    r = served[0].post(COMPLETIONS, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def stream_choices(client, body) -> list[dict]:
    r = client.post(COMPLETIONS, json={**body, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ") and line != "data: [DONE]"]
    return [c for e in events for c in json.loads(e)["choices"]]


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_streams_equal_the_whole_answer(served, max_tokens):
    """A stream's first chunk carries the echoed prompt with its log-probs (and prompt_logprobs), then the
    generated tokens' follow: joined, they equal the whole answer."""
    client = served[0]
    body = {"prompt": TEXT, "echo": True, "logprobs": 2, "prompt_logprobs": 1, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    whole = client.post(COMPLETIONS, json=body).json()["choices"][0]
    chunks = stream_choices(client, body)
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[0]["prompt_logprobs"] == whole["prompt_logprobs"] and chunks[-1]["finish_reason"] == "length"
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]] == whole["logprobs"][key], key
    # echo alone, scoring only: the prompt's text, then the end
    chunks = stream_choices(client, {"prompt": "Hi", "echo": True, "max_tokens": 0})
    assert "".join(c["text"] for c in chunks) == "Hi" and chunks[-1]["finish_reason"] == "length"


def test_python_api(served):
    _, llm, hf_model = served
    ids = llm.tokenizer.encode(TEXT)
    scored = llm.prompt_logprobs(TEXT, top=2)
    assert scored.token_ids == ids and scored.logprobs[0] is None and scored.ranks[0] is None
    assert scored.logprobs[1:] == pytest.approx(reference(llm, hf_model, ids)[1], abs=TOL)
    assert all(len(row) == 2 and row[0][1] >= row[1][1] for row in scored.top_logprobs[1:])
    rows = zip(scored.ranks[1:], scored.top_logprobs[1:], ids[1:], strict=True)
    assert all((r == 1) == (row[0][0] == t) for r, row, t in rows)
    assert scored.tokens[1] == llm._texts().text(ids[1]) and scored.as_dict()["top_logprobs"][0] is None
    assert scored.total == pytest.approx(sum(scored.logprobs[1:]))
    # the same scores through generate (from the prefill), and max_tokens 0 scores only
    result = llm.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=2))
    assert result.token_ids == [] and result.finish_reason == "length"
    assert result.prompt_logprobs.logprobs[1:] == pytest.approx(scored.logprobs[1:], abs=1e-5)
    with pytest.raises(CadenzaError, match="top=-1"):
        llm.prompt_logprobs(TEXT, top=-1)
    with pytest.raises(CadenzaError, match="max_tokens=0"):
        SamplingParams(max_tokens=0)
