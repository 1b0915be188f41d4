"""Streaming detokenization: generated ids in, text out as soon as it can no longer change."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cadenza.text.tokenizer import Tokenizer


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
        if token_id in self._tokenizer.byte_fallback_ids:
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
        if self._tokenizer.decode_cleans_up:
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
