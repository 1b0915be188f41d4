"""A timeline of a few decode steps of an offline job (#22's device test): which thread and which CUDA stream did
what, and when, so that the overlap of the host cache's CPU attention with the GPU's work can be seen.

`record_timeline(llm, prompts, steps)` decodes `steps` tokens for `prompts` under torch.profiler (every thread; CUDA
activity on a GPU) and keeps: the spans cadenza marks (`cadenza.attention.cpu`: a decode step's attention on the
CPU; `cadenza.experts`: a micro-batch's call of an offloaded layer, its GPU work included; `cadenza.kv.copy`: new
keys and values to the host cache; `cadenza.microbatch.<i>`: a micro-batch's whole step; `cadenza.decode`: a decode
step, the engine's), one lane per thread; and
the GPU's kernels and copies, one lane per stream. `plot_timeline` draws them (matplotlib, the `bench` extra).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

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
