"""One token's own text, as log-probs show it next to its id: in the server's responses, `cadenza run
--logprobs` and the Python API's results."""

from __future__ import annotations

import functools


class TokenText:
    """A token's own text, as logprobs show it. Decoding one id alone loses a SentencePiece word's leading space,
    so each id is decoded after a fixed anchor token and the anchor's text is cut off."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
        self.anchor_text = tokenizer.decode(self.anchor, skip_special_tokens=False)
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)

    def _text(self, token_id: int) -> str:
        text = self.tokenizer.decode([*self.anchor, token_id], skip_special_tokens=False)
        if self.anchor and text.startswith(self.anchor_text):
            return text[len(self.anchor_text) :]
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
