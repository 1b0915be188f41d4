"""The OpenAI-shaped error, and how a failed request validation becomes one.

Every answer that is not a success carries {"error": {"message", "type", "param", "code"}}; `param` names the
request field at fault (nested ones as `messages[0].role`), so a client can point at it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic_core import PydanticCustomError

# a check of ours failed: ctx holds the whole message, and param / code when they differ from the error's place
REFUSED = "cadenza_refused"
# a value of the wrong JSON type: ctx["want"] says what the field takes ("a string or an array of strings")
WRONG_TYPE = "cadenza_wrong_type"


MAX_MESSAGE_CHARS = 1000  # an error message echoes the client's values: never more than this many characters
MAX_PARAM_CHARS = 200


def clip(text: str, limit: int) -> str:
    """`text` if it is short, else its start and end with the middle left out (the end says how to fix it)."""
    if len(text) <= limit:
        return text
    keep = limit - 40
    return f"{text[: keep // 2]} ... ({len(text) - keep} characters left out) ... {text[len(text) - keep // 2 :]}"


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
        message = clip(message, MAX_MESSAGE_CHARS)
        param = None if param is None else clip(param, MAX_PARAM_CHARS)
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def refuse(message: str, param: str | None = None, code: str | None = None) -> PydanticCustomError:
    """For validators: fail with exactly `message` (the template is only "{message}", so braces in it are safe)."""
    return PydanticCustomError(REFUSED, "{message}", {"message": message, "param": param, "code": code})


def unsupported(name: str, why: str) -> PydanticCustomError:
    return refuse(f"'{name}' is not supported: {why} Leave it out of the request.", name, "unsupported_parameter")


JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def type_name(value: Any) -> str:
    return "null" if value is None else JSON_TYPES.get(type(value), type(value).__name__)


# pydantic's error types for a value of the wrong type -> what the field wanted, in JSON's words
WANTS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}

BOUNDS = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("greater than", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
}


def param_of(loc: Sequence[str | int]) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'; FastAPI's leading 'body' (or 'query', ...) is dropped."""
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else str(part)
    return param or None


def invalid_request(errors: Sequence[dict]) -> APIError:
    """The first of pydantic's validation errors as a 400 whose message names the field, the problem and the fix
    (pydantic's own wording names the problem only)."""
    e = errors[0]
    kind, ctx, value = e["type"], e.get("ctx") or {}, e.get("input")
    param = param_of(e["loc"])
    if kind == REFUSED:
        return APIError(ctx["message"], param=ctx.get("param") or param, code=ctx.get("code"))
    got = f"got {type_name(value)} {value!r:.80}."
    if kind == WRONG_TYPE or kind in WANTS:
        message = f"'{param}' must be {ctx['want'] if kind == WRONG_TYPE else WANTS[kind]}; {got}"
    elif kind == "missing":
        message = f"'{param}' is required. Add it to the request."
    elif kind in BOUNDS:
        words, key = BOUNDS[kind]
        message = f"'{param}' must be {words} {ctx[key]}; got {value!r}."
    elif kind == "literal_error":
        message = f"'{param}' must be one of {ctx['expected']}; got {value!r:.80}."
    elif kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: '{param}'. Check its spelling, or leave it out."
        return APIError(message, param=param, code="unrecognized_argument")
    else:  # pydantic's own words, with the field named
        message = f"'{param}': {e['msg']}; {got}" if param else f"{e['msg']}; {got}"
    return APIError(message, param=param)
