"""cadenza under test: built once on a synthetic checkpoint, re-planned for each configuration, measured as
benchmarks/README.md says (batch 1, greedy, end-of-sequence ignored, one warm-up, then the median of the trials)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cadenza.bench.report import BenchResult, GiB, roofline_fraction
from cadenza.bench.synthetic import SyntheticCheckpoint, WeightBytes
from cadenza.engine import GenerationStats
from cadenza.moe.trace import ExpertTrace
from cadenza.sampling import SamplingParams

SYSTEM = "cadenza"
RANDOM_ROUTING_NOTE = "synthetic random weights: routing is flatter than a trained model's"


@dataclass(frozen=True)
class RunConfig:
    """One measured configuration of a scenario."""

    scenario: str
    policy: str  # offload policy: auto, cpu, fetch
    budget: float | str  # GPU budget in GiB, or "all" (no limit)
    prompt_tokens: int
    new_tokens: int


class CadenzaUnderTest:
    """cadenza's LLM, loaded once from `ckpt`, or with cadenza's own loader from `gguf` (a file written from `ckpt`,
    which still gives the shapes and weight bytes); `configure` re-places the experts for each configuration."""

    def __init__(
        self,
        ckpt: SyntheticCheckpoint,
        device: torch.device,
        first: RunConfig,
        max_context: int,
        cpu_threads: int | None = None,
        prefetch: bool | None = None,
        eviction: str = "lru",
        experts: str = "bf16",
        expert_group: int | None = None,
        expert_cache: bool = True,
        cuda_graphs: bool = True,
        gguf: Path | None = None,
        devices: str | None = None,
        other_bytes: int | None = None,
    ):
        """devices: several GPUs (LLM's devices, `cadenza bench --gpus`), each with the configuration's budget.
        other_bytes: the non-expert bytes a decode token reads as loaded, where they differ from the checkpoint's
        (a GGUF's blocks: `GgufPlan.other_bytes`); None: the checkpoint's."""
        from cadenza.llm import LLM

        self.ckpt, self.device, self.max_context = ckpt, device, max_context
        self.other_bytes = ckpt.weight_bytes().other if other_bytes is None else other_bytes
        t0 = time.perf_counter()
        source = {"model_dir": str(gguf)} if gguf is not None else {"checkpoint": ckpt}
        self.llm = LLM(
            **source,
            device=str(device),
            gpu_memory=self.gpu_memory(first),
            offload_policy=first.policy,
            max_context=max_context,
            cpu_threads=cpu_threads,
            prefetch=prefetch,
            eviction=eviction,
            experts=experts,
            expert_group=expert_group,
            expert_cache=expert_cache,
            cuda_graphs=cuda_graphs,
            devices=devices,
        )
        self.load_s = time.perf_counter() - t0

    def gpu_memory(self, cfg: RunConfig) -> str | int | None:
        """LLM's gpu_memory for a configuration. "all" is no limit on a GPU; on device="cpu" the GPU side is
        emulated and needs a number, so "all" becomes one that holds the whole model."""
        if cfg.budget != "all":
            return f"{cfg.budget:g}GiB"
        return None if self.device.type == "cuda" else 2 * self.ckpt.total_bytes + GiB

    def configure(self, cfg: RunConfig) -> str | None:
        """Re-plans for `cfg`; returns why it cannot be measured here, or None."""
        if self.device.type == "cuda":
            gpu_gib = torch.cuda.get_device_properties(self.device).total_memory / GiB
            need = self.ckpt.total_bytes / GiB if cfg.budget == "all" else float(cfg.budget)
            if need > gpu_gib:
                what = f"the whole model ({need:.1f} GiB)" if cfg.budget == "all" else f"a {need:g} GiB budget"
                return f"{what} does not fit in this GPU's {gpu_gib:.1f} GiB"
        self.llm.replan(gpu_memory=self.gpu_memory(cfg), offload_policy=cfg.policy)
        return None

    def placement(self) -> dict | None:
        p = self.llm.placement
        return None if p is None else {"summary": p.summary(), **p.as_dict()}

    def generate(self, prompt_ids: list[int], new_tokens: int) -> GenerationStats:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        return self.llm.generate(prompt_ids, params).stats

    def close(self) -> None:
        """Stops cadenza's CPU worker and drops the model."""
        self.llm.close()
        self.llm = None


def measure(
    cut: CadenzaUnderTest,
    cfg: RunConfig,
    result: BenchResult,
    prompt_ids: list[int],
    trials: int,
    machine: dict,
) -> BenchResult:
    """Configures, warms up once, runs `trials` requests and fills `result` (skipped, with the reason, when the
    configuration cannot run here)."""
    reason = cut.configure(cfg)
    if reason:
        return result.skip(reason)
    result.placement = cut.placement()
    cuda = cut.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(cut.device)
        torch.cuda.reset_peak_memory_stats(cut.device)
    cut.generate(prompt_ids, cfg.new_tokens)  # warm-up: same shapes as the trials
    runs: list[tuple[float, GenerationStats]] = []
    trace = ExpertTrace(cut.llm.model) if cut.llm.placement is not None else None  # counted on the device
    for _ in range(trials):
        t0 = time.perf_counter()
        stats = cut.generate(prompt_ids, cfg.new_tokens)  # returns once the last token is on the host
        runs.append((time.perf_counter() - t0, stats))
    if trace is not None:
        trace.close()
        result.routing = routing_facts(cut.llm, trace.counts())
    if cuda:
        result.peak_gpu_mem_gib = torch.cuda.max_memory_allocated(cut.device) / GiB
        if isinstance(cfg.budget, int | float) and result.peak_gpu_mem_gib > cfg.budget:
            result.notes.append(f"peak GPU memory {result.peak_gpu_mem_gib:.2f} GiB is above the budget")

    result.trial_times_s = [t for t, _ in runs]
    result.ttft_s = statistics.median(s.prefill_s for _, s in runs)
    result.prefill_tok_s = statistics.median(s.prefill_tok_s for _, s in runs)
    stats = sorted(runs, key=lambda r: r[0])[len(runs) // 2][1]  # the median trial, for counts
    if stats.generated_tokens != cfg.new_tokens:
        result.notes.append(f"generated {stats.generated_tokens} tokens, not {cfg.new_tokens}")
    if stats.generated_tokens >= 2:
        result.decode_tok_s_trials = [s.decode_tok_s for _, s in runs]
        result.decode_tok_s = statistics.median(result.decode_tok_s_trials)
    result.engine_stats = stats.as_dict()
    _record_work(result, stats)
    _record_bytes(result, stats, cut, machine)
    if cfg.budget != "all":
        result.notes.append(RANDOM_ROUTING_NOTE)
    return result


def routing_facts(llm, counts: list[list[int]]) -> dict:
    """Popularity vs even placement at the current budget, from the counts traced over the trials."""
    from cadenza.profile import placement_shares

    p = llm.placement
    budget = p.budget_bytes
    if not budget:  # 0 (all on the host) or unlimited: nothing to choose
        return {"counts_total": sum(map(sum, counts))}
    [row] = placement_shares(llm, counts, [budget])
    return {"counts_total": sum(map(sum, counts)), "current_share": round(p.expected_gpu_share(counts), 4), **row}


def _record_work(result: BenchResult, stats: GenerationStats) -> None:
    work = stats.expert_work
    if not work:
        result.notes.append("expert_work_share: null, the engine reported no expert work")
        return
    total = sum(work.values())
    result.expert_work = dict(work)
    if total:
        result.expert_work_share = {k: work.get(k, 0) / total for k in ("gpu", "cpu", "fetched", "split")}


def _record_bytes(result: BenchResult, stats: GenerationStats, cut: CadenzaUnderTest, machine: dict) -> None:
    """Bytes per decode token and the roofline fraction (decode results only)."""
    steps = stats.generated_tokens - 1
    if steps < 1 or not result.decode_tok_s:
        return
    wb: WeightBytes = cut.ckpt.weight_bytes()
    if stats.decode_host_bytes is None or stats.decode_gpu_bytes is None:
        result.notes.append("roofline_fraction: null, the engine reported no decode bytes")
        return
    host_pt, expert_gpu_pt = stats.decode_host_bytes / steps, stats.decode_gpu_bytes / steps
    # At batch 1 a token reads k distinct experts per layer, wherever they live: a cross-check of the counters.
    want = wb.active_expert_bytes_per_token
    if cut.llm.orchestra is not None:  # as stored (quantized experts read fewer bytes)
        want = want * cut.llm.orchestra.expert_bytes // wb.expert_bytes
    if abs(host_pt + expert_gpu_pt - want) > 0.02 * want:
        result.notes.append(
            f"decode expert bytes per token {host_pt + expert_gpu_pt:.4g} differ from k per layer ({want})"
        )
    # The always-on weights (attention, routers, norms, LM head; one embedding row) are read every token too.
    gpu_pt = expert_gpu_pt + cut.other_bytes
    gpu_bw = machine.get("gpu_mem_bw_gb_s")
    if cut.device.type != "cuda":  # no GPU: the "GPU side" is host memory too
        host_pt, gpu_pt, gpu_bw = host_pt + gpu_pt, 0.0, None
        result.notes.append("device cpu: host_bytes_per_token counts every weight byte a decode token reads")
    result.host_bytes_per_token = host_pt
    result.gpu_bytes_per_token = gpu_pt
    result.roofline_fraction = roofline_fraction(
        host_pt, gpu_pt, machine.get("dram_read_gb_s"), gpu_bw, 1.0 / result.decode_tok_s
    )
