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
    # where routed-expert work went (offloaded runs): (token, expert) pairs on GPU-resident experts, on the CPU,
    # and on fetched experts, over the whole request
    expert_work: dict[str, int] | None = None
    decode_host_bytes: int | None = None  # expert weights read from host memory during decode (CPU or fetched)
    decode_gpu_bytes: int | None = None  # expert weights read from GPU memory during decode
    decode_syncs: int | None = None  # GPU->host synchronisations during decode
    # decode seconds spent: waiting in those synchronisations, computing CPU experts (worker), waiting for the
    # worker after queueing the GPU's share
    decode_breakdown: dict[str, float] | None = None

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
        orchestra=None,
        prefill_chunk: int = 2048,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype = device, dtype
        self.max_context = max_context
        self.eos_token_ids = eos_token_ids
        self.orchestra = orchestra  # cadenza.moe.scheduler.Orchestra when experts are offloaded
        self.prefill_chunk = prefill_chunk  # bounds the activation workspace of long prompts
        self._cache = None

    def new_cache(self, length: int):
        """A KV cache for `length` tokens. On a GPU the one cache of the whole context is allocated once and
        reused: it is part of what the placement budgeted."""
        if self.device.type != "cuda":
            return self.model.new_cache(length, self.dtype, self.device)
        if self._cache is None:
            self._cache = self.model.new_cache(self.max_context, self.dtype, self.device).reserve()
        self._cache.reset()
        return self._cache

    def forward(self, token_ids: list[int], cache, last_only: bool) -> torch.Tensor:
        """Runs tokens through the model in chunks of at most `prefill_chunk` -> logits [T or 1, V]."""
        out = []
        for i in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[i : i + self.prefill_chunk]
            last = i + self.prefill_chunk >= len(token_ids)
            ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
            logits = self.model(ids, cache, last_only=last_only)[0]
            if not last_only or last:
                out.append(logits)
        return out[0] if len(out) == 1 else torch.cat(out)

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
        if len(token_ids) > self.max_context:
            raise CadenzaError(
                f"{len(token_ids)} tokens do not fit the context of {self.max_context} tokens. Score fewer tokens, "
                "or raise max_context."
            )
        return self.forward(token_ids, self.new_cache(len(token_ids)), last_only=False).float().cpu()

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
        detok = self.tokenizer.detokenizer() if self.tokenizer is not None else None  # None: ids only (bench)
        cache = self.new_cache(min(self.max_context, len(prompt_ids) + budget))
        counters = self.orchestra.counters if self.orchestra is not None else None
        at_start = counters.snapshot() if counters else None

        t0 = time.perf_counter()
        logits = self.forward(prompt_ids, cache, last_only=True)[-1]
        token = sampler(logits)
        stats.prefill_s = time.perf_counter() - t0
        t_decode = time.perf_counter()
        at_decode = counters.snapshot() if counters else None
        while True:
            gen.token_ids.append(token)
            stats.generated_tokens += 1
            finish = None
            if token in stop_ids:
                finish = "stop"
            elif stats.generated_tokens >= budget:
                finish = "length"
            text = "" if token in stop_ids or detok is None else detok.add(token)
            if finish is not None:
                text += detok.flush() if detok is not None else ""
            gen.text += text
            if finish is not None:
                gen.finish_reason = finish
                stats.decode_s = time.perf_counter() - t_decode
                if counters:
                    self._expert_stats(stats, at_start, at_decode, counters.snapshot())
                yield Step(token, text, finish)
                return
            yield Step(token, text)
            ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
            logits = self.model(ids, cache, last_only=True)[0, -1]
            token = sampler(logits)

    @staticmethod
    def _expert_stats(stats: GenerationStats, start, decode_start, end) -> None:
        whole, decode = end.minus(start), end.minus(decode_start)
        stats.expert_work = {"gpu": whole.gpu, "cpu": whole.cpu, "fetched": whole.fetched}
        stats.decode_host_bytes = decode.host_bytes
        stats.decode_gpu_bytes = decode.gpu_bytes
        stats.decode_syncs = decode.syncs
        stats.decode_breakdown = {
            "sync_wait_s": round(decode.sync_wait_s, 6),
            "cpu_experts_s": round(decode.cpu_busy_s, 6),
            "cpu_wait_s": round(decode.cpu_wait_s, 6),
        }
