"""What a request produces: its tokens and text (`Generation`), one token at a time (`Step`), and the speed and
expert-placement figures (`GenerationStats`). Apart from the engine so beam search, which fills a Generation too,
needs no import of the engine at run time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cadenza.scoring import TokenScore

NO_TOKEN = -1  # a step without a token: max_tokens 0 (the prompt scored only)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0  # prompt forward pass, first token included
    decode_s: float = 0.0  # every later token
    # where routed-expert work went (offloaded runs): (token, expert) pairs on GPU-resident experts, on the CPU,
    # and on fetched experts, over the request's lifetime (sequences decoding together share their steps' work)
    expert_work: dict[str, int] | None = None
    decode_host_bytes: int | None = None  # expert weights read from host memory during decode (CPU or fetched)
    decode_gpu_bytes: int | None = None  # expert weights read from GPU memory during decode
    decode_syncs: int | None = None  # GPU->host synchronisations during decode
    # decode seconds spent: waiting in those synchronisations, computing CPU experts (worker), waiting for the
    # worker after queueing the GPU's share
    decode_breakdown: dict[str, float] | None = None
    # the fetch slot cache over the request: hits, misses, hit rate, and the speculative prefetch's precision
    # (guessed experts that were used) and recall (needed non-resident experts that were guessed)
    fetch_cache: dict[str, float | int | None] | None = None

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
            "expert_work": self.expert_work,
            "decode_host_bytes": self.decode_host_bytes,
            "decode_gpu_bytes": self.decode_gpu_bytes,
            "decode_syncs": self.decode_syncs,
            "decode_breakdown": self.decode_breakdown,
            "fetch_cache": self.fetch_cache,
        }

    def summary(self) -> str:
        text = (
            f"prompt {self.prompt_tokens} tok, prefill {self.prefill_tok_s:.1f} tok/s | "
            f"generated {self.generated_tokens} tok, decode {self.decode_tok_s:.2f} tok/s"
        )
        if self.expert_work:
            total = sum(self.expert_work.values()) or 1
            text += " | experts " + ", ".join(f"{k} {v / total:.0%}" for k, v in self.expert_work.items())
        return text


@dataclass
class Step:
    """One generated token: its id, the text it made final, and, on the last step, why generation ended.
    With SamplingParams.prompt_logprobs the first step carries the prompt's scores; with max_tokens 0 that step
    is the only one and has no token (token_id -1, NO_TOKEN)."""

    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last step
    logprob: float | None = None  # the token's log-probability under the model (SamplingParams.logprobs)
    top_logprobs: list[tuple[int, float]] | None = None  # the N most likely tokens and theirs (top_logprobs)
    prompt_logprobs: list[TokenScore | None] | None = None  # per prompt token (None for the first)

    @property
    def has_token(self) -> bool:
        return self.token_id != NO_TOKEN


@dataclass
class Generation:
    """A request's result, filled while its steps are consumed."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[float] | None = None  # per generated token, when asked for
    top_logprobs: list[list[tuple[int, float]]] | None = None
    cumulative_logprob: float | None = None  # beam search: the best beam's length-penalised score
    prompt_logprobs: list[TokenScore | None] | None = None  # SamplingParams.prompt_logprobs


__all__ = ["NO_TOKEN", "Generation", "GenerationStats", "Step"]
