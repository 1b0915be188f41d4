"""SamplingParams and the sampler that turns one step's logits into a token id."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cadenza.errors import CadenzaError


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off; the same seed gives the same output.
    Generation stops at an end-of-sequence id (config.json / generation_config.json), at any of
    `stop_token_ids`, or after `max_tokens` tokens.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(what: str, fix: str) -> CadenzaError:
            return CadenzaError(f"Invalid sampling parameter: {what}. {fix}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad(f"max_tokens={self.max_tokens!r}", "Use a whole number of at least 1.")
        if not _is_number(self.temperature) or self.temperature < 0 or not math.isfinite(self.temperature):
            raise bad(f"temperature={self.temperature!r}", "Use 0 for greedy decoding or a positive number.")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad(f"top_p={self.top_p!r}", "Use a number in (0, 1]; 1 keeps every token.")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise bad(f"top_k={self.top_k!r}", "Use 0 (off) or a positive whole number.")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise bad(f"seed={self.seed!r}", "Use a non-negative whole number, or leave it unset.")
        ids = self.stop_token_ids
        if not isinstance(ids, list | tuple) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise bad(f"stop_token_ids={ids!r}", "Use a list of non-negative token ids.")
        self.stop_token_ids = list(ids)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


class Sampler:
    """One per request: holds the request's random generator so a seed reproduces the whole output."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] float32 -> a token id."""
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits.float().cpu() / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the tokens ranked above it already cover top_p (the first always stays)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
