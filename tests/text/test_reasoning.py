"""Reasoning told apart from the answer: harmony channels (gpt-oss) and think tags, token by token, and the chat
endpoint's reasoning_content (whole and streamed)."""

from __future__ import annotations

import json

import pytest

from cadenza.generation import Step
from cadenza.text.reasoning import ReasoningSplitter
from cadenza.text.tokenizer import Tokenizer
from tests.text.tokenizer_files import write_bpe_tokenizer

HARMONY_SPECIALS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>"]


def tokenizer_with(tmp_path, added: list[str], special: bool = True) -> Tokenizer:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    write_bpe_tokenizer(tmp_path)
    tok = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t in added])
    tok.save(str(tmp_path / "tokenizer.json"))
    return Tokenizer.from_dir(tmp_path)


def split(tokenizer: Tokenizer, text: str) -> tuple[str, str, list[tuple[str, str]]]:
    """Generated `text` through the streaming detokenizer and a splitter: (reasoning, answer, pieces)."""
    splitter = ReasoningSplitter.for_tokenizer(tokenizer)
    assert splitter is not None
    detok = tokenizer.detokenizer()
    pieces = [splitter.add(i, detok.add(i)) for i in tokenizer.encode(text, add_special_tokens=False)]
    pieces.append(splitter.add(-1, detok.flush()))
    return splitter.reasoning, splitter.answer, pieces


def test_harmony_channels(tmp_path):
    tok = tokenizer_with(tmp_path, HARMONY_SPECIALS)
    text = (
        "<|channel|>analysis<|message|>The user greets me. Say hello.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>"
    )
    reasoning, answer, pieces = split(tok, text)
    assert reasoning == "The user greets me. Say hello."
    assert answer == "Hello there!"
    assert "".join(r for r, _ in pieces) == reasoning and "".join(a for _, a in pieces) == answer


def test_harmony_commentary_and_header_additions(tmp_path):
    """A channel header with additions (` to=functions.f`, a constraint) still names its channel; commentary is the
    answer's side."""
    tok = tokenizer_with(tmp_path, HARMONY_SPECIALS)
    text = (
        "<|channel|>analysis<|message|>think<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get <|message|>{"a": 1}<|end|>'
    )
    reasoning, answer, _ = split(tok, text)
    assert (reasoning, answer) == ("think", '{"a": 1}')


def test_harmony_without_markers_is_all_answer(tmp_path):
    tok = tokenizer_with(tmp_path, HARMONY_SPECIALS)
    assert split(tok, "just text")[:2] == ("", "just text")


def test_think_tags(tmp_path):
    """Qwen3's <think> is an added token that is not special (decoding keeps its text): the tags are dropped."""
    tok = tokenizer_with(tmp_path, ["<think>", "</think>"], special=False)
    reasoning, answer, _ = split(tok, "<think>\nweigh it\n</think>\n\nThe answer.")
    assert (reasoning, answer) == ("\nweigh it\n", "\n\nThe answer.")


@pytest.mark.parametrize(
    ("prompt", "want"),
    [
        ("<|user|>Hi<|assistant|><think>\n", ("weigh it\n", "\n\nThe answer.")),  # the template opened the tag
        ("<|user|>Hi<|assistant|><think>\n\n</think>\n\n", ("", "weigh it\n\n\nThe answer.")),  # thinking off
        ("<think>old</think>earlier answer<|user|>Hi<|assistant|>", ("", "weigh it\n\n\nThe answer.")),  # history
        ("<|user|>Hi<|assistant|>", ("", "weigh it\n\n\nThe answer.")),
    ],
    ids=["opened", "closed", "history", "none"],
)
def test_think_opened_by_the_prompt(tmp_path, prompt, want):
    """A splitter made for a prompt whose last think tag is an open one starts on the reasoning side, so the answer
    up to `</think>` is reasoning (DeepSeek-R1-0528's and Qwen3-Thinking-2507's templates open the tag themselves);
    a closed tag, or none, leaves it on the answer's side."""
    tok = tokenizer_with(tmp_path, ["<think>", "</think>"], special=False)
    splitter = ReasoningSplitter.for_tokenizer(tok).fresh(tok.encode(prompt, add_special_tokens=False))
    detok = tok.detokenizer()
    for i in tok.encode("weigh it\n</think>\n\nThe answer.", add_special_tokens=False):
        splitter.add(i, detok.add(i))
    splitter.add(-1, detok.flush())
    assert (splitter.reasoning, splitter.answer) == want


def test_chat_response_to_a_prompt_that_opens_think(tmp_path):
    """The server's chat answer to a prompt ending in `<think>`: reasoning_content up to `</think>`, content after."""
    from cadenza import SamplingParams
    from cadenza.server.protocol import Parsed
    from cadenza.server.responses import Responder, TokenText

    tok = tokenizer_with(tmp_path, ["<think>", "</think>"], special=False)
    prompt = tok.encode("Question?<think>", add_special_tokens=False)
    parsed = Parsed(model="m", prompts=[prompt], params=[SamplingParams()], n=1, stream=False)
    responder = Responder(parsed, True, TokenText(tok), "fp")
    out = responder.output(prompt)
    detok = tok.detokenizer()
    ids = tok.encode("hmm</think>Hi!", add_special_tokens=False)
    for j, i in enumerate(ids):
        out.add(Step(i, detok.add(i), "stop" if j == len(ids) - 1 else None))
    message = responder.body([out])["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("hmm", "Hi!")


def test_plain_tokenizer_has_no_splitter(tmp_path):
    write_bpe_tokenizer(tmp_path)
    assert ReasoningSplitter.for_tokenizer(Tokenizer.from_dir(tmp_path)) is None


@pytest.mark.parametrize("stream", [False, True])
def test_chat_response_carries_reasoning_content(tmp_path, stream):
    from cadenza import SamplingParams
    from cadenza.server.protocol import Parsed
    from cadenza.server.responses import Responder, TokenText

    tok = tokenizer_with(tmp_path, HARMONY_SPECIALS)
    ids = tok.encode(
        "<|channel|>analysis<|message|>hmm<|end|><|start|>assistant<|channel|>final<|message|>Hi!",
        add_special_tokens=False,
    )
    parsed = Parsed(model="m", prompts=[[0]], params=[SamplingParams()], n=1, stream=stream)
    responder = Responder(parsed, True, TokenText(tok), "fp")
    out = responder.output([0])
    detok = tok.detokenizer()
    chunks = []
    for j, i in enumerate(ids):
        step = Step(i, detok.add(i), "stop" if j == len(ids) - 1 else None)
        out.add(step)
        chunks += responder.step_chunks(0, step, out)
    if not stream:
        message = responder.body([out])["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == ("hmm", "Hi!")
        return
    deltas = [json.loads(c.removeprefix("data: "))["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "hmm"
    assert "".join(d.get("content", "") for d in deltas) == "Hi!"
    assert not any("analysis" in d.get("content", "") for d in deltas)
