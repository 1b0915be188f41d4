"""Text <-> token ids for a Hugging Face checkpoint folder, giving the same results as transformers' tokenizers.

`tokenizer.json` is run by the `tokenizers` library as written. A folder with only `tokenizer.model` is run by
`sentencepiece`, wrapped to behave as transformers' LlamaTokenizer conversion of that file (what tokenizer_config.json
with "tokenizer_class": "LlamaTokenizer" gets): no normalization, added/special tokens split out of the text first,
"▁" prepended only at the start of the text (before every stretch between added tokens when `legacy` is true), and
decoding that joins pieces as that tokenizer's decoder chain does. (transformers 5.23's generic fallback for a bare
tokenizer.model, used e.g. when config.json says model_type "mixtral", drops the "▁" prefix; we keep it.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cadenza.errors import CadenzaError

_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FLAGS = ("special", "lstrip", "rstrip", "normalized", "single_word")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# transformers' clean_up_tokenization_spaces replacements (only used by non-BPE models whose config asks for it).
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


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


def _cleanup(text: str) -> str:
    for src, dst in _CLEANUPS:
        text = text.replace(src, dst)
    return text


class _HFBackend:
    """A `tokenizers.Tokenizer` loaded from tokenizer.json, adjusted the way transformers adjusts it on loading."""

    def __init__(self, file: Path, config: dict[str, Any], named: dict[str, str | None]) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a plain Exception for any parse error
            raise CadenzaError(
                f"could not load {file}: {e}. Copy tokenizer.json again from the model's repository."
            ) from e
        # As transformers does: tokens declared in tokenizer_config.json are (re-)added with the flags given there,
        # then the named tokens (bos/eos/unk/pad/...) are made special, so decode(skip_special_tokens=True) drops them.
        existing = {repr(t) for t in tok.get_added_tokens_decoder().values()}
        for _, spec in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            flags = {k: bool(spec[k]) for k in _ADDED_TOKEN_FLAGS if k in spec}
            token = AddedToken(spec.get("content", ""), **flags)
            if token.content and repr(token) not in existing:
                tok.add_tokens([token])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named.values() if t])
        # BOS/EOS come from the file's post-processor; like transformers 5, add_bos_token/add_eos_token in
        # tokenizer_config.json are ignored when there is a tokenizer.json.
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        # transformers skips clean_up_tokenization_spaces for BPE models
        self.cleanup = bool(config.get("clean_up_tokenization_spaces")) and type(tok.model).__name__ != "BPE"
        self.cleans_up = self.cleanup or bool(getattr(tok.decoder, "cleanup", False))  # e.g. WordPiece's own
        self.byte_ids: set[int] = set()  # "<0xNN>" tokens of a ByteFallback decoder
        if "ByteFallback" in repr(tok.decoder):
            self.byte_ids = {i for t, i in tok.get_vocab().items() if _BYTE_PIECE.fullmatch(t)}

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        text = self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _cleanup(text) if self.cleanup else text


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while buf[pos] & 0x80:
        value, pos, shift = value | (buf[pos] & 0x7F) << shift, pos + 1, shift + 7
    return value | buf[pos] << shift, pos + 1


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out) + bytes([value])


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(field number, start, payload start, end) of each top-level field of a protobuf message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        payload = pos
        if key & 7 == 0:  # varint
            pos = _varint(buf, pos)[1]
        elif key & 7 == 2:  # length-delimited
            size, payload = _varint(buf, pos)
            pos = payload + size
        else:  # fixed64 / fixed32
            pos += {1: 8, 5: 4}[key & 7]
        yield key >> 3, start, payload, pos


def _plain_normalizer(proto: bytes) -> bytes:
    """The model proto with a normalizer that only turns spaces into "▁", as transformers' converted tokenizers.

    transformers drops the model's normalization rule (e.g. nmt_nfkc), never collapses spaces, and prepends "▁"
    only where its pre-tokenizer says (we do that ourselves). ModelProto field 3 is normalizer_spec; in it, fields
    1 name, 2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces and 6 normalization_rule_tsv.
    """
    out = bytearray()
    for field, start, payload, end in _proto_fields(proto):
        if field != 3:
            out += proto[start:end]
            continue
        inner = proto[payload:end]
        kept = b"".join(inner[s:e] for f, s, _, e in _proto_fields(inner) if f not in (1, 2, 3, 4, 6))
        kept += b"\x0a\x08identity\x18\x00\x20\x00"  # name "identity", add_dummy_prefix and remove_extra_... false
        out += b"\x1a" + _put_varint(len(kept)) + kept
    return bytes(out)


class _SentencePieceBackend:
    """tokenizer.model through `sentencepiece`, behaving as transformers' Llama-style conversion of it."""

    def __init__(self, file: Path, config: dict[str, Any], named: dict[str, str | None]) -> None:
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_proto=_plain_normalizer(file.read_bytes()))
        except Exception as e:  # sentencepiece raises RuntimeError/ValueError/IndexError for damaged files
            raise CadenzaError(
                f"could not load {file}: {e}. Copy tokenizer.model again from the model's repository."
            ) from e
        self.sp = sp
        # Tokens the config leaves unnamed default to the model's own <s>, </s> and <unk> pieces.
        for key, piece_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
            if named[key] is None and key not in config and piece_id >= 0:
                named[key] = sp.id_to_piece(piece_id)
        self.pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}
        # Control pieces (<s>, </s>) and <unk> are special added tokens; the config may add more, past the model's ids.
        self.special_ids = {i for i in range(len(self.pieces)) if sp.is_control(i) or sp.is_unknown(i)}
        self.byte_ids = {i for i in range(len(self.pieces)) if sp.is_byte(i)}
        self.added: dict[str, tuple[int, bool, bool]] = {self.pieces[i]: (i, False, False) for i in self.special_ids}
        self.contents: dict[int, str] = {}  # added tokens by id (they may replace a placeholder piece)
        for key, spec in config.get("added_tokens_decoder", {}).items():
            if (content := spec.get("content")) is not None:
                self._add(content, int(key), bool(spec.get("special")))
                self.added[content] = (int(key), bool(spec.get("lstrip")), bool(spec.get("rstrip")))
        for token in named.values():
            if token:
                self._add(token, self.ids.get(token, self.vocab_size), True)
        # Longest first, so "<s>" never wins over a longer added token that starts with it; "(?!)" never matches.
        alternatives = sorted(self.added, key=len, reverse=True)
        self.split_re = re.compile("|".join(re.escape(t) for t in alternatives) or "(?!)")
        self.add_prefix = config.get("add_prefix_space") is not False
        self.prefix_every_segment = bool(config.get("legacy", False))  # transformers' prepend_scheme "always"
        bos = named["bos_token"]
        self.bos_id = self.ids.get(bos) if config.get("add_bos_token") and bos else None  # v5: no BOS unless asked
        self.eos_id = self.ids.get(named["eos_token"] or "") if config.get("add_eos_token") else None
        self.cleans_up = False  # transformers treats converted SentencePiece models as BPE: no clean-up

    def _add(self, content: str, token_id: int, special: bool) -> None:
        self.contents.setdefault(token_id, content)
        self.ids[content] = token_id
        self.added.setdefault(content, (token_id, False, False))
        if special:
            self.special_ids.add(token_id)

    @property
    def vocab_size(self) -> int:
        return max(len(self.pieces), max(self.contents, default=-1) + 1)

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        pos = 0
        for match in self.split_re.finditer(text):
            token_id, lstrip, rstrip = self.added[match.group()]
            end = match.end()
            if rstrip:  # rstrip/lstrip tokens swallow the whitespace beside them
                end += len(text[end:]) - len(text[end:].lstrip())
            ids += self._encode_plain(text[pos : match.start()].rstrip() if lstrip else text[pos : match.start()], pos)
            ids.append(token_id)
            pos = end
        ids += self._encode_plain(text[pos:], pos)
        if add_special_tokens:
            ids = [self.bos_id] * (self.bos_id is not None) + ids + [self.eos_id] * (self.eos_id is not None)
        return ids

    def _encode_plain(self, text: str, start: int) -> list[int]:
        if not text:
            return []
        if self.add_prefix and (start == 0 or self.prefix_every_segment) and text[0] not in " ▁":
            text = " " + text
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # transformers' chain: "▁" -> " ", runs of <0xNN> pieces -> UTF-8 (one U+FFFD per byte if invalid),
        # join, then strip one leading space (the prefix added by encode).
        parts: list[str] = []
        pending = bytearray()
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            token = self.contents.get(i) or (self.pieces[i] if 0 <= i < len(self.pieces) else None)
            if token is None:
                continue
            if _BYTE_PIECE.fullmatch(token):
                pending.append(int(token[3:5], 16))
                continue
            parts += [_bytes_text(pending), token.replace("▁", " ")]
            pending.clear()
        text = "".join(parts) + _bytes_text(pending)
        return text[1:] if self.add_prefix and text.startswith(" ") else text


