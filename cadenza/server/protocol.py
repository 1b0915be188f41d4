"""OpenAI request bodies -> what the engine runs: prompt token ids and one SamplingParams per sequence.

Every check a client can fail raises `APIError` (HTTP 400, or 404 for an unknown model, with an OpenAI-shaped body
naming the field); which fields are honoured, ignored or refused is in `cadenza.server.fields`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from cadenza.errors import CadenzaError
from cadenza.sampling import MAX_TOP_LOGPROBS, SamplingParams
from cadenza.server.fields import (
    CHAT,
    COMPLETION,
    APIError,
    absent_or,
    boolean,
    check_fields,
    integer,
    number,
    type_name,
    wrong,
)

COMPLETIONS_MAX_TOKENS = 16  # the OpenAI completions default; chat defaults to what the context leaves


@dataclass
class Parsed:
    """One request, ready for the engine: prompts[i] runs n times, with params[i * n + j] for sample j."""

    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    n: int
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: not asked for; else the number of alternatives per token
    echo: list[str] = field(default_factory=list)  # completions with echo: each prompt's text, put before its output


# --- the shared part of both endpoints -------------------------------------------------------------------------


class Context:
    """What parsing needs from the loaded model: its name, tokenizer, context, vocabulary and default params.
    Reads only; never touches the model (that happens on the engine thread)."""

    def __init__(self, llm, model_name: str, max_queue: int):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.model_name = model_name
        self.max_context = llm.max_context
        self.vocab_size = llm.config.vocab_size
        self.max_queue = max_queue

    def check_model(self, body: dict) -> str:
        model = body.get("model")
        if model is None:
            return self.model_name
        if not isinstance(model, str):
            raise wrong("model", "a string", model)
        if model != self.model_name:
            raise APIError(
                f"The model '{model}' does not exist. This server serves '{self.model_name}' (see GET /v1/models); "
                "pass that name, or start the server with --served-model-name to choose it.",
                status=404,
                param="model",
                code="model_not_found",
            )
        return model


def _check_ids(ctx: Context, ids: list[int], param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < ctx.vocab_size), None)
    if bad is not None:
        raise APIError(
            f"Token id {bad} in '{param}' is outside the model's vocabulary (0..{ctx.vocab_size - 1}). "
            "Pass ids made by this model's tokenizer.",
            param=param,
        )


def _max_tokens(
    ctx: Context, prompts: list[list[int]], asked: int | None, name: str, default: int | None, prompt_param: str
) -> int:
    """The max_tokens every prompt of the request gets; refuses a prompt or prompt + max_tokens over the context."""
    longest = max(len(p) for p in prompts)
    if longest >= ctx.max_context:
        raise APIError(
            f"This model's maximum context length is {ctx.max_context} tokens, and the prompt has {longest} tokens, "
            "which leaves no room for any output. Shorten the prompt (or the conversation).",
            param=prompt_param,
            code="context_length_exceeded",
        )
    room = ctx.max_context - longest
    if asked is None:
        return room if default is None else min(default, room)
    if asked < 1:
        raise APIError(f"'{name}' must be at least 1; got {asked}.", param=name)
    if asked > room:
        raise APIError(
            f"This model's maximum context length is {ctx.max_context} tokens. However, you requested "
            f"{longest + asked} tokens ({longest} in the prompt, {asked} for the output: '{name}'). Lower '{name}' "
            f"to at most {room}, or shorten the prompt.",
            param=name,
            code="context_length_exceeded",
        )
    return asked


_PARAM_IN_MESSAGE = re.compile(r"^Invalid sampling parameter: (\w+)=")


def _sampling(ctx: Context, body: dict, prompts: list[list[int]], n: int, max_tokens: int, **extra) -> list:
    """One SamplingParams per sequence (prompt-major); with a seed, sample j of each prompt gets seed + j."""
    given = {
        "temperature": number(body, "temperature"),
        "top_p": number(body, "top_p"),
        "top_k": integer(body, "top_k"),
        "min_p": number(body, "min_p"),
        "repetition_penalty": number(body, "repetition_penalty"),
        "presence_penalty": number(body, "presence_penalty"),
        "frequency_penalty": number(body, "frequency_penalty"),
        "seed": integer(body, "seed"),
        "ignore_eos": boolean(body, "ignore_eos"),
    }
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise wrong("stop", "a string or an array of strings", body["stop"])
        given["stop"] = [s for s in stop if s]  # OpenAI ignores empty stop strings
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise wrong("stop_token_ids", "an array of integers", ids)
        given["stop_token_ids"] = ids
    given = {k: v for k, v in given.items() if v is not None}
    try:
        base = ctx.llm.default_params(max_tokens=max_tokens, **given, **extra)
    except CadenzaError as e:
        m = _PARAM_IN_MESSAGE.match(str(e))
        param = m.group(1) if m else None
        if param == "top_logprobs" and "top_logprobs" not in body:
            param = "logprobs"  # completions: logprobs=N is top_logprobs here
        raise APIError(str(e), param=param) from None
    out = []
    for _ in prompts:
        for j in range(n):
            out.append(base if base.seed is None or j == 0 else base.replace(seed=(base.seed + j) % 2**64))
    return out


def _n_and_stream(ctx: Context, body: dict, prompts: int) -> tuple[int, bool, bool]:
    n = integer(body, "n")
    n = 1 if n is None else n
    if n < 1:
        raise APIError(f"'n' must be at least 1; got {n}.", param="n")
    if n * prompts > ctx.max_queue:
        raise APIError(
            f"This request asks for {n * prompts} sequences ({prompts} prompt(s) x n={n}), more than the server "
            f"queues at once ({ctx.max_queue}, --max-queue). Ask for fewer, or start the server with a larger "
            "--max-queue.",
            param="n",
        )
    stream = bool(boolean(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise APIError("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        if not isinstance(options, dict):
            raise wrong("stream_options", "an object", options)
        include_usage = bool(boolean(options, "include_usage"))
    absent_or(body, "logit_bias", ({},), "cadenza does not bias tokens.")
    return n, stream, include_usage


# --- /v1/completions -------------------------------------------------------------------------------------------


def _prompts(ctx: Context, prompt: Any) -> tuple[list[list[int]], list[str | None]]:
    """The four prompt forms: a string, strings, token ids, lists of token ids -> ids and (for echo) texts."""

    def ids_ok(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str) or ids_ok(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids_ok(p) for p in prompt):
        items = prompt
    else:
        raise APIError(
            "'prompt' must be a string, an array of strings, an array of token ids, or an array of arrays of token "
            f"ids (none empty); got {type_name(prompt)} {prompt!r:.80}.",
            param="prompt",
        )
    ids, texts = [], []
    for p in items:
        if isinstance(p, str):
            ids.append(ctx.tokenizer.encode(p))
            texts.append(p)
        else:
            _check_ids(ctx, p, "prompt")
            ids.append(list(p))
            texts.append(None)
    if any(not p for p in ids):
        raise APIError("The prompt is empty (0 tokens). Give a prompt of at least one token.", param="prompt")
    return ids, texts


def parse_completion(ctx: Context, body: dict) -> Parsed:
    check_fields(body, COMPLETION)
    model = ctx.check_model(body)
    if "prompt" not in body:
        raise APIError("'prompt' is required: the text (or token ids) to continue.", param="prompt")
    prompts, texts = _prompts(ctx, body["prompt"])
    n, stream, include_usage = _n_and_stream(ctx, body, len(prompts))
    best_of = integer(body, "best_of")
    if best_of is not None and best_of != n:
        raise APIError(
            f"'best_of' other than n is not supported (best_of={best_of}, n={n}): cadenza returns every "
            "sequence it generates. Leave best_of out.",
            param="best_of",
            code="unsupported_parameter",
        )
    absent_or(body, "suffix", ("",), "cadenza does not insert text between a prefix and a suffix.")
    logprobs = integer(body, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(f"'logprobs' must be from 0 to {MAX_TOP_LOGPROBS}; got {logprobs}.", param="logprobs")
    echo = bool(boolean(body, "echo"))
    if echo and logprobs is not None:
        raise APIError(
            "'echo' together with 'logprobs' is not supported (it needs the prompt's log-probabilities). "
            "Drop one of them.",
            param="echo",
            code="unsupported_parameter",
        )
    max_tokens = _max_tokens(ctx, prompts, integer(body, "max_tokens"), "max_tokens", COMPLETIONS_MAX_TOKENS, "prompt")
    extra = {} if logprobs is None else {"logprobs": True, "top_logprobs": logprobs}
    params = _sampling(ctx, body, prompts, n, max_tokens, **extra)
    echoes = [t if t is not None else ctx.tokenizer.decode(ids) for t, ids in zip(texts, prompts, strict=True)]
    return Parsed(model, prompts, params, n, stream, include_usage, logprobs, echoes if echo else [])


# --- /v1/chat/completions --------------------------------------------------------------------------------------


def _content(content: Any, i: int) -> str:
    """A message's content: a string, or an array of text parts (joined with newlines, as vLLM does)."""
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise wrong(param, "a string or an array of content parts", content)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            if kind in ("image_url", "input_audio", "file", "image", "audio"):
                raise APIError(
                    f"Content parts of type '{kind}' are not supported: cadenza serves text-only models. "
                    "Send text parts only.",
                    param=param,
                    code="unsupported_parameter",
                )
            raise wrong(param, 'an array of {"type": "text", "text": "..."} parts', part)
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list):
        raise wrong("messages", "an array of messages", raw)
    if not raw:
        raise APIError(
            '\'messages\' is empty. Send at least one message, e.g. [{"role": "user", "content": "Hello"}].',
            param="messages",
        )
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise wrong(f"messages[{i}]", 'an object like {"role": "user", "content": "..."}', m)
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise APIError(
                f"messages[{i}] is a tool call or result: tools / function calling are not supported. "
                "Send system, user and assistant messages only.",
                param=f"messages[{i}]",
                code="unsupported_parameter",
            )
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(
                f"messages[{i}].role must be one of system, developer, user, assistant; got {role!r}.",
                param=f"messages[{i}].role",
            )
        message = {"role": "system" if role == "developer" else role, "content": _content(m.get("content"), i)}
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
    return out


