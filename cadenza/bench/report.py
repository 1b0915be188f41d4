"""Benchmark results: one record per measured configuration, the JSON file benchmarks/README.md describes, the roofline
fraction, and the S1 plot (decode speed against GPU budget)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

GiB = 1 << 30

# The keys every result has (benchmarks/README.md, Protocol) (null where they do not apply).
REQUIRED_KEYS = (
    "scenario",
    "system",
    "model",
    "dtype",
    "cpu_experts",
    "policy",
    "gpu_budget_gib",
    "prompt_tokens",
    "new_tokens",
    "decode_tok_s",
    "prefill_tok_s",
    "ttft_s",
    "roofline_fraction",
    "peak_gpu_mem_gib",
)


@dataclass
class BenchResult:
    """One measured (or skipped) configuration. Metrics are None when not measured, never made up."""

    scenario: str  # D1, P1, S1, ...
    system: str  # "cadenza" or the baseline's name
    model: str
    dtype: str = "bf16"  # compute dtype of the weights
    cpu_experts: str | None = "bf16"  # dtype of the experts kept in host memory
    policy: str | None = None  # offload policy: auto, cpu, fetch (or the baseline's mechanism)
    gpu_budget_gib: float | str | None = None  # GiB, "all" (no limit), None (no GPU)
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_tok_s: float | None = None  # median over trials; tokens after the first / time after the first
    prefill_tok_s: float | None = None  # prompt tokens / time to first token, median over trials
    ttft_s: float | None = None  # time to first token, median over trials
    roofline_fraction: float | None = None  # decode: lower-bound time / measured time
    peak_gpu_mem_gib: float | None = None  # torch.cuda.max_memory_allocated over warm-up and trials
    device: str | None = None
    trials: int = 0
    trial_times_s: list[float] = field(default_factory=list)  # wall time of each whole request
    decode_tok_s_trials: list[float] = field(default_factory=list)
    placement: dict | None = None  # {"summary": ..., "resident_per_layer": [...], ...}
    expert_work_share: dict | None = None  # {"gpu": x, "cpu": y, "fetched": z}, shares of expert-token work
    expert_work: dict | None = None  # the raw counts behind the shares
    host_bytes_per_token: float | None = None  # expert bytes read from host memory per decode token
    gpu_bytes_per_token: float | None = None  # bytes read from GPU memory per decode token (roofline input)
    engine_stats: dict | None = None  # the engine's own stats of the median trial (syncs, time breakdown, ...)
    # the routing traced over the trials: share of expert work a popularity placement at this budget would keep
    # on the GPU, against even placement (random weights route flatter than trained ones)
    routing: dict | None = None
    model_bytes: int | None = None
    max_context: int | None = None
    skipped: bool = False
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> BenchResult:
        """Marks the configuration as not measured, with the reason in the notes."""
        self.skipped = True
        self.notes.append(f"skipped: {reason}")
        return self

    def as_dict(self) -> dict:
        d = asdict(self)
        for key, digits in (("decode_tok_s", 3), ("prefill_tok_s", 2), ("ttft_s", 5), ("roofline_fraction", 4)):
            if d[key] is not None:
                d[key] = round(d[key], digits)
        if d["peak_gpu_mem_gib"] is not None:
            d["peak_gpu_mem_gib"] = round(d["peak_gpu_mem_gib"], 3)
        d["trial_times_s"] = [round(t, 5) for t in d["trial_times_s"]]
        d["decode_tok_s_trials"] = [round(t, 3) for t in d["decode_tok_s_trials"]]
        return d


def roofline_fraction(
    host_bytes_per_token: float | None,
    gpu_bytes_per_token: float | None,
    dram_gb_s: float | None,
    gpu_gb_s: float | None,
    seconds_per_token: float | None,
) -> float | None:
    """max(host bytes / DRAM bandwidth, GPU bytes / GPU bandwidth) / measured seconds per token.

    1.0 is the physical limit. Bandwidths in GB/s (10^9). With no GPU (gpu_gb_s None) every byte comes from
    host DRAM, so the bound is (host + GPU-side bytes) / DRAM bandwidth. None when an input is unknown.
    """
    if None in (host_bytes_per_token, gpu_bytes_per_token, dram_gb_s, seconds_per_token):
        return None
    if seconds_per_token <= 0 or dram_gb_s <= 0:
        return None
    if gpu_gb_s is None:
        bound = (host_bytes_per_token + gpu_bytes_per_token) / (dram_gb_s * 1e9)
    else:
        bound = max(host_bytes_per_token / (dram_gb_s * 1e9), gpu_bytes_per_token / (gpu_gb_s * 1e9))
    return bound / seconds_per_token


# --- files ---------------------------------------------------------------------------------------------------------

_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "intel"}


def gpu_slug(gpu_name: str | None) -> str:
    """A short file-name tag for a GPU: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200",
    "NVIDIA GeForce RTX 4090" -> "rtx-4090", None (CPU-only run) -> "cpu"."""
    if not gpu_name:
        return "cpu"
    words = [w for w in re.findall(r"[a-z0-9]+", gpu_name.lower()) if w not in _VENDOR_WORDS]
    for w in words:
        if re.fullmatch(r"[a-z]+\d+[a-z]*", w):  # a model number like h100, a100, l40s, mi300x
            return w
    return "-".join(words[:2]) or "gpu"


def result_path(
    out_dir: str | Path, scenario: str, gpu_name: str | None, day: date | None = None, tag: str | None = None
) -> Path:
    """`<out_dir>/<scenario>-<gpu slug>-<YYYY-MM-DD>[-<tag>].json`."""
    day = day or date.today()
    suffix = f"-{tag}" if tag else ""
    return Path(out_dir) / f"{scenario}-{gpu_slug(gpu_name)}-{day.isoformat()}{suffix}.json"


def write_results(
    path: str | Path,
    command: str,
    machine: dict,
    results: list[BenchResult | dict],
    complete: bool = True,
) -> Path:
    """Writes a run's JSON (benchmarks/README.md, Protocol): {"command", "commit", "machine", "complete", "results"}.

    Atomic (a temporary file renamed over the target), so a run killed mid-write leaves the previous version,
    never half a file. `complete` is False while a run is still adding results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": command,
        "commit": machine.get("git_commit"),
        "machine": machine,
        "complete": complete,
        "results": [r.as_dict() if isinstance(r, BenchResult) else dict(r) for r in results],
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- the S1 plot ---------------------------------------------------------------------------------------------------


