"""Prompt log-probabilities from teacher-forced logits: what a model thinks of text it did not generate.

One helper, `prompt_scores`, turns the logits of a forward pass over token ids into, for each token after the
first, its log-probability under the model given the tokens before it, its rank and the most likely alternatives.
Everything is computed in float32 (log_softmax of the logits), so the server's prompt log-probs, `LLM.prompt_logprobs`
and `cadenza perplexity` agree with each other and with `LLM.score`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS = 512  # positions per log_softmax in prompt_scores


@dataclass
class TokenScore:
    """One prompt token: its log-probability given the tokens before it, its rank among the vocabulary (1: the
    most likely; 1 + the number of tokens more likely than it) and the `top` most likely tokens there."""

    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token id, log-prob), most likely first


def prompt_scores(logits: torch.Tensor, token_ids: list[int], top: int = 0) -> list[TokenScore | None]:
    """logits [len(token_ids), V] of a teacher-forced pass (row i predicts token i + 1) -> one entry per token:
    None for the first (nothing predicts it), then each token's TokenScore. Rows go through log_softmax in float32
    ROWS at a time, so a long prompt's scores need no second [T, V] float32 copy at once."""
    out: list[TokenScore | None] = [None] * min(1, len(token_ids))
    for start in range(0, len(token_ids) - 1, ROWS):
        end = min(start + ROWS, len(token_ids) - 1)
        logprobs = torch.log_softmax(logits[start:end].float(), dim=-1)
        actual = torch.tensor(token_ids[start + 1 : end + 1], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(1, actual[:, None])  # [rows, 1]
        ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
        if top > 0:
            best = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)  # sorted, most likely first
            pairs = zip(best.indices.tolist(), best.values.tolist(), strict=True)
            tops = [list(zip(i, v, strict=True)) for i, v in pairs]
        else:
            tops = [[] for _ in ranks]
        out += [TokenScore(lp, r, t) for lp, r, t in zip(chosen[:, 0].tolist(), ranks, tops, strict=True)]
    return out


@dataclass
class PromptLogprobs:
    """What `LLM.prompt_logprobs` returns: per token of the prompt, its log-probability given the tokens before
    it (None for the first token), its rank (1: the model's most likely token) and the `top` most likely
    alternatives; with a tokenizer also the tokens' texts."""

    token_ids: list[int]
    logprobs: list[float | None]
    ranks: list[int | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    tokens: list[str] | None = None  # each token's own text
    top_tokens: list[list[str] | None] | None = None  # the texts of top_logprobs' ids

    @classmethod
    def of(cls, token_ids: list[int], scores: list[TokenScore | None], texts=None) -> PromptLogprobs:
        """From prompt_scores' list; texts: a TokenText (None: ids only)."""
        tops = [None if s is None else s.top for s in scores]
        return cls(
            list(token_ids),
            [None if s is None else s.logprob for s in scores],
            [None if s is None else s.rank for s in scores],
            tops,
            None if texts is None else [texts.text(t) for t in token_ids],
            None if texts is None else [None if row is None else [texts.text(t) for t, _ in row] for row in tops],
        )

    @property
    def total(self) -> float:
        """The sum of the log-probabilities (the first token's excluded): log P(tokens[1:] | tokens[0])."""
        return sum(lp for lp in self.logprobs if lp is not None)

    def as_dict(self) -> dict:
        out = {"token_ids": self.token_ids, "logprobs": self.logprobs, "ranks": self.ranks}
        if self.tokens is not None:
            out["tokens"] = self.tokens
        if any(self.top_logprobs[1:]):  # per alternative: [id, log-prob, its text] ([id, log-prob] without one)
            rows = []
            for i, row in enumerate(self.top_logprobs):
                names = self.top_tokens[i] if self.top_tokens is not None else None
                rows.append(
                    None if row is None else [[t, lp, names[j]] if names else [t, lp] for j, (t, lp) in enumerate(row)]
                )
            out["top_logprobs"] = rows
        return out


def kl_and_agreement(base: torch.Tensor, logprobs: torch.Tensor) -> tuple[list[float], list[bool]]:
    """Per row of two models' log-probs [n, V] of the same positions: KL(base || this) = sum_v p_base (log p_base -
    log p_this), summed in float64 (what llama.cpp's `llama-perplexity --kl-divergence` reports), and whether both
    put the same token first."""
    terms = base.exp().double() * (base.double() - logprobs.double())
    kl = terms.sum(dim=-1).clamp_min(0).tolist()
    return kl, (base.argmax(dim=-1) == logprobs.argmax(dim=-1)).tolist()
