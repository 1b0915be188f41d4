"""OpenAI response bodies and stream chunks for /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from cadenza.generation import Step
from cadenza.scoring import TokenScore
from cadenza.server.protocol import Parsed
from cadenza.text.reasoning import ReasoningSplitter
from cadenza.text.token_text import TokenText

__all__ = ["Output", "Responder", "TokenText"]


@dataclass
class Output:
    """One sequence's result, gathered from its Steps."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    token_chars: int = 0  # streamed completions with logprobs: characters of the tokens' own texts so far
    # chat answers of a format that marks reasoning: `text` is the answer, `reasoning` the rest; `last` the latest
    # step's (reasoning, answer) pieces
    splitter: ReasoningSplitter | None = None
    reasoning: str = ""
    last: tuple[str, str] = ("", "")
    prompt_logprobs: list[TokenScore | None] | None = None  # the prompt's scores (from the first step)

    def add(self, step: Step) -> None:
        if step.prompt_logprobs is not None:
            self.prompt_logprobs = step.prompt_logprobs
        if not step.has_token:  # max_tokens 0: the prompt was scored, nothing generated
            self.finish_reason = step.finish_reason
            return
        if self.splitter is not None:
            self.last = self.splitter.add(step.token_id, step.text)
            self.reasoning += self.last[0]
            self.text += self.last[1]
        else:
            self.last = ("", step.text)
            self.text += step.text
        self.token_ids.append(step.token_id)
        if step.logprob is not None:
            self.logprobs.append(step.logprob)
            self.top_logprobs.append(step.top_logprobs or [])
        if step.finish_reason is not None:
            self.finish_reason = step.finish_reason


