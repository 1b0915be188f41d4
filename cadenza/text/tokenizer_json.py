"""A checkpoint's `tokenizer.json`, run by the `tokenizers` library as written, adjusted as transformers adjusts it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadenza.errors import CadenzaError
from cadenza.text.sentencepiece import BYTE_PIECE

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

_ADDED_TOKEN_FLAGS = ("special", "lstrip", "rstrip", "normalized", "single_word")
# transformers' clean_up_tokenization_spaces replacements (only used by non-BPE models whose config asks for it).
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip


def _cleanup(text: str) -> str:
    for src, dst in _CLEANUPS:
        text = text.replace(src, dst)
    return text


LONG_TEXT = 8192  # characters from which encoding releases the GIL


class TokenizerJsonBackend:
    """A `tokenizers.Tokenizer` loaded from tokenizer.json, adjusted the way transformers adjusts it on loading.

    `named` maps bos_token/eos_token/unk_token/... to their text (None: not given); those tokens become special.
    """

    def __init__(self, file: Path | str | HFTokenizer, config: dict[str, Any], named: dict[str, str | None]) -> None:
        """`file`: a tokenizer.json path, its text, or a tokenizer built in memory (e.g. from GGUF metadata)."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        if isinstance(file, HFTokenizer):
            tok = file
        else:
            try:
                tok = HFTokenizer.from_file(str(file)) if isinstance(file, Path) else HFTokenizer.from_str(file)
            except Exception as e:  # the Rust side raises a plain Exception for any parse error
                where = file if isinstance(file, Path) else "the tokenizer.json text"
                raise CadenzaError(
                    f"could not load {where}: {e}. Copy tokenizer.json again from the model's repository."
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
            self.byte_ids = {i for t, i in tok.get_vocab().items() if BYTE_PIECE.fullmatch(t)}

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) < LONG_TEXT:
            return self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        # the same ids; encode_batch lets go of the GIL while it works (encode holds it: seconds for megabytes, with
        # every other thread of the process, the server's event loop included, stopped)
        return self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        text = self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _cleanup(text) if self.cleanup else text
