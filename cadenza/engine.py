"""Prefill, then decode with the KV cache: the one token generator that the API, the CLI (and later chat, the
server and the bench) consume. Nothing else re-implements the decode loop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from cadenza.tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0  # prompt forward pass, first token included
    decode_s: float = 0.0  # every later token

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes out of prefill; decode speed counts the ones after it
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": round(self.prefill_s, 6),
            "decode_s": round(self.decode_s, 6),
            "prefill_tok_s": round(self.prefill_tok_s, 3),
            "decode_tok_s": round(self.decode_tok_s, 3),
        }

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok, prefill {self.prefill_tok_s:.1f} tok/s | "
            f"generated {self.generated_tokens} tok, decode {self.decode_tok_s:.2f} tok/s"
        )


@dataclass
class Step:
    """One generated token: its id, the text it made final, and, on the last step, why generation ended."""

    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last step


@dataclass
class Generation:
    """A request's result, filled while its steps are consumed."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        device: torch.device,
        dtype: torch.dtype,
        max_context: int,
        eos_token_ids: set[int],
    ):
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype = device, dtype
        self.max_context = max_context
        self.eos_token_ids = eos_token_ids

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise CadenzaError("The prompt is empty (0 tokens). Give a prompt of at least one token.")
        if len(prompt_ids) >= self.max_context:
            raise CadenzaError(
                f"The prompt has {len(prompt_ids)} tokens, but the model's context is {self.max_context} tokens and "
                "generation needs room for at least one more. Shorten the prompt."
            )
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise CadenzaError(
                f"Prompt token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1}). Pass ids made by "
                "this model's tokenizer."
            )

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """One teacher-forced forward pass: float32 logits [len(token_ids), V] on the CPU."""
        self.check_prompt(token_ids[:-1] or token_ids)
        cache = self.model.new_cache(len(token_ids), self.dtype, self.device)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self.model(ids, cache)[0].float().cpu()

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: SamplingParams, gen: Generation | None = None) -> Iterator[Step]:
        """Yields one Step per generated token; `gen` (if given) collects ids, text, finish reason and stats."""
        self.check_prompt(prompt_ids)
        gen = gen or Generation(list(prompt_ids))
        stats = gen.stats
        stats.prompt_tokens = len(prompt_ids)
        sampler = Sampler(params)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        budget = min(params.max_tokens, self.max_context - len(prompt_ids))
        detok = self.tokenizer.detokenizer()
        cache = self.model.new_cache(min(self.max_context, len(prompt_ids) + budget), self.dtype, self.device)

        t0 = time.perf_counter()
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        logits = self.model(ids, cache, last_only=True)[0, -1]
        token = sampler(logits)
        stats.prefill_s = time.perf_counter() - t0
        t_decode = time.perf_counter()
        while True:
            gen.token_ids.append(token)
            stats.generated_tokens += 1
            finish = None
            if token in stop_ids:
                finish = "stop"
            elif stats.generated_tokens >= budget:
                finish = "length"
            text = "" if token in stop_ids else detok.add(token)
            if finish is not None:
                text += detok.flush()
            gen.text += text
            if finish is not None:
                gen.finish_reason = finish
                stats.decode_s = time.perf_counter() - t_decode
                yield Step(token, text, finish)
                return
            yield Step(token, text)
            ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
            logits = self.model(ids, cache, last_only=True)[0, -1]
            token = sampler(logits)
