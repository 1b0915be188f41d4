"""A timeline of a few decode steps of an offline job (#22's device test): which thread and which CUDA stream did
what, and when, so that the overlap of the host cache's CPU attention with the GPU's work can be seen.

`record_timeline(llm, prompts, steps)` decodes `steps` tokens for `prompts` under torch.profiler (every thread; CUDA
activity on a GPU) and keeps: the spans cadenza marks (`cadenza.attention.cpu`: a decode step's attention on the
CPU; `cadenza.experts`: a micro-batch's call of an offloaded layer, its GPU work included; `cadenza.kv.copy`: new
keys and values to the host cache; `cadenza.microbatch.<i>`: a micro-batch's whole step; `cadenza.decode`: a decode
step, the engine's), one lane per thread; and
the GPU's kernels and copies, one lane per stream. `plot_timeline` draws them (matplotlib, the `bench` extra);
`link_summary` says how busy the link was and where it idled (`python -m cadenza.bench.timeline FILE.json.gz`).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from cadenza.bench.step_attribution import gaps, merge, overlap_ns

MARKS = ("cadenza.attention.cpu", "cadenza.experts", "cadenza.kv.copy", "cadenza.microbatch", "cadenza.decode")
COLORS = {"attention": "tab:orange", "experts": "tab:blue", "kv": "tab:green", "microbatch": "lightgray",
          "decode": "gainsboro", "kernel": "tab:purple", "copy": "tab:red"}  # fmt: skip
TIMELINE_SUFFIX = ".json.gz"  # (gzip.open reads it back)
TRANSFER_PREFIXES = ("Memcpy", "Memset", "memcpy", "memset")


def record_timeline(llm, prompts: list[list[int]], steps: int, skip: int = 1) -> dict:
    """{"lanes": {lane: [[kind, name, start_ms, end_ms], ...]}, "span_ms": ...} for `steps` decode steps of
    `prompts` after the first `skip` + 1 (a warm-up): the profiler records only those (a schedule stepped by the
    engine's `step_hook`, which mixed steps call too), so the prefill of a whole batch costs no events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    from cadenza.bench.step_profile import _all_threads_config
    from cadenza.sampling import SamplingParams

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    config = _all_threads_config()
    kw = {"experimental_config": config} if config is not None else {}
    # decode calls 1 .. skip wait, the next warms up, the `steps` after it are recorded, one more ends the recording
    params = SamplingParams(temperature=0.0, max_tokens=skip + steps + 3, ignore_eos=True)
    engine = llm.engine
    with profile(activities=activities, schedule=schedule(wait=skip, warmup=1, active=steps, repeat=1), **kw) as prof:
        engine.step_hook = prof.step
        try:
            llm.generate(prompts, params, mode="throughput")
        finally:
            engine.step_hook = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    spans = []
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if e.device_type() == DeviceType.CPU:
            if name.startswith(MARKS):
                kind = name.split(".")[1]
                spans.append((f"CPU thread {e.start_thread_id()}", kind, name, e.start_ns(), e.end_ns()))
        elif not getattr(e, "is_user_annotation", lambda: False)():
            kind = "copy" if name.startswith(TRANSFER_PREFIXES) else "kernel"
            spans.append((f"GPU stream {e.device_resource_id()}", kind, name, e.start_ns(), e.end_ns()))
    # from the first recorded step's mark (CPU attention, or the engine's decode span) on: what the profiler flushed
    # before it (the warm-up's tail) is not a step's
    decode = [s[3] for s in spans if s[2] in (MARKS[0], MARKS[4])]
    if decode:
        spans = [s for s in spans if s[4] >= min(decode)]
    if not spans:
        return {"lanes": {}, "span_ms": 0.0}
    t0 = min(s[3] for s in spans)
    lanes: dict[str, list] = {}
    for lane, kind, name, start, end in sorted(spans, key=lambda s: s[3]):
        lanes.setdefault(lane, []).append([kind, name[:60], (start - t0) / 1e6, (end - t0) / 1e6])
    return {"lanes": lanes, "span_ms": (max(s[4] for s in spans) - t0) / 1e6}


def link_summary(timeline: dict, min_gap_ms: float = 1.0) -> dict | None:
    """How the host -> GPU link was used over the recorded decode steps (the engine's `cadenza.decode` marks; the
    whole span without them): the union of the copy-only streams' spans (the experts' copies: the fetch and prefetch
    streams), its idle gaps of at least `min_gap_ms` within the steps, and the gaps that hold a step's start (the
    link idle across a step boundary). None without such a stream (no copies, or the CPU). Session 26's T1
    timeline (results/2026-12-04-s26): busy 1144 of 1396 ms (0.82), 89 gaps of 1 ms or more (237 ms in all,
    median 2.3), 14.2 and 11.0 ms at the two step boundaries."""
    lanes = timeline.get("lanes", {})
    steps = sorted(
        (s[2], s[3]) for lane, spans in lanes.items() if lane.startswith("CPU") for s in spans if s[0] == "decode"
    )
    copies = sorted(
        (s[2], s[3])
        for lane, spans in lanes.items()
        if lane.startswith("GPU") and spans and all(s[0] == "copy" for s in spans)
        for s in spans
    )
    if not copies:
        return None
    lo, hi = (steps[0][0], steps[-1][1]) if steps else (0.0, timeline.get("span_ms", copies[-1][1]))
    busy = merge(copies)
    inside = overlap_ns(busy, lo, hi)  # (the interval arithmetic of step profiles, in ms here)
    between = gaps(busy[0][0], busy[-1][1], busy)  # idle between two copies, clipped to the steps
    idle = [(max(lo, a), min(hi, b)) for a, b in between]
    gap_ms = sorted(b - a for a, b in idle if b - a >= min_gap_ms)
    starts = [a for a, _ in steps[1:]]
    window = hi - lo
    return {
        "steps_ms": [round(b - a, 2) for a, b in steps],
        "window_ms": round(window, 2),
        "link_busy_ms": round(inside, 2),
        "link_busy_fraction": round(inside / window, 3) if window > 0 else None,
        "gaps_min_ms": min_gap_ms,
        "gaps": len(gap_ms),
        "gaps_total_ms": round(sum(gap_ms), 2),
        "gap_median_ms": round(gap_ms[len(gap_ms) // 2], 2) if gap_ms else None,
        "gap_max_ms": round(gap_ms[-1], 2) if gap_ms else None,
        "step_boundary_gaps_ms": [round(b - a, 2) for a, b in idle if any(a <= t <= b for t in starts)],
    }


def write_timeline(timeline: dict, path: Path, title: str) -> list[Path]:
    """The timeline as gzipped JSON (a T2 step's spans are ~8 MB of text, a tenth of it gzipped: results stay
    committable) beside a PNG of it (when matplotlib is there); returns the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # (a run's first file may be its timeline)
    out = [path.with_suffix(TIMELINE_SUFFIX)]
    with gzip.open(out[0], "wt") as f:
        json.dump(timeline, f)
    if plot_timeline(timeline, path.with_suffix(".png"), title):
        out.append(path.with_suffix(".png"))
    return out


def plot_timeline(timeline: dict, path: Path, title: str) -> bool:
    """One row per lane, spans as bars colored by kind; False without matplotlib (or nothing to draw)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lanes = timeline["lanes"]
    if not lanes:
        return False
    names = sorted(lanes, key=lambda n: (not n.startswith("CPU"), n))
    fig, ax = plt.subplots(figsize=(14, 1 + 0.5 * len(names)))
    for row, lane in enumerate(names):  # one collection per (lane, kind): a bar each would take minutes at 45k spans
        bars: dict[str, list] = {}
        for kind, _, start, end in lanes[lane]:
            bars.setdefault(kind, []).append((start, max(end - start, 1e-3)))
        for kind, spans in bars.items():
            ax.broken_barh(spans, (row - 0.4, 0.8), color=COLORS.get(kind, "black"), linewidth=0)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("ms")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), loc="upper right", fontsize="small", ncols=len(COLORS))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":  # python -m cadenza.bench.timeline FILE.json.gz ...: each timeline's link_summary
    import sys

    for name in sys.argv[1:]:
        with gzip.open(name, "rt") if name.endswith(".gz") else open(name) as f:
            print(name, json.dumps(link_summary(json.load(f)), indent=1))
