"""Beam search as transformers defines it (`generate(num_beams=k, do_sample=False)`), on the slot cache.

The k beams are the rows of one batch: every step feeds their k last tokens through the model together (so a
routed expert's weights are read once for all beams), then keeps the best continuations and copies the cache rows
of the surviving parents into place (`Cache.reorder`), without recomputing anything.

Definitions (those of transformers' beam search, which the tests compare against):
- a beam's score is the sum of its tokens' log-probabilities; each step considers the best
  `max(2, 1 + number of end ids) * k` continuations over all beams;
- a continuation that ends (an end id, or the length limit) and ranks among the first k of them becomes a
  finished hypothesis with score sum / generated_length ** length_penalty; the k best hypotheses are kept;
- the k best continuations that did not end run on;
- early_stopping=True stops once k hypotheses are finished; False stops when the best running beam, scored at
  its current length, can no longer beat the worst finished hypothesis; "never" scores it at the longest length
  allowed when length_penalty > 0 (the canonical search).

With SamplingParams.logprobs, each beam carries its tokens' log-probabilities (the model's raw log_softmax, as
sampling reports them: beam search processes no logits) and, with top_logprobs, the most likely alternatives at
each of its positions; the returned (best) beam's become the Generation's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from cadenza.generation import Generation
from cadenza.sampling import SamplingParams

if TYPE_CHECKING:
    from cadenza.engine import Engine

NEG = -1.0e9  # the score of "not a candidate"


def run_beam_search(engine: Engine, prompt_ids: list[int], params: SamplingParams, gen: Generation | None = None):
    engine.check_prompt(prompt_ids)
    gen = gen if gen is not None else Generation(list(prompt_ids))
    stats = gen.stats
    stats.prompt_tokens = len(prompt_ids)
    k, lp_exp, early = params.num_beams, params.length_penalty, params.early_stopping
    end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else engine.eos_token_ids)
    budget = min(params.max_tokens, engine.max_context - len(prompt_ids))
    keep = max(2, 1 + len(end_ids)) * k
    first_k = torch.arange(keep) < k  # the candidates that may become finished hypotheses
    rows = list(range(k))

    counters = engine.orchestra.counters if engine.orchestra is not None else None
    at_start = counters.snapshot() if counters else None
    t0 = time.perf_counter()
    cache = engine.cache_for(k, len(prompt_ids) + budget)
    logits = engine.forward(prompt_ids, cache, last_only=True, rows=[0])[-1:].expand(k, -1)
    cache.reorder(rows[1:], [0] * (k - 1))  # every beam starts from the prompt
    stats.prefill_s = time.perf_counter() - t0
    t_decode = time.perf_counter()
    at_decode = counters.snapshot() if counters else None

    running = [[] for _ in range(k)]  # generated tokens per beam
    # per beam, per generated token: its log-prob and the top alternatives (empty lists when not asked for)
    n_top = params.top_logprobs if params.logprobs else 0
    running_lp: list[list[tuple[float, list]]] = [[] for _ in range(k)]
    finished_lp: list[list[tuple[float, list]]] = [[] for _ in range(k)]
    running_scores = torch.full((k,), NEG)
    running_scores[0] = 0.0  # only the first beam's continuations count at the first step (they are all equal)
    finished: list[list[int]] = [[] for _ in range(k)]
    finished_scores = torch.full((k,), NEG)
    finished_done = torch.zeros(k, dtype=torch.bool)
    improvable = True
    steps = 0
    while True:
        steps += 1
        vocab = logits.shape[-1]
        token_lps = torch.log_softmax(logits.float().cpu(), dim=-1)
        scores = token_lps + running_scores[:, None]
        top_scores, top_idx = torch.topk(scores.reshape(-1), keep)
        parents, tokens = (top_idx // vocab).tolist(), (top_idx % vocab).tolist()
        if params.logprobs:
            chosen = token_lps[top_idx // vocab, top_idx % vocab].tolist()
            alts = [[] for _ in range(k)]
            if n_top:
                best_alts = torch.topk(token_lps, min(n_top, vocab), dim=-1)
                alts = [list(zip(i, v, strict=True)) for i, v in zip(*_lists(best_alts), strict=True)]
            grown = [running_lp[parents[i]] + [(chosen[i], alts[parents[i]])] for i in range(keep)]
        else:
            grown = [[] for _ in range(keep)]
        ends = torch.tensor([t in end_ids or steps >= budget for t in tokens])

        # the best continuations that go on
        go_on = torch.topk(top_scores + ends.float() * NEG, k).indices.tolist()
        new_running = [running[parents[i]] + [tokens[i]] for i in go_on]
        new_running_lp = [grown[i] for i in go_on]
        running_scores = top_scores[go_on] + ends[go_on].float() * NEG

        # the finished hypotheses, if ending continuations beat them
        cand = top_scores / (steps**lp_exp)
        if bool(finished_done.all()) and early is True:
            cand = cand + NEG
        if not improvable:
            cand = cand + NEG
        cand = cand + (~(ends & first_k)).float() * NEG
        merged_scores = torch.cat((finished_scores, cand))
        merged = finished + [running[parents[i]] + [tokens[i]] for i in range(keep)]
        merged_lp = finished_lp + grown
        merged_done = torch.cat((finished_done, ends & first_k))
        best = torch.topk(merged_scores, k).indices.tolist()
        finished = [merged[i] for i in best]
        finished_lp = [merged_lp[i] for i in best]
        finished_scores, finished_done = merged_scores[best], merged_done[best]

        # can a running beam still beat the finished ones?
        length = budget if early == "never" and lp_exp > 0.0 else steps
        best_possible = running_scores[0] / (length**lp_exp)
        worst = float(finished_scores.min()) if bool(finished_done.all()) else NEG
        improvable = improvable and bool(best_possible > worst)
        all_done_early = bool(finished_done.all()) and early is True
        if not improvable or all_done_early or bool(ends.all()):
            break
        cache.reorder(rows, [parents[i] for i in go_on])
        running, running_lp = new_running, new_running_lp
        logits = engine.decode([b[-1] for b in running], cache, rows)

    best_tokens = finished[0]
    gen.token_ids = list(best_tokens)
    gen.cumulative_logprob = float(finished_scores[0])
    if params.logprobs:
        gen.logprobs = [lp for lp, _ in finished_lp[0]]
        gen.top_logprobs = [alts for _, alts in finished_lp[0]] if n_top else None
    ended_by_id = bool(best_tokens) and best_tokens[-1] in end_ids
    gen.finish_reason = "stop" if ended_by_id else "length"
    if engine.tokenizer is not None:
        gen.text = engine.tokenizer.decode(best_tokens[:-1] if ended_by_id else best_tokens)
    stats.generated_tokens = len(best_tokens)
    stats.decode_s = time.perf_counter() - t_decode
    if counters:
        engine.expert_stats(stats, at_start, at_decode, counters.snapshot())
    return gen


def _lists(top) -> tuple[list[list[int]], list[list[float]]]:
    """torch.topk's (values, indices) over [k, n] -> (indices, values) as nested lists."""
    return top.indices.tolist(), top.values.tolist()
