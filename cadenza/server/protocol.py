"""Validated requests -> what the engine runs: prompt token ids and one SamplingParams per sequence.

The pydantic models in `cadenza.server.schemas` have checked what a request can get wrong on its own; what is left
needs the loaded model (its name, vocabulary, context length, chat template, queue) and raises `APIError` (HTTP 400,
or 404 for an unknown model, with an OpenAI-shaped body naming the field).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cadenza.errors import CadenzaError
from cadenza.sampling import SamplingParams
from cadenza.server.errors import APIError
from cadenza.server.schemas import ChatCompletionRequest, CompletionRequest, Message

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
    echo_logprobs: bool = False  # completions with echo and logprobs: the prompt's tokens lead the logprobs
    prompt_logprobs: int | None = None  # completions: vLLM's prompt_logprobs (alternatives per prompt token)


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

    def check_model(self, model: str | None) -> str:
        if model is None:
            return self.model_name
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
# passed to SamplingParams as they are when given; its checks (ranges, finiteness) are the server's too
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "ignore_eos",
    "stop_token_ids",
)


def _sampling(
    ctx: Context, req: CompletionRequest | ChatCompletionRequest, prompts: int, n: int, max_tokens: int, **extra
) -> list[SamplingParams]:
    """One SamplingParams per sequence (prompt-major); with a seed, sample j of each prompt gets seed + j.
    The one place a request becomes sampling parameters, on top of the checkpoint's recommended defaults."""
    given = {k: v for k in SAMPLING_FIELDS if (v := getattr(req, k)) is not None}
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        given["stop"] = [s for s in stops if s]  # OpenAI ignores empty stop strings
    try:
        base = ctx.llm.default_params(max_tokens=max_tokens, **given, **extra)
    except CadenzaError as e:
        m = _PARAM_IN_MESSAGE.match(str(e))
        param = m.group(1) if m else None
        if param == "top_logprobs" and isinstance(req, CompletionRequest):
            param = "logprobs"  # completions: logprobs=N is top_logprobs here
        raise APIError(str(e), param=param) from None
    out = []
    for _ in range(prompts):
        for j in range(n):
            out.append(base if base.seed is None or j == 0 else base.replace(seed=(base.seed + j) % 2**64))
    return out


def _n_and_stream(ctx: Context, req: CompletionRequest | ChatCompletionRequest, prompts: int) -> tuple[int, bool, bool]:
    n = req.n or 1
    if n * prompts > ctx.max_queue:
        raise APIError(
            f"This request asks for {n * prompts} sequences ({prompts} prompt(s) x n={n}), more than the server "
            f"queues at once ({ctx.max_queue}, --max-queue). Ask for fewer, or start the server with a larger "
            "--max-queue.",
            param="n",
        )
    include_usage = req.stream_options is not None and bool(req.stream_options.include_usage)
    return n, bool(req.stream), include_usage


# --- /v1/completions -------------------------------------------------------------------------------------------


def parse_completion(ctx: Context, req: CompletionRequest) -> Parsed:
    model = ctx.check_model(req.model)
    prompts, texts = [], []  # token ids, and for echo each prompt's text (None: given as ids)
    for p in req.prompt:
        if isinstance(p, str):
            prompts.append(ctx.tokenizer.encode(p))
            texts.append(p)
        else:
            _check_ids(ctx, p, "prompt")
            prompts.append(p)
            texts.append(None)
    if any(not p for p in prompts):
        raise APIError("The prompt is empty (0 tokens). Give a prompt of at least one token.", param="prompt")
    n, stream, include_usage = _n_and_stream(ctx, req, len(prompts))
    max_tokens = _max_tokens(ctx, prompts, req.max_tokens, "max_tokens", COMPLETIONS_MAX_TOKENS, "prompt")
    extra = {} if req.logprobs is None else {"logprobs": True, "top_logprobs": req.logprobs}
    # the prompt is scored (its prefill keeps every position's logits) for echo + logprobs, prompt_logprobs, and
    # max_tokens 0, with as many alternatives as the larger of the two asks for
    echo_logprobs = bool(req.echo) and req.logprobs is not None
    asked = [k for k in (req.logprobs if echo_logprobs else None, req.prompt_logprobs) if k is not None]
    if asked or max_tokens == 0:
        extra["prompt_logprobs"] = max(asked, default=0)
    params = _sampling(ctx, req, len(prompts), n, max_tokens, **extra)
    echoes = []
    if req.echo:
        echoes = [t if t is not None else ctx.tokenizer.decode(ids) for t, ids in zip(texts, prompts, strict=True)]
    return Parsed(
        model, prompts, params, n, stream, include_usage, req.logprobs, echoes, echo_logprobs, req.prompt_logprobs
    )


# --- /v1/chat/completions --------------------------------------------------------------------------------------


def _message(m: Message) -> dict:
    """What the chat template gets: developer is system to it, text parts are joined with newlines (as vLLM does)."""
    content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or ())
    message = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name is not None:
        message["name"] = m.name
    return message


def parse_chat(ctx: Context, req: ChatCompletionRequest) -> Parsed:
    model = ctx.check_model(req.model)
    try:
        ids = ctx.llm.chat_prompt([_message(m) for m in req.messages], **(req.chat_template_kwargs or {}))
    except CadenzaError as e:
        raise APIError(str(e), param="messages") from None
    n, stream, include_usage = _n_and_stream(ctx, req, 1)
    mct = req.max_completion_tokens
    name = "max_completion_tokens" if mct is not None else "max_tokens"
    max_tokens = _max_tokens(ctx, [ids], mct if mct is not None else req.max_tokens, name, None, "messages")
    top = req.top_logprobs or 0
    extra = {"logprobs": True, "top_logprobs": top} if req.logprobs else {}
    params = _sampling(ctx, req, 1, n, max_tokens, **extra)
    return Parsed(model, [ids], params, n, stream, include_usage, top if req.logprobs else None)
