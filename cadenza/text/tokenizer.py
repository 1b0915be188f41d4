"""Text <-> token ids for a Hugging Face checkpoint folder, giving the same results as transformers' tokenizers.

`tokenizer.json` is run by the `tokenizers` library (cadenza.text.tokenizer_json); a folder with only
`tokenizer.model` by `sentencepiece`, as transformers' Llama-style conversion of it (cadenza.text.sentencepiece).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cadenza.errors import CadenzaError
from cadenza.text.chat_template import ChatTemplate, load_chat_template
from cadenza.text.detokenizer import IncrementalDetokenizer
from cadenza.text.sentencepiece import SentencePieceBackend
from cadenza.text.tokenizer_json import TokenizerJsonBackend

_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

Backend = TokenizerJsonBackend | SentencePieceBackend


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CadenzaError(
            f"could not read {path}: {e}. The file is damaged or not JSON; copy it again from the model's repository."
        ) from e
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A token given as "<s>" or as {"content": "<s>", ...} (tokenizer_config.json / special_tokens_map.json)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encodes, decodes and renders chat prompts for one checkpoint, as transformers' AutoTokenizer would.

    `named` maps bos_token/eos_token/unk_token/... to their text (None: not given); `template` is the chat template
    source (None: none); `source` is the folder, for error messages.
    """

    def __init__(self, backend: Backend, named: dict[str, str | None], template: str | None, source: str) -> None:
        self._backend = backend
        self._source = source
        self._named = named
        self._chat: ChatTemplate | None = None  # made from chat_template on first use
        self.vocab_size: int = backend.vocab_size
        self.bos_token_id: int | None = backend.token_to_id(named["bos_token"]) if named["bos_token"] else None
        eos_id = backend.token_to_id(named["eos_token"]) if named["eos_token"] else None
        self.eos_token_ids: list[int] = [] if eos_id is None else [eos_id]
        self.special_token_ids: set[int] = set(backend.special_ids)
        # "<0xNN>" byte-fallback ids, and whether decode removes spaces (" ." -> "."): the detokenizer holds text
        # back for both, since later ids can still change how they decode.
        self.byte_fallback_ids: set[int] = backend.byte_ids
        self.decode_cleans_up: bool = backend.cleans_up
        self.chat_template: str | None = template

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of the checkpoint folder `path` (tokenizer.json, else tokenizer.model, + configs)."""
        folder = Path(path)
        if not folder.is_dir():
            raise CadenzaError(
                f"tokenizer folder {folder} does not exist or is not a folder; pass the checkpoint folder that holds "
                "tokenizer.json (or tokenizer.model) and tokenizer_config.json."
            )
        config = _read_json(folder / "tokenizer_config.json")
        token_map = _read_json(folder / "special_tokens_map.json")
        named = {k: _token_text(config[k] if k in config else token_map.get(k)) for k in _NAMED_TOKENS}
        backend: Backend
        if (folder / "tokenizer.json").is_file():
            backend = TokenizerJsonBackend(folder / "tokenizer.json", config, named)
        elif (folder / "tokenizer.model").is_file():
            backend = SentencePieceBackend(folder / "tokenizer.model", config, named)
        else:
            raise CadenzaError(
                f"no tokenizer files in {folder}: looked for tokenizer.json and tokenizer.model. Copy them (and "
                "tokenizer_config.json) from the model's repository into that folder."
            )
        return cls(backend, named, load_chat_template(folder, config), str(folder))

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], source: str) -> Tokenizer:
        """The tokenizer a GGUF file describes; `metadata` maps its keys to plain values (see text.gguf_metadata).

        `source` is the file's path, for error messages. Built as transformers' GGUF loader builds it.
        """
        from cadenza.text.gguf import build_gguf_tokenizer

        tok, named = build_gguf_tokenizer(metadata, source)
        names = {k: named.get(k) for k in _NAMED_TOKENS}
        backend = TokenizerJsonBackend(tok, {}, names)
        return cls(backend, names, metadata.get("tokenizer.chat_template"), source)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the BOS/EOS the tokenizer's config adds."""
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (BOS, EOS, ...) are dropped when `skip_special_tokens`."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A streaming decoder: feed it generated ids one at a time, get text as soon as it is final."""
        return IncrementalDetokenizer(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the checkpoint's chat template to prompt text.

        `extra` become template variables (e.g. tools=[...], enable_thinking=False). The result is meant to be
        encoded with add_special_tokens=False, since templates write the BOS themselves.
        """
        if self.chat_template is None:
            # A GGUF keeps its template in the metadata, a folder in tokenizer_config.json or chat_template.jinja.
            gguf = self._source.endswith(".gguf")
            where = (
                "no tokenizer.chat_template in its metadata"
                if gguf
                else ("no chat_template in tokenizer_config.json and no chat_template.jinja")
            )
            raise CadenzaError(
                f"the checkpoint in {self._source} has no chat template ({where}), so chat messages cannot be "
                "turned into a prompt. Use a checkpoint of an instruction-tuned model that ships a chat template, "
                "or pass a plain text prompt instead."
            )
        if self._chat is None:
            self._chat = ChatTemplate(self.chat_template, self._source)
        variables = {"tools": None, "documents": None, **{k: v for k, v in self._named.items() if v}, **extra}
        return self._chat.render(messages, add_generation_prompt, variables)