class Responder:
    """Formats one request's answer: the whole body, or its stream chunks."""

    def __init__(self, parsed: Parsed, chat: bool, texts: TokenText, fingerprint: str):
        self.parsed, self.chat, self.texts = parsed, chat, texts
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.fingerprint = fingerprint
        self.object = "chat.completion" if chat else "text_completion"
        # chat answers split off their reasoning where the format marks it: each sequence gets a fresh splitter
        self._splitter = ReasoningSplitter.for_tokenizer(texts.tokenizer) if chat else None
        self.reasoning = self._splitter is not None

    def output(self, prompt_ids: list[int]) -> Output:
        """An empty result for one sequence answering `prompt_ids` (a prompt that opens a think tag starts its
        answer in the reasoning)."""
        return Output(splitter=self._splitter.fresh(prompt_ids) if self._splitter is not None else None)

    def _head(self, chunk: bool) -> dict:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.parsed.model}
        return {**head, "system_fingerprint": self.fingerprint}

    def usage(self, outputs: list[Output]) -> dict:
        prompt = sum(len(p) for p in self.parsed.prompts)  # each prompt once, whatever n is
        completion = sum(len(o.token_ids) for o in outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # --- log-probabilities ----------------------------------------------------------------------------------------

    def _entry(self, token_id: int, logprob: float) -> dict:
        token = self.texts.text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    def chat_logprobs(self, token_ids, logprobs, tops) -> dict:
        content = [
            {**self._entry(t, lp), "top_logprobs": [self._entry(a, alp) for a, alp in top]}
            for t, lp, top in zip(token_ids, logprobs, tops, strict=True)
        ]
        return {"content": content, "refusal": None}

    def completion_logprobs(self, token_ids, logprobs, tops, offset: int) -> dict:
        """The legacy format; text_offset counts characters of the choice's text before each token. A None in
        logprobs / tops (the first prompt token, with echo) stays null."""
        tokens = [self.texts.text(t) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        top = None
        if self.parsed.logprobs:
            top = [None if alts is None else self._top_dict(alts) for alts in tops]
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}

    def _top_dict(self, alts) -> dict[str, float]:
        """{token text: log-prob}, most likely first; of two ids with the same text the likelier one's value."""
        top: dict[str, float] = {}
        for a, alp in alts:
            top.setdefault(self.texts.text(a), alp)
        return top

    def _echoed_logprobs(self, prompt_ids: list[int], out: Output) -> dict:
        """echo + logprobs (vLLM's answer): the prompt's tokens first (the first one's log-prob and alternatives
        null; the others' alternatives the top N and the token itself), then the generated ones."""
        k = self.parsed.logprobs
        lps, tops = [], []
        for t, score in zip(prompt_ids, out.prompt_logprobs, strict=True):
            lps.append(None if score is None else score.logprob)
            tops.append(None if score is None else [*score.top[:k], (t, score.logprob)])
        return self.completion_logprobs([*prompt_ids, *out.token_ids], lps + out.logprobs, tops + out.top_logprobs, 0)

    def prompt_logprobs(self, prompt_ids: list[int], scores: list[TokenScore | None]) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token null (the first) or {token id: {logprob, rank, decoded_token}}
        for the top N alternatives and the token itself."""
        k, rows = self.parsed.prompt_logprobs, []
        for t, score in zip(prompt_ids, scores, strict=True):
            if score is None:
                rows.append(None)
                continue
            row = {str(t): self._vllm_entry(t, score.logprob, score.rank)}
            for rank, (a, alp) in enumerate(score.top[:k], start=1):
                row.setdefault(str(a), self._vllm_entry(a, alp, rank))
            rows.append(row)
        return rows

    def _vllm_entry(self, token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": self.texts.text(token_id)}

    # --- whole answers --------------------------------------------------------------------------------------------

    def body(self, outputs: list[Output]) -> dict:
        choices = []
        for i, out in enumerate(outputs):
            lp = None
            prompt_ids = self.parsed.prompts[i // self.parsed.n]
            if self.parsed.logprobs is not None:
                if self.chat:
                    lp = self.chat_logprobs(out.token_ids, out.logprobs, out.top_logprobs)
                elif self.parsed.echo_logprobs:
                    lp = self._echoed_logprobs(prompt_ids, out)
                else:
                    lp = self.completion_logprobs(out.token_ids, out.logprobs, out.top_logprobs, 0)
            if self.chat:
                message = {"role": "assistant", "content": out.text, "refusal": None}
                if self.reasoning:  # vLLM's and DeepSeek's field for the reasoning text
                    message["reasoning_content"] = out.reasoning
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": out.finish_reason})
            else:
                text = (self.parsed.echo[i // self.parsed.n] if self.parsed.echo else "") + out.text
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}
                if self.parsed.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self.prompt_logprobs(prompt_ids, out.prompt_logprobs)
                choices.append(choice)
        return {**self._head(False), "choices": choices, "usage": self.usage(outputs)}

    # --- stream chunks (server-sent events) -----------------------------------------------------------------------

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        data = {**self._head(True), "choices": choices}
        if self.parsed.include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def opening(self) -> list[str]:
        """Chunks sent before any token: the assistant role (chat), the echoed prompt (completions with echo)."""
        n = len(self.parsed.params)
        if self.chat:
            delta = {"role": "assistant", "content": ""}
            return [
                self._chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]) for i in range(n)
            ]
        if self.parsed.echo and not self._scores_first:
            return [
                self._chunk(
                    [
                        {
                            "index": i,
                            "text": self.parsed.echo[i // self.parsed.n],
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
                for i in range(n)
            ]
        return []

    def step_chunks(self, index: int, step: Step, out: Output) -> list[str]:
        """The chunks for one token: its text (if any became final, or if logprobs are asked for), and the finish
        reason on the last one. `out` already holds the step."""
        chunks = []
        if step.prompt_logprobs is not None and self._scores_first:
            chunks.append(self._prompt_chunk(index, out))
        want_lp = self.parsed.logprobs is not None and step.has_token
        lp = None
        if want_lp:
            top = [step.top_logprobs or []]
            lp = (
                self.chat_logprobs([step.token_id], [step.logprob], top)
                if self.chat
                else self.completion_logprobs([step.token_id], [step.logprob], top, out.token_chars)
            )
            if not self.chat:
                out.token_chars += len(lp["tokens"][0])
        if self.chat:
            reasoning, answer = out.last
            if reasoning:
                delta, rlp = {"reasoning_content": reasoning}, None if answer else lp
                chunks.append(self._chunk([{"index": index, "delta": delta, "logprobs": rlp, "finish_reason": None}]))
            if answer or (want_lp and not reasoning):
                delta = {"content": answer}
                chunks.append(self._chunk([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": None}]))
            if step.finish_reason is not None:
                chunks.append(
                    self._chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": step.finish_reason}])
                )
        elif step.text or want_lp or step.finish_reason is not None:
            choice = {"index": index, "text": step.text, "logprobs": lp, "finish_reason": step.finish_reason}
            chunks.append(self._chunk([choice]))
        return chunks

    @property
    def _scores_first(self) -> bool:
        """A completions stream whose first chunk carries the prompt's log-probs (and the echo with them)."""
        return not self.chat and (self.parsed.echo_logprobs or self.parsed.prompt_logprobs is not None)

    def _prompt_chunk(self, index: int, out: Output) -> str:
        """A stream's first chunk when the prompt was scored (it waits for the prefill): the echoed prompt with its
        log-probs (echo + logprobs) and vLLM's prompt_logprobs, as the whole answer has them."""
        prompt_ids = self.parsed.prompts[index // self.parsed.n]
        choice = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
        if self.parsed.echo:
            choice["text"] = self.parsed.echo[index // self.parsed.n]
        if self.parsed.echo_logprobs:
            choice["logprobs"] = self._echoed_logprobs(prompt_ids, Output(prompt_logprobs=out.prompt_logprobs))
            out.token_chars = sum(len(t) for t in choice["logprobs"]["tokens"])
        if self.parsed.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self.prompt_logprobs(prompt_ids, out.prompt_logprobs)
        return self._chunk([choice])

    def usage_chunk(self, outputs: list[Output]) -> str:
        return self._chunk([], self.usage(outputs))

    @staticmethod
    def error_event(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
