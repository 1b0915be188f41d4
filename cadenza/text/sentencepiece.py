"""A bare `tokenizer.model` run by `sentencepiece`, behaving as transformers' Llama-style conversion of it.

That conversion (what tokenizer_config.json with "tokenizer_class": "LlamaTokenizer" gets) has no normalization,
splits added/special tokens out of the text first, prepends "▁" only at the start of the text (before every stretch
between added tokens when `legacy` is true), and decodes by joining pieces as its decoder chain does.
(transformers 5.23's generic fallback for a bare tokenizer.model, used e.g. when config.json says model_type
"mixtral", drops the "▁" prefix; we keep it.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cadenza.errors import CadenzaError

# "<0xNN>": a byte-fallback piece, one byte of a character the vocabulary has no piece for
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def plain_normalizer(model_proto: bytes) -> bytes:
    """The serialized model with a normalizer that only turns spaces into "▁", as transformers' converted tokenizers.

    transformers drops the model's normalization rule (e.g. nmt_nfkc), never collapses spaces, and prepends "▁"
    only where its pre-tokenizer says (the backend does that itself). Other normalizer settings are kept; a model
    without a normalizer_spec is returned as it is.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except Exception as e:  # protobuf missing, or older than the protobuf that sentencepiece's module was built with
        raise CadenzaError(
            f"reading tokenizer.model needs the protobuf package, in a version that matches sentencepiece ({e}). "
            "Run `pip install -U protobuf sentencepiece`."
        ) from e
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    if model.HasField("normalizer_spec"):
        spec = model.normalizer_spec
        spec.ClearField("precompiled_charsmap")
        spec.ClearField("normalization_rule_tsv")
        spec.name = "identity"
        spec.add_dummy_prefix = False
        spec.remove_extra_whitespaces = False
    return model.SerializeToString()


class SentencePieceBackend:
    """tokenizer.model through `sentencepiece`, behaving as transformers' Llama-style conversion of it.

    `named` maps bos_token/eos_token/unk_token/... to their text (None: not given); the backend fills in the
    model's own <s>, </s> and <unk> pieces for those the config leaves unnamed.
    """

    def __init__(self, file: Path, config: dict[str, Any], named: dict[str, str | None]) -> None:
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_proto=plain_normalizer(file.read_bytes()))
        except CadenzaError:  # protobuf itself is missing or too old: the file is not to blame
            raise
        except Exception as e:  # protobuf's DecodeError, sentencepiece's RuntimeError/ValueError/...: damaged file
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
        # added token text -> (id, lstrip, rstrip)
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
            if BYTE_PIECE.fullmatch(token):
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