def _all_x(rows: list[dict]) -> tuple[float, str]:
    """Where "all" sits on the x axis: at the model's size, or past the largest budget when the model is smaller
    than that (a small model is all-resident already); and its tick label."""
    sizes = [r["model_bytes"] / GiB for r in rows if r.get("model_bytes")]
    size = max(sizes, default=0.0)
    numeric = [float(r["gpu_budget_gib"]) for r in rows if isinstance(r.get("gpu_budget_gib"), int | float)]
    x = max(size, 1.2 * max(numeric, default=0.0)) or 1.0
    return x, f"all\n({size:.3g} GiB)" if size else "all"


def plot_budget_sweep(results: list[BenchResult | dict], png_path: str | Path, title: str | None = None) -> Path | None:
    """Decode tok/s against GPU budget (GiB), one line per (system, policy); "all" sits at the model's size.

    matplotlib is optional: without it this prints a one-line notice and writes nothing (returns None).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on the benchmark box
        import matplotlib.pyplot as plt
    except ImportError:
        print("cadenza bench: matplotlib is not installed; skipping the plot (pip install matplotlib)", flush=True)
        return None
    rows = [r.as_dict() if isinstance(r, BenchResult) else r for r in results]
    all_x, all_tick = _all_x(rows)
    series: dict[str, list[tuple[float, float]]] = {}
    ticks: dict[float, str] = {}
    for r in rows:
        budget = r.get("gpu_budget_gib")
        if r.get("decode_tok_s") is None or not (budget == "all" or isinstance(budget, int | float)):
            continue
        x = all_x if budget == "all" else float(budget)
        ticks[x] = all_tick if budget == "all" else f"{x:g}"
        label = r["system"] if r.get("policy") in (None, "auto") else f"{r['system']} ({r['policy']})"
        series.setdefault(label, []).append((x, r["decode_tok_s"]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for x, y in points:
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if ticks:
        ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
    ax.set_xlabel("GPU memory budget (GiB)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(title or "Decode speed vs GPU budget")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