def _bytes_text(data: bytes | bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # as the `tokenizers` ByteFallback decoder: one U+FFFD per byte
        return "\ufffd" * len(data)


_Backend = _HFBackend | _SentencePieceBackend


class Tokenizer:
    """Encodes, decodes and renders chat prompts for one checkpoint, as transformers' AutoTokenizer would."""

    def __init__(self, backend: _Backend, named: dict[str, str | None], template: str | None, source: str) -> None:
        self._backend = backend
        self._source = source  # the folder, for error messages
        self._named = named
        self._compiled: Any = None
        self.vocab_size: int = backend.vocab_size
        self.bos_token_id: int | None = backend.token_to_id(named["bos_token"]) if named["bos_token"] else None
        eos_id = backend.token_to_id(named["eos_token"]) if named["eos_token"] else None
        self.eos_token_ids: list[int] = [] if eos_id is None else [eos_id]
        self.special_token_ids: set[int] = set(backend.special_ids)
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
        backend: _Backend
        if (folder / "tokenizer.json").is_file():
            backend = _HFBackend(folder / "tokenizer.json", config, named)
        elif (folder / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(folder / "tokenizer.model", config, named)
        else:
            raise CadenzaError(
                f"no tokenizer files in {folder}: looked for tokenizer.json and tokenizer.model. Copy them (and "
                "tokenizer_config.json) from the model's repository into that folder."
            )
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
            template = next(
                (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
            )
        if (folder / "chat_template.jinja").is_file():  # the separate file wins, as in transformers
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, named, template if isinstance(template, str) else None, str(folder))

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
        import jinja2

        if self.chat_template is None:
            raise CadenzaError(
                f"the checkpoint in {self._source} has no chat template (no chat_template in tokenizer_config.json "
                "and no chat_template.jinja), so chat messages cannot be turned into a prompt. Use a checkpoint of "
                "an instruction-tuned model that ships a chat template, or pass a plain text prompt instead."
            )
        chat = []
        for message in messages:
            message = {k: v for k, v in message.items() if v is not None}  # as transformers: None means absent
            reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
            if reasoning is not None:  # templates read it as reasoning_content or (gpt-oss) thinking
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        variables = {"tools": None, "documents": None, **{k: v for k, v in self._named.items() if v}, **extra}
        try:
            if self._compiled is None:
                self._compiled = _jinja_environment().from_string(self.chat_template)
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


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces; the pieces joined equal `Tokenizer.decode` of all the ids.

    Each add() decodes only a short window: the ids of the last emitted step (the "prefix", which gives the decoder
    its context, e.g. whether a "▁" is a leading space) plus the ids after them. Text ending in an incomplete UTF-8
    character (U+FFFD) is held back until the character completes, as are an open run of "<0xNN>" byte-fallback
    pieces and a trailing fragment that decode's clean-up could still change (" n" of " n't"), so no emitted text
    ever needs taking back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the kept ids (skipped special tokens never enter: decode drops them anyway)
        self._prefix = 0  # window start: ids[prefix:read] are already emitted and decode to _prefix_text
        self._read = 0
        self._prefix_text = ""
        self._sent = 0  # characters past _prefix_text already emitted while some tail was held back

    def add(self, token_id: int) -> str:
        """Add one generated id; returns the text that became final (often "", e.g. mid-character)."""
        if self._skip and token_id in self._tokenizer.special_token_ids:
            return ""
        self._ids.append(int(token_id))
        if token_id in self._tokenizer._backend.byte_ids:
            # An open run of "<0xNN>" byte-fallback pieces decodes all-or-nothing (one invalid byte turns the whole
            # run into U+FFFDs), so none of it is final until a non-byte token closes it: no need to decode yet.
            return ""
        new = self._window_text()
        safe = len(new) - self._held_back(new)
        piece = new[self._sent : safe]
        if safe == len(new):
            self._advance()
        else:
            self._sent = max(self._sent, safe)
        return piece

    def flush(self) -> str:
        """Whatever text is still held back (call once at the end of generation)."""
        piece = self._window_text()[self._sent :]
        self._advance()
        return piece

    def _window_text(self) -> str:
        text = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        return text[len(self._prefix_text) :]

    def _held_back(self, new: str) -> int:
        """How many trailing characters of `new` may still change when more ids come."""
        end = len(new.rstrip("\ufffd"))  # an incomplete UTF-8 character at the end
        if self._tokenizer._backend.cleans_up:
            # Clean-up only deletes spaces, by patterns of at most 3 other characters after them (" n't", and
            # " ' " cascades: "do n ' t" -> "don't"), so text is final up to a point after 4 non-space characters.
            while end >= 4 and " " in new[end - 4 : end]:
                end -= 1
            end = end if end >= 4 else 0
        return len(new) - end

    def _advance(self) -> None:
        # The ids just emitted become the new prefix; only they are decoded again next time.
        self._prefix, self._read, self._sent = self._read, len(self._ids), 0
        self._prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)


def _byte_symbols() -> list[str]:
    """The 256 byte-level symbols, indexed by byte: printable Latin-1 bytes stand for themselves, the other bytes
    (controls, space, ...) for the characters from U+0100 on, in byte order (the GPT-2 byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


BYTE_LEVEL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYS] {{ message['content'] }} [/SYS]"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def write_byte_level_tokenizer(path: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json of a tiny byte-level tokenizer (no merges) into `path`.

    Ids: "<s>" = 0 (BOS, prepended by encode(add_special_tokens=True)), "</s>" = 1 (EOS), "<unk>" = 2, then byte
    b has id 3 + b; 259 ids in all. Any text round-trips. The chat template is "<s>[INST] user [/INST] answer</s>"
    style (a system message renders as "[SYS] ... [/SYS]").
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + _byte_symbols())}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 0)]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "chat_template": BYTE_LEVEL_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