def parse_chat(ctx: Context, body: dict) -> Parsed:
    check_fields(body, CHAT)
    model = ctx.check_model(body)
    if "messages" not in body:
        raise APIError(
            '\'messages\' is required: the conversation, e.g. [{"role": "user", "content": "Hello"}].', param="messages"
        )
    messages = _messages(body["messages"])
    tools_why = "tools / function calling are not supported by cadenza's server."
    absent_or(body, "tools", ([],), tools_why)
    absent_or(body, "functions", ([],), tools_why)
    absent_or(body, "tool_choice", ("none",), tools_why)
    absent_or(body, "function_call", ("none",), tools_why)
    absent_or(
        body,
        "response_format",
        ({"type": "text"},),
        "structured output (JSON mode / json_schema) is not supported; ask for JSON in the prompt instead.",
    )
    absent_or(body, "modalities", (["text"],), "cadenza generates text only.")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise wrong("chat_template_kwargs", "an object", kwargs)
    try:
        ids = ctx.llm.chat_prompt(messages, **kwargs)
    except CadenzaError as e:
        raise APIError(str(e), param="messages") from None
    n, stream, include_usage = _n_and_stream(ctx, body, 1)
    logprobs, top = boolean(body, "logprobs"), integer(body, "top_logprobs")
    if top is not None and not logprobs:
        raise APIError("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(f"'top_logprobs' must be from 0 to {MAX_TOP_LOGPROBS}; got {top}.", param="top_logprobs")
    mt, mct = integer(body, "max_tokens"), integer(body, "max_completion_tokens")
    name = "max_completion_tokens" if mct is not None else "max_tokens"
    max_tokens = _max_tokens(ctx, [ids], mct if mct is not None else mt, name, None, "messages")
    extra = {"logprobs": True, "top_logprobs": top or 0} if logprobs else {}
    params = _sampling(ctx, body, [ids], n, max_tokens, **extra)
    return Parsed(model, [ids], params, n, stream, include_usage, (top or 0) if logprobs else None)
