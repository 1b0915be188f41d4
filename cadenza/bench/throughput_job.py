"""T1 / T2 (issue #22): an offline job's tokens per second, the way `cadenza batch` runs it. N prompts of P random
tokens each generate M tokens (greedy, no early stop) through `generate(..., mode="throughput")`, with the KV cache
on the GPU and in host memory (attention on the CPU), each at the batch the throughput plan chooses for
the budget (`cadenza.moe.offload.throughput.plan_for`); the row's `throughput_tok_s` is generated tokens over the
whole job's wall time, prefill included.

Roofline of one decode step of B sequences (the issue's): the non-resident experts' bytes over the link once (those
of the run's own placement that B tokens want, `throughput.link_bytes`: the plan's batch may exceed the job) plus,
with the cache on the host, the CPU reading every sequence's cache once at its mean length (P + M / 2), at this
machine's measured link and DRAM rates; `roofline_tok_s` = B / that time and `roofline_fraction` = throughput_tok_s
/ roofline_tok_s. The GPU's own work is outside it (the roofline is the data
movement alone), so a compute-bound run shows as a low fraction. The host cache runs twice: its CPU attention after
the GPU's work, and in two micro-batches that overlap them (`micro_batches`).

The issue's baseline, "cadenza's own batched generate with --max-batch as large as the budget allows", is its own
row (`--runs batched`, `generate_mode` "together"): the latency mode's `generate(list)` (what `cadenza generate` and
the server run), KV cache on the GPU, at the GPU-cache plan's batch."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch

from cadenza.bench.scenarios import random_prompt
from cadenza.bench.timeline import TIMELINE_SUFFIX
from cadenza.errors import CadenzaError
from cadenza.moe.placement import GiB

T_BUDGET_GIB = {"T1": 24, "T2": 8}
T_PROMPTS, T_PROMPT_TOKENS, T_NEW_TOKENS = 1024, 128, 128
# (KV cache place, micro-batches, generate mode): the GPU cache (the batch the budget allows), the host cache, the
# host cache with two micro-batches overlapping one's CPU attention with the other's GPU work, and the latency mode's
# batched generate at the GPU cache's batch (the baseline)
RUN_NAMES = {
    "gpu": ("gpu", 1, "throughput"),
    "host": ("host", 1, "throughput"),
    "host2": ("host", 2, "throughput"),
    "batched": ("gpu", 1, "together"),
}  # --runs
RUNS = tuple(RUN_NAMES.values())


def parse_runs(text: str | None) -> tuple[tuple[str, int, str], ...]:
    """--runs gpu,host,host2,batched (a subset, in that order; "none": only a peer) -> (KV cache place,
    micro-batches, generate mode)s."""
    if text is None:
        return RUNS
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in RUN_NAMES]
    if bad or not names:
        raise CadenzaError(
            f"--runs {text!r}: use some of {', '.join(RUN_NAMES)} (comma-separated), or none to run only the peer."
        )
    return tuple(RUN_NAMES[n] for n in RUN_NAMES if n in names)


TIMELINE_STEPS = 3
TIMELINE_ROWS = 512  # sequences in a run's timeline: its batch, up to this (the prefill is not recorded; T1: ~15 s)


def ramp_steps(rows: int, prompt: int, chunk: int) -> int:
    """Mixed steps before `rows` prompts of `prompt` tokens all run, each pass holding at most `chunk` tokens
    (cadenza.batch's Batch with mix: a first pass prefills alone, then each step's decode rows leave the rest of
    the chunk to the next prompts)."""
    admitted, steps = min(rows, chunk // prompt), 0
    while admitted < rows:
        more = (chunk - admitted) // prompt
        if more < 1:  # a chunk full of decode rows: the rest are prefilled in passes of their own
            break
        admitted, steps = min(rows, admitted + more), steps + 1
    return steps


def job_prompts(n: int, tokens: int, vocab: int, seed: int) -> list[list[int]]:
    return [random_prompt(tokens, vocab, seed * 100_003 + i) for i in range(n)]


def roofline(link: float, h2d: float, batch: int, mean_context: float, kv_per_token: int, kv_host: bool,
             machine: dict) -> dict:  # fmt: skip
    """The step's data movement (`link` bytes over the link, the host cache's reads) at this machine's measured
    rates (h2d: the link's where the machine's was not measured; module doc)."""
    h2d = machine.get("pinned_h2d_gb_s") or h2d
    dram = machine.get("dram_read_gb_s") or 0.0
    link_s = link / (h2d * 1e9)
    kv_bytes = batch * mean_context * kv_per_token if kv_host else 0.0
    kv_s = kv_bytes / (dram * 1e9) if kv_host and dram > 0 else 0.0
    step = link_s + kv_s
    return {
        "roofline_step_s": step,
        "roofline_link_s": link_s,
        "roofline_kv_read_s": kv_s,
        "roofline_tok_s": batch / step if step > 0 else None,
    }


def run_job(
    llm, scenario: str, prompts: list[list[int]], new_tokens: int, budget_bytes: int, machine: dict, add, log,
    timeline: Path | None = None, runs: tuple[tuple[str, int, str], ...] = RUNS,
):  # fmt: skip
    """Measures the job for each of `runs` (KV cache place, micro-batches, generate mode); one row each, handed to
    `add`.
    timeline: where each run's timeline of TIMELINE_STEPS decode steps goes (JSON and PNG, -<run> added to its name;
    cadenza.bench.timeline), or None."""
    from cadenza.moe.offload.throughput import link_bytes, plan_for
    from cadenza.sampling import SamplingParams

    n, p = len(prompts), len(prompts[0])
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    kv_per_token = llm.sizes.kv_bytes_per_token
    for kv, micro, mode in runs:
        row = {
            "scenario": scenario,
            "system": "cadenza",
            "generate_mode": mode,
            "kv_cache": kv,
            "micro_batches": micro,
            "prompts": n,
            "prompt_tokens": p,
            "new_tokens": new_tokens,
            "prefill_chunk": llm.prefill_chunk,
            "gpu_budget_gib": round(budget_bytes / GiB, 2),
        }
        kw = dict(gpu_memory=budget_bytes, offload_policy="auto", kv_cache=kv, micro_batches=micro)
        try:
            plan = plan_for(llm, p, new_tokens, kv, budget_bytes, machine.get("dram_read_gb_s") or 0.0, micro, n)
            batch = min(plan.max_batch, n)
            llm.replan(max_batch=batch, **kw)
            log(f"{scenario} kv={kv} micro-batches={micro} {mode}: batch {batch} (plan: {plan.summary()})")
            llm.generate(
                prompts[: min(batch, 4)], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), mode=mode
            )  # (warm-up: kernels, the cache's first growth)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            passes = llm.engine.passes.snapshot()
            cache = getattr(llm.orchestra, "cache", None)
            copies = cache.copies if cache is not None else 0
            t0 = time.perf_counter()
            results = llm.generate(prompts, params, mode=mode)
            seconds = time.perf_counter() - t0
            passes = llm.engine.passes.since(passes)
            copies = cache.copies - copies if cache is not None else 0
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            add(scenario, {**row, "skipped": f"out of GPU memory: {str(e).splitlines()[0]}"})
            continue
        tokens = sum(len(r.token_ids) for r in results)
        rate = tokens / seconds
        # (the placement the run had, at the batch it ran: the plan's batch may be larger than the job)
        residents = [len(ids) for ids in llm.placement.resident]
        sizes = llm.sizes
        link = link_bytes(sizes.layer_bytes(), residents, sizes.num_experts, llm.config.num_experts_per_tok, batch)
        roof = roofline(link, plan.h2d_gb_s, batch, p + new_tokens / 2, kv_per_token, kv == "host", machine)
        row.update(
            max_batch=batch,
            generated_tokens=tokens,
            seconds=round(seconds, 3),
            throughput_tok_s=round(rate, 2),
            passes=passes,  # {"prefill" | "decode" | "mixed": {"passes", "seconds"}}: where the job's time went
            # fetched experts' copy runs (one copy a part each) a pass: session 24's T2 timeline counted ~11,200
            copy_runs_per_pass=round(copies / max(1, sum(v["passes"] for v in passes.values())), 1),
            **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in roof.items()},
            roofline_fraction=round(rate / roof["roofline_tok_s"], 3) if roof["roofline_tok_s"] else None,
            plan=plan.as_dict(),
            placement=llm.placement.summary() if llm.placement is not None else None,
            cuda_graphs=llm.engine.graphs.describe(),
        )
        # (none for the batched row: its steps are the GPU-cache row's)
        name = None if timeline is None or mode == "together" else timeline.with_name(f"{timeline.name}-{kv}{micro}")
        if name is not None:  # (named before it is written: the row is kept first, whatever befalls the profile)
            plot = importlib.util.find_spec("matplotlib") is not None  # (the PNG is drawn where it is installed)
            row["timeline"] = [name.with_suffix(s).name for s in (TIMELINE_SUFFIX, ".png")[: 1 + plot]]
        add(scenario, row)
        if name is not None:  # (the run's batch, at most TIMELINE_ROWS sequences)
            from cadenza.bench.timeline import link_summary, record_timeline, write_timeline

            rows = min(batch, TIMELINE_ROWS)
            ramp = ramp_steps(rows, p, llm.engine.prefill_chunk) if llm.engine.orchestra is not None else 0
            # the last mixed steps of the batch's start and the first full decode step after them
            tl = record_timeline(llm, prompts[:rows], TIMELINE_STEPS, skip=max(1, ramp - TIMELINE_STEPS + 1))
            tl["link"] = link_summary(tl)
            log(f"timeline: the link over {TIMELINE_STEPS} steps: {tl['link']}")
            where = "on the GPU" if kv == "gpu" else "on the host"
            title = f"{scenario}: {rows} sequences, KV cache {where}, {micro} micro-batch{'es' if micro > 1 else ''}"
            log(f"timeline: {', '.join(str(f) for f in write_timeline(tl, name, title))}")
