"""The bodies of POST /v1/completions and /v1/chat/completions as pydantic models.

A model checks what a request can get wrong on its own: JSON types, ranges, required and unknown fields, and the
combinations cadenza refuses. What needs the loaded model (its name, vocabulary, context length, chat template) is
checked by protocol.py when it turns a request into prompt ids; sampling ranges are SamplingParams' own, so the
server and the Python API refuse the same values.

Fields fall in three groups: the ones declared here are honoured (a few only with a value that means "off": tools,
response_format, logit_bias, ...); IGNORED ones are accepted and dropped because they do not change the output;
UNSUPPORTED ones are refused whatever their value. Any other field is refused as unrecognised, as the OpenAI API does:
a misspelt `max_token` must not silently fall back to a default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cadenza.sampling import MAX_TOP_LOGPROBS
from cadenza.server.errors import WRONG_TYPE, refuse, unsupported

# accepted and ignored: bookkeeping, routing or hints that do not change the tokens generated
IGNORED = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "parallel_tool_calls",
    "reasoning_effort",
    "verbosity",
}

# refused whatever their value
UNSUPPORTED = {
    "audio": "cadenza generates text only.",
    "prediction": "cadenza does not decode against predicted outputs.",
    "web_search_options": "cadenza has no web search.",
    "use_beam_search": "the server decodes requests together, one token per step; use `cadenza run --num-beams`.",
    "num_beams": "the server decodes requests together, one token per step; use `cadenza run --num-beams`.",
}

TOOLS = "tools / function calling are not supported by cadenza's server."
MEDIA = ("image_url", "input_audio", "file", "image", "audio")


def _whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# an integer; 5.0 from loosely typed clients counts, 2.5 does not
Integer = Annotated[int, BeforeValidator(_whole)]


def expects(want: str) -> WrapValidator:
    """One error naming every accepted shape when a value fits none of a union's (pydantic reports one per shape)."""

    def check(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(WRONG_TYPE, "must be {want}", {"want": want}) from None

    return WrapValidator(check)


def off(allowed: Any, why: str) -> AfterValidator:
    """A field honoured only with null or `allowed`, the value that means "off"; anything else is refused."""

    def check(value: Any, info: ValidationInfo) -> Any:
        if value is not None and value != allowed:
            raise unsupported(info.field_name, why)
        return value

    return AfterValidator(check)


# a number, kept as given: SamplingParams' messages then show the client's own value (-1, not -1.0)
Number = Annotated[int | float, expects("a number")]


def _one_or_many(prompt: str | list) -> list[str | list[int]]:
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt


TokenIds = Annotated[list[int], Field(min_length=1)]
Prompt = Annotated[
    str | TokenIds | Annotated[list[str | TokenIds], Field(min_length=1)],
    expects("a string, an array of strings, an array of token ids, or an array of arrays of token ids (none empty)"),
    AfterValidator(_one_or_many),
]


class _Strict(BaseModel):
    """JSON's types as JSON has them: "5" is not 5 and 1 is not true (pydantic's lax mode would convert them).
    Unknown keys inside sub-objects are ignored, as they always were."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ResponseFormat(_Strict):
    model_config = ConfigDict(extra="allow")  # kept, so that {"type": "text", "json_schema": ...} is not "off"
    type: str


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[
        str | list[TextPart] | None, expects('a string or an array of {"type": "text", "text": "..."} parts')
    ] = None
    name: str | None = None


class _Request(_Strict):
    """The fields both endpoints honour (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids: vLLM's)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: Integer | None = Field(None, ge=1)
    temperature: Number | None = None
    top_p: Number | None = None
    stop: Annotated[str | list[str] | None, expects("a string or an array of strings")] = None
    seed: Integer | None = None
    n: Integer | None = Field(None, ge=1)
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    top_k: Integer | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    ignore_eos: bool | None = None
    stop_token_ids: Annotated[list[int] | None, expects("an array of integers")] = None
    logit_bias: Annotated[Any, off({}, "cadenza does not bias tokens.")] = None

    @model_validator(mode="before")
    @classmethod
    def _screen(cls, body: Any) -> Any:
        """Refused and unknown fields first, in the body's order, then missing required ones (whose description
        says what they are); ignored fields are dropped here so that extra="forbid" holds for the rest."""
        if not isinstance(body, dict):
            return body
        for name in body:
            if name in UNSUPPORTED:
                raise unsupported(name, UNSUPPORTED[name])
            if name not in cls.model_fields and name not in IGNORED:
                raise refuse(
                    f"Unrecognized request argument supplied: '{name}'. Check its spelling; cadenza accepts "
                    f"{', '.join(sorted(cls.model_fields))} (and ignores {', '.join(sorted(IGNORED))}).",
                    name,
                    "unrecognized_argument",
                )
        for name, f in cls.model_fields.items():
            if f.is_required() and name not in body:
                raise refuse(f"'{name}' is required: {f.description}.", name)
        return {k: v for k, v in body.items() if k not in IGNORED}

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise refuse("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        return self


class CompletionRequest(_Request):
    prompt: Prompt = Field(description="the text (or token ids) to continue")
    echo: bool | None = None
    best_of: Integer | None = None
    suffix: Annotated[Any, off("", "cadenza does not insert text between a prefix and a suffix.")] = None
    logprobs: Integer | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # the number of alternatives per token
    # vLLM's: per prompt token its log-prob, rank and this many alternatives (choices[i].prompt_logprobs)
    prompt_logprobs: Integer | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: Integer | None = Field(None, ge=0)  # 0: score the prompt only (with echo or prompt_logprobs)

    @model_validator(mode="after")
    def _refused_combinations(self):
        n = self.n or 1
        if self.best_of is not None and self.best_of != n:
            raise refuse(
                f"'best_of' other than n is not supported (best_of={self.best_of}, n={n}): cadenza returns every "
                "sequence it generates. Leave best_of out.",
                "best_of",
                "unsupported_parameter",
            )
        if self.max_tokens == 0 and not self.echo and self.prompt_logprobs is None:
            raise refuse(
                "'max_tokens' 0 generates nothing and returns nothing: it scores the prompt only, with 'echo': true "
                "(and 'logprobs' N for the prompt's log-probs) or 'prompt_logprobs' N. Ask for at least 1 token, "
                "or add one of those.",
                "max_tokens",
            )
        return self


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(description='the conversation, e.g. [{"role": "user", "content": "Hello"}]')
    max_completion_tokens: Integer | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: Integer | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Annotated[Any, off([], TOOLS)] = None
    functions: Annotated[Any, off([], TOOLS)] = None
    tool_choice: Annotated[Any, off("none", TOOLS)] = None
    function_call: Annotated[Any, off("none", TOOLS)] = None
    response_format: Annotated[
        ResponseFormat | None,
        off(
            ResponseFormat(type="text"),
            "structured output (JSON mode / json_schema) is not supported; ask for JSON in the prompt instead.",
        ),
    ] = None
    modalities: Annotated[Any, off(["text"], "cadenza generates text only.")] = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _text_conversation(cls, messages: Any) -> Any:
        """An empty conversation, tool calls and media parts get their own words (and code) before the shapes
        are checked."""
        if not isinstance(messages, list):
            return messages
        if not messages:
            raise refuse(
                '\'messages\' is empty. Send at least one message, e.g. [{"role": "user", "content": "Hello"}].',
                "messages",
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                continue
            if m.get("role") in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
                raise refuse(
                    f"messages[{i}] is a tool call or result: tools / function calling are not supported. "
                    "Send system, user and assistant messages only.",
                    f"messages[{i}]",
                    "unsupported_parameter",
                )
            parts = m.get("content")
            for part in parts if isinstance(parts, list) else ():
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in MEDIA:
                    raise refuse(
                        f"Content parts of type '{kind}' are not supported: cadenza serves text-only models. "
                        "Send text parts only.",
                        f"messages[{i}].content",
                        "unsupported_parameter",
                    )
        return messages

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_template_names(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        for name in ("messages", "self"):  # the conversation itself comes from 'messages'
            if kwargs and name in kwargs:
                raise refuse(
                    f"'chat_template_kwargs' cannot set '{name}': the template gets the conversation from "
                    "'messages'. Leave it out of chat_template_kwargs.",
                    f"chat_template_kwargs.{name}",
                )
        return kwargs

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise refuse("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
        return self
