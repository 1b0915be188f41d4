"""Chat templates: finding a checkpoint's template and rendering messages with it, as transformers does."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from cadenza.errors import CadenzaError

_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def load_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The chat template of the checkpoint `folder` (None: it has none); `config` is its tokenizer_config.json.

    chat_template.jinja wins over tokenizer_config.json's "chat_template", as in transformers; of a list of named
    templates there, the one named "default" is used.
    """
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


class ChatTemplate:
    """One chat template, compiled on first use; `source` (the checkpoint folder) is named in error messages."""

    def __init__(self, template: str, source: str) -> None:
        self.template = template
        self._source = source
        self._compiled: Any = None

    def render(self, messages: list[dict], add_generation_prompt: bool, variables: dict[str, Any]) -> str:
        """Prompt text of `messages` ([{"role": ..., "content": ...}]); `variables` are extra template variables."""
        import jinja2

        chat = []
        for message in messages:
            message = {k: v for k, v in message.items() if v is not None}  # as transformers: None means absent
            reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
            if reasoning is not None:  # templates read it as reasoning_content or (gpt-oss) thinking
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        try:
            if self._compiled is None:
                self._compiled = _jinja_environment().from_string(self.template)
            return self._compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:  # raise_exception() in the template, or a broken template
            raise CadenzaError(
                f"the chat template of {self._source} failed: {e}. If it rejects the messages, fix them (e.g. roles "
                "must alternate user/assistant, or the model has no system role); if the template itself is broken, "
                "fix or replace chat_template.jinja or the chat_template in tokenizer_config.json."
            ) from e


def _jinja_environment() -> Any:
    """A sandboxed jinja2 environment with the helpers chat templates expect from transformers."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, **options: Any) -> str:
        # jinja's own tojson escapes HTML characters; templates expect plain json.dumps (indent, separators, sort_keys)
        return json.dumps(value, ensure_ascii=ensure_ascii, **options)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
