"""The request fields cadenza's server knows, readers that refuse wrong types, and the OpenAI-shaped error.

Fields are sorted into three lists: the ones honoured (`COMMON`, `CHAT`, `COMPLETION`), the ones ignored because
they do not change the output (`IGNORED`), and the ones refused because cadenza cannot honour them and ignoring them
would change what the client gets (`UNSUPPORTED`; a few honoured ones are refused too, for values other than "off":
tools, response_format, logit_bias, ...). A field in no list is refused as unrecognised, as the OpenAI API does: a
misspelt `max_token` must not silently fall back to a default.
"""

from __future__ import annotations

from typing import Any

# honoured by both endpoints (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids: vLLM's extras)
COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "stream",
    "stream_options",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
    "logit_bias",
    "logprobs",
}
CHAT = COMMON | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "modalities",
    "chat_template_kwargs",
}
COMPLETION = COMMON | {"prompt", "echo", "best_of", "suffix"}

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

# refused whatever their value (the ones in CHAT/COMPLETION above are refused only for values cadenza can't honour)
UNSUPPORTED = {
    "audio": "cadenza generates text only.",
    "prediction": "cadenza does not decode against predicted outputs.",
    "web_search_options": "cadenza has no web search.",
    "use_beam_search": "the server decodes requests together, one token per step; use `cadenza run --num-beams`.",
    "num_beams": "the server decodes requests together, one token per step; use `cadenza run --num-beams`.",
}


class APIError(Exception):
    """An error answered with `status` and OpenAI's body {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def type_name(value: Any) -> str:
    return "null" if value is None else JSON_TYPES.get(type(value), type(value).__name__)


def wrong(name: str, want: str, value: Any) -> APIError:
    return APIError(f"'{name}' must be {want}; got {type_name(value)} {value!r:.80}.", param=name)


def integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # 5.0 from loosely typed clients
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise wrong(name, "an integer", value)
    return value


def number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise wrong(name, "a number", value)
    return value


def boolean(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise wrong(name, "true or false", value)
    return value


def absent_or(body: dict, name: str, allowed, why: str) -> None:
    """Refuses `name` unless it is missing or one of the values that mean "off"."""
    value = body.get(name)
    if value is not None and value not in allowed:
        raise APIError(
            f"'{name}' is not supported: {why} Leave it out of the request.", param=name, code="unsupported_parameter"
        )


def check_fields(body: dict, known: set[str]) -> None:
    for name in body:
        if name in UNSUPPORTED:
            raise APIError(
                f"'{name}' is not supported: {UNSUPPORTED[name]} Leave it out of the request.",
                param=name,
                code="unsupported_parameter",
            )
        if name not in known and name not in IGNORED:
            raise APIError(
                f"Unrecognized request argument supplied: '{name}'. Check its spelling; cadenza accepts "
                f"{', '.join(sorted(known))} (and ignores {', '.join(sorted(IGNORED))}).",
                param=name,
                code="unrecognized_argument",
            )
