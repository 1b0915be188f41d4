"""An assistant's generated tokens told apart into reasoning and answer, where the chat format marks them.

Two markings are known:
- harmony (gpt-oss): `<|channel|>NAME<|message|>TEXT<|end|>`, the next message opened by `<|start|>assistant`; the
  "analysis" channel is reasoning, every other channel ("final", "commentary") is the answer;
- think tags (Qwen3, DeepSeek-R1, GLM-4.5, MiniMax-M2): `<think>TEXT</think>` is reasoning. Some templates open the
  tag in the prompt (DeepSeek-R1-0528's, Qwen3-Thinking-2507's), so the answer starts inside it: a splitter made
  for a prompt (`fresh(prompt_ids)`) starts on the reasoning side when the prompt's last tag is an open one.
The markers and the harmony headers (channel and role names) are dropped from both texts. Works token by token on
the detokenizer's pieces, so a stream can send each piece to its side as it comes.
"""

from __future__ import annotations

from collections.abc import Sequence

HARMONY = ("<|channel|>", "<|message|>", "<|end|>", "<|start|>")
THINK = ("<think>", "</think>")
REASONING_CHANNELS = ("analysis",)


def _single_id(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


class ReasoningSplitter:
    """Feed each generated (token id, text piece) to `add`; it returns (reasoning piece, answer piece)."""

    def __init__(self, kind: str, ids: dict[str, int]):
        self.kind, self.ids = kind, ids
        self.by_id = {v: k for k, v in ids.items()}
        self.reasoning = ""
        self.answer = ""
        # harmony: "header" (between <|start|> or <|channel|> and <|message|>), "body" or "idle" (after <|end|>);
        # think tags: "answer" or "think"
        self.state = "answer" if kind == "think" else "idle"
        self.channel = ""
        self.header = ""

    @classmethod
    def for_tokenizer(cls, tokenizer) -> ReasoningSplitter | None:
        """A splitter for this tokenizer's chat format, or None when it marks no reasoning."""
        for kind, markers in (("harmony", HARMONY), ("think", THINK)):
            ids = {m: _single_id(tokenizer, m) for m in markers}
            if all(i is not None for i in ids.values()):
                return cls(kind, ids)
        return None

    def fresh(self, prompt_ids: Sequence[int] = ()) -> ReasoningSplitter:
        """A splitter for another answer in the same format (the marker ids are looked up once), to the prompt
        `prompt_ids`: with think tags, one whose last tag is `<think>` left the answer inside the reasoning."""
        out = ReasoningSplitter(self.kind, self.ids)
        if self.kind == "think":
            opening, closing = self.ids["<think>"], self.ids["</think>"]
            last = next((t for t in reversed(prompt_ids) if t in (opening, closing)), None)
            if last == opening:
                out.state = "think"
        return out

    def add(self, token_id: int, text: str) -> tuple[str, str]:
        marker = self.by_id.get(int(token_id))
        if self.kind == "think":
            return self._think(marker, text)
        return self._harmony(marker, text)

    def _take(self, reasoning: bool, text: str) -> tuple[str, str]:
        if reasoning:
            self.reasoning += text
            return text, ""
        self.answer += text
        return "", text

    def _think(self, marker: str | None, text: str) -> tuple[str, str]:
        if marker == "<think>":
            self.state = "think"
            return "", ""
        if marker == "</think>":
            self.state = "answer"
            return "", ""
        return self._take(self.state == "think", text)

    def _harmony(self, marker: str | None, text: str) -> tuple[str, str]:
        if marker in ("<|start|>", "<|channel|>"):
            self.state, self.header = "header", "" if marker == "<|start|>" else self.header + "<|channel|>"
            return "", ""
        if marker == "<|message|>":
            # the channel is the header's part after <|channel|> up to any " to=..." / "<|constrain|>" addition
            channel = self.header.rpartition("<|channel|>")[2] if "<|channel|>" in self.header else ""
            self.channel = channel.split()[0] if channel.split() else ""
            self.state = "body"
            return "", ""
        if marker == "<|end|>":
            self.state = "idle"
            return "", ""
        if self.state == "header":
            self.header += text
            return "", ""
        if self.state == "idle" and not text.strip():
            return "", ""
        return self._take(self.state == "body" and self.channel in REASONING_CHANNELS, text)
