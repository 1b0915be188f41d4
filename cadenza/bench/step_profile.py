"""`cadenza bench --profile-step`: the time of one decode step split into GPU kernels, transfers, CPU experts and
the rest (overhead), per decoder layer and in total, so that a regression shows where it is.

`profile_decode(llm, prompt_ids)` prefills the prompt, runs `warmup` greedy decode steps, times `steps` steps
without the profiler (`unprofiled_step_ms`), then runs `steps` more under `torch.profiler.profile` and reads the
raw Kineto events (`prof.profiler.kineto_results.events()`: start/end in ns on one clock for host and device
events, with correlation ids). Each step is wrapped in `record_function("cadenza.step")` and each decoder layer
in `record_function("cadenza.layer.<i>")` (a temporary forward pre-hook / hook pair, removed afterwards).

How each category is measured (all in ms; every table entry is the median over the profiled steps):

- wall: the host-side time range of the step's (layer's) record_function.
- gpu_kernels: |union| of the CUDA kernel intervals (device events of kind "kernel"; copies and memsets are not
  kernels) attributed to the step (layer). A kernel is attributed by its *launch* time: its runtime launch event
  (cudaLaunchKernel etc.) shares the kernel's CUPTI correlation id; failing that, the CPU op whose correlation id
  the kernel links to (`linked_correlation_id`). The step (layer) whose host range holds that time gets it, so a
  layer's GPU time counts even when its kernels run after its host code has returned.
- transfers: the same for memcpy / memset device intervals.
- cpu_experts: the CPU worker's intervals in `LayerOffload._cpu_job`, which runs on the Orchestra's worker
  thread, or, where the CPU's share is launched from the stream (cadenza.moe.offload.streamed), the jobs' own start and
  end times (perf_counter's clock, read from their stats; the driver's callback thread is never traced). The
  profiler records only the thread that started it, unless started with
  `_ExperimentalConfig(profile_all_threads=True)` (PyTorch >= 2.7): then `_cpu_job`, wrapped for the profiled
  steps with `record_function("cadenza.cpu_experts")`, shows up in the trace on the worker's thread. Without it
  (or with all_threads=False) the wrapper's own `perf_counter_ns` intervals are moved onto the profiler's clock:
  around each step's `record_function` enter the host reads perf_counter_ns before and after; the trace's step
  start lies between them, and the median over steps of (trace start - midpoint) is the offset (error: half the
  enter's duration, a few microseconds). An interval belongs to the layer whose host range holds its start.
- overhead: wall - |union(gpu_kernels, transfers, cpu_experts) within the wall range|: host time in which
  neither the GPU (any kernel or copy, whichever layer launched it) nor the CPU experts did anything: Python,
  launches, synchronisation latency, bookkeeping.
- overhead_simple: the issue's definition, wall - gpu_kernels - cpu_experts (the target: <= 1.5 ms per decode
  step for Mixtral-8x7B). It goes negative where the GPU and the CPU experts overlap, and counts copies as
  overhead; `overhead` is the one that stays within [0, wall].
- syncs, sync_wait_ms: deltas of the Orchestra's counters (GPU->host synchronisations and the host's wait in
  them) over the step / layer; None without offloading.
- kernels / launches: device kernels run, and host runtime calls that launch (…Launch…: kernels and CUDA graphs);
  None without CUDA.
- the "outside" row: the step's time outside every decoder layer (embedding, attention metadata, final norm,
  lm_head, argmax and the token's copy to the host); its overhead counts busy time in those gaps only.

On a CPU-only model (device="cpu", with or without gpu_memory's emulated GPU side) there are no device events:
gpu_kernels and transfers are 0, kernels/launches None, and the "GPU side" work done on the CPU by the main thread
simply counts as overhead. The numbers then say little about a real GPU; the tests use this mode.

The profiler costs time: every op and launch is recorded (record_shapes, with_stack, memory and flops stay off).
Compare `step.wall_ms` (profiled) with `unprofiled_step_ms`; `profiler_slowdown` is their ratio. On a tiny
model on this project's 2-core test box the profiled step took 1.1-1.6x the unprofiled one (1-2.5 ms steps); the
cost is a few microseconds per recorded op and launch (CUPTI adds its own per kernel on a GPU), so expect tens
of percent on a 100 ms Mixtral step with thousands of launches. Profiling every thread also records the CPU
worker's ops.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from bisect import bisect_right
from dataclasses import dataclass, field

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from cadenza.errors import CadenzaError

STEP_NAME = "cadenza.step"
LAYER_PREFIX = "cadenza.layer."
CPU_EXPERTS_NAME = "cadenza.cpu_experts"
KERNEL_KINDS = ("kernel",)
TRANSFER_KINDS = ("gpu_memcpy", "gpu_memset")
TRANSFER_PREFIXES = ("Memcpy", "Memset")  # device event names when the event has no activity_type (older torch)

Interval = tuple[int, int]  # [start, end) in ns on the profiler's clock


# --- interval arithmetic ------------------------------------------------------------------------------------


def merge(intervals) -> list[Interval]:
    """Sorted, non-overlapping intervals covering the same time as `intervals`."""
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def union_ns(intervals) -> int:
    """The length of the union of `intervals`."""
    return sum(b - a for a, b in merge(intervals))


def overlap_ns(merged: list[Interval], lo: int, hi: int) -> int:
    """The length of merged intervals (from `merge`) inside [lo, hi)."""
    total = 0
    i = max(0, bisect_right(merged, (lo, lo)) - 1)
    while i < len(merged) and merged[i][0] < hi:
        a, b = merged[i]
        total += max(0, min(b, hi) - max(a, lo))
        i += 1
    return total


def gaps(lo: int, hi: int, ranges: list[Interval]) -> list[Interval]:
    """[lo, hi) less the (sorted, disjoint) ranges."""
    out, at = [], lo
    for a, b in ranges:
        if a > at:
            out.append((at, min(a, hi)))
        at = max(at, b)
    if at < hi:
        out.append((at, hi))
    return [(a, b) for a, b in out if b > a]


# --- results ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One step's (or one layer's) time, in milliseconds. See the module docstring for each field."""

    wall_ms: float = 0.0
    gpu_kernels_ms: float = 0.0
    transfers_ms: float = 0.0
    cpu_experts_ms: float = 0.0
    overhead_ms: float = 0.0  # wall - |gpu kernels U transfers U cpu experts|: nothing useful running
    overhead_simple_ms: float = 0.0  # wall - gpu kernels - cpu experts (the definition; may be < 0)
    syncs: float | None = None  # GPU->host synchronisations (offloaded models)
    sync_wait_ms: float | None = None  # host time waiting in them
    kernels: float | None = None  # device kernels (CUDA)
    launches: float | None = None  # host launch calls (CUDA)

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def median_row(rows: list[Row]) -> Row:
    """Each field's median over the rows (None where every row has None)."""
    out = {}
    for f in dataclasses.fields(Row):
        values = [getattr(r, f.name) for r in rows if getattr(r, f.name) is not None]
        out[f.name] = float(statistics.median(values)) if values else None
    return Row(**out)


@dataclass
class StepProfile:
    """A decode step's time split. `step`: per-step totals, median over the profiled steps; `layers`: one Row per
    decoder layer (index = layer), median per layer; `outside`: the step's time outside the layers; `steps`: every
    profiled step's totals."""

    step: Row
    layers: list[Row]
    outside: Row
    steps: list[Row]
    unprofiled_step_ms: float  # median wall time of a step without the profiler (same number of steps)
    device: str
    cuda: bool  # device events measured (gpu_kernels, transfers, kernels, launches)
    cpu_experts_source: str  # "profiler" (worker thread traced), "perf_counter" (moved onto its clock) or "none"
    layers_traced: bool = True  # False: the layers ran inside CUDA graphs, their time is in `outside`
    prompt_tokens: int = 0
    warmup: int = 0
    layer_steps: list[list[Row]] = field(default_factory=list, repr=False)  # [step][layer], unmedianed

    @property
    def profiled_step_ms(self) -> float:
        return self.step.wall_ms

    @property
    def profiler_slowdown(self) -> float | None:
        """Profiled step time / unprofiled step time."""
        return self.step.wall_ms / self.unprofiled_step_ms if self.unprofiled_step_ms > 0 else None

    def as_dict(self) -> dict:
        slowdown = self.profiler_slowdown
        return {
            "device": self.device,
            "cuda": self.cuda,
            "prompt_tokens": self.prompt_tokens,
            "warmup_steps": self.warmup,
            "profiled_steps": len(self.steps),
            "profiled_step_ms": round(self.profiled_step_ms, 4),
            "unprofiled_step_ms": round(self.unprofiled_step_ms, 4),
            "profiler_slowdown": None if slowdown is None else round(slowdown, 3),
            "cpu_experts_source": self.cpu_experts_source,
            "layers_traced": self.layers_traced,
            "definitions": {
                "overhead_ms": "wall - |union(gpu kernels, transfers, cpu experts) within wall|",
                "overhead_simple_ms": "wall - gpu_kernels - cpu_experts (the issue's definition; < 0 on overlap)",
                "median": "every value is the median over the profiled steps, field by field",
            },
            "step": self.step.as_dict(),
            "outside_layers": self.outside.as_dict(),
            "layers": [r.as_dict() for r in self.layers],
            "per_step": [r.as_dict() for r in self.steps],
        }

    def table(self) -> str:
        """A fixed-width text table: one line per decoder layer, the time outside the layers, the step total."""
        slowdown = self.profiler_slowdown
        lines = [
            f"decode step on {self.device}: {len(self.steps)} profiled steps, medians in ms; profiled step "
            f"{self.profiled_step_ms:.3f} ms, unprofiled {self.unprofiled_step_ms:.3f} ms"
            + (f" (profiler x{slowdown:.2f})" if slowdown is not None else ""),
            "overhead = wall - |gpu U xfer U cpu-exp| (nothing useful running); simple = wall - gpu - cpu-exp",
        ]
        if not self.cuda:
            lines.append("no device events (CPU model): gpu and xfer are 0, the emulated GPU side is overhead")
        if not self.layers_traced:
            lines.append("layers not traced (the step replays CUDA graphs): their time is in 'outside'; eager=True")
        head = ("layer", "wall", "gpu", "xfer", "cpu-exp", "overhead", "simple", "syncs", "sync-wait", "launches")
        widths = (8, 9, 9, 9, 9, 9, 9, 6, 9, 8)
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        lines.append(fmt.format(*head))

        def num(v, spec=".3f"):
            return "-" if v is None else format(v, spec)

        def line(name, r: Row):
            return fmt.format(
                name, num(r.wall_ms), num(r.gpu_kernels_ms), num(r.transfers_ms), num(r.cpu_experts_ms),
                num(r.overhead_ms), num(r.overhead_simple_ms), num(r.syncs, "g"), num(r.sync_wait_ms),
                num(r.launches, "g"),
            )  # fmt: skip

        lines += [line(str(i), r) for i, r in enumerate(self.layers)]
        lines.append(line("outside", self.outside))
        lines.append(line("step", self.step))
        return "\n".join(lines)


# --- the trace ----------------------------------------------------------------------------------------------


@dataclass
class _Trace:
    steps: list[Interval] = field(default_factory=list)
    layers: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, layer)
    cpu_experts: list[Interval] = field(default_factory=list)
    kernels: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, launch time)
    transfers: list[tuple[int, int, int]] = field(default_factory=list)
    launches: list[int] = field(default_factory=list)  # host times of launch calls


def _kind(e) -> str | None:
    """'kernel', 'transfer' or None for a device event."""
    annotation = getattr(e, "is_user_annotation", None)
    if annotation is not None and annotation():  # a record_function's range projected onto the GPU timeline
        return None
    get = getattr(e, "activity_type", None)  # not in every torch
    if get is not None:
        kind = get()
        if kind in KERNEL_KINDS:
            return "kernel"
        return "transfer" if kind in TRANSFER_KINDS else None
    return "transfer" if e.name().startswith(TRANSFER_PREFIXES) else "kernel"


def _read_trace(results) -> _Trace:
    """Sorts the Kineto events into what the profile needs; device events get their launch time."""
    trace = _Trace()
    runtime: dict[int, int] = {}  # CUPTI correlation id -> start of the runtime call (cudaLaunchKernel, ...)
    ops: dict[int, int] = {}  # CPU op correlation id -> its start
    device = []
    for e in results.events():
        start, end = e.start_ns(), e.end_ns()
        if e.device_type() != DeviceType.CPU:
            kind = _kind(e)
            if kind is not None:
                device.append((kind, start, end, e.correlation_id(), e.linked_correlation_id()))
            continue
        name = e.name()
        if name == STEP_NAME:
            trace.steps.append((start, end))
        elif name.startswith(LAYER_PREFIX):
            trace.layers.append((start, end, int(name[len(LAYER_PREFIX) :])))
        elif name == CPU_EXPERTS_NAME:
            trace.cpu_experts.append((start, end))
        elif e.linked_correlation_id() > 0:  # a CUDA runtime / driver call made inside an op
            runtime[e.correlation_id()] = start
            if "Launch" in name:
                trace.launches.append(start)
        else:
            ops[e.correlation_id()] = start
    for kind, start, end, corr, linked in device:
        launch = runtime.get(corr)
        if launch is None or launch > start:  # a launch precedes its kernel: else not this kernel's call
            launch = ops.get(linked, start) if linked > 0 else start
        (trace.kernels if kind == "kernel" else trace.transfers).append((start, end, launch))
    trace.steps.sort()
    trace.layers.sort()
    return trace


def _rows(
    trace: _Trace, n_layers: int, counters: list[dict], cuda: bool
) -> tuple[list[Row], list[list[Row]], list[Row]]:
    """Per step: its totals, its layers' rows, its outside-the-layers row (kernel counts only with cuda)."""
    busy = merge(
        [(a, b) for a, b, _ in trace.kernels] + [(a, b) for a, b, _ in trace.transfers] + list(trace.cpu_experts)
    )
    step_starts = [s for s, _ in trace.steps]
    n = len(trace.steps)
    # per step: layer -> (start, end) host ranges
    layer_ranges: list[dict[int, list[Interval]]] = [{} for _ in range(n)]
    for a, b, i in trace.layers:
        k = bisect_right(step_starts, a) - 1
        if 0 <= k < n and a < trace.steps[k][1]:
            layer_ranges[k].setdefault(i, []).append((a, b))

    def where(t: int) -> tuple[int, int | None] | None:
        """(step, layer or None) whose host range holds time t."""
        k = bisect_right(step_starts, t) - 1
        if k < 0 or t > trace.steps[k][1]:
            return None
        for i, ranges in layer_ranges[k].items():
            if any(a <= t <= b for a, b in ranges):
                return k, i
        return k, None

    # bins[step][layer or None] -> lists of intervals / counts
    def empty():
        return {"kernels": [], "transfers": [], "cpu": [], "launches": 0}

    bins: list[dict] = [{} for _ in range(n)]
    for key, items in (("kernels", trace.kernels), ("transfers", trace.transfers)):
        for a, b, t in items:
            at = where(t)
            if at is not None:
                bins[at[0]].setdefault(at[1], empty())[key].append((a, b))
    for a, b in trace.cpu_experts:
        at = where(a)
        if at is not None:
            bins[at[0]].setdefault(at[1], empty())["cpu"].append((a, b))
    for t in trace.launches:
        at = where(t)
        if at is not None:
            bins[at[0]].setdefault(at[1], empty())["launches"] += 1

    ms = 1e-6
    totals, per_layer, outside = [], [], []
    for k, (s0, s1) in enumerate(trace.steps):
        c = counters[k] if k < len(counters) else {}
        all_bins = list(bins[k].values())

        def row(wall_ns, got, busy_ns, syncs=None, wait=None):
            gpu, cpu = union_ns(got["kernels"]) * ms, union_ns(got["cpu"]) * ms
            wall = wall_ns * ms
            return Row(
                wall_ms=wall,
                gpu_kernels_ms=gpu,
                transfers_ms=union_ns(got["transfers"]) * ms,
                cpu_experts_ms=cpu,
                overhead_ms=max(0.0, wall - busy_ns * ms),
                overhead_simple_ms=wall - gpu - cpu,
                syncs=syncs,
                sync_wait_ms=wait,
                kernels=float(len(got["kernels"])) if cuda else None,
                launches=float(got["launches"]) if cuda else None,
            )

        everything = {key: [x for b in all_bins for x in b[key]] for key in ("kernels", "transfers", "cpu")}
        everything["launches"] = sum(b["launches"] for b in all_bins)
        totals.append(row(s1 - s0, everything, overlap_ns(busy, s0, s1), c.get("syncs"), c.get("sync_wait_ms")))
        layers, inside = [], []
        for i in range(n_layers):
            ranges = layer_ranges[k].get(i, [])
            inside += ranges
            lc = c.get("layers", {}).get(i, {})
            wall, got = sum(b - a for a, b in ranges), bins[k].get(i, empty())
            used = sum(overlap_ns(busy, a, b) for a, b in ranges)
            layers.append(row(wall, got, used, lc.get("syncs"), lc.get("sync_wait_ms")))
        per_layer.append(layers)
        rest = gaps(s0, s1, merge(inside))
        syncs = wait = None
        if c.get("syncs") is not None:
            syncs = c["syncs"] - sum(r.syncs or 0 for r in layers)
            wait = max(0.0, c["sync_wait_ms"] - sum(r.sync_wait_ms or 0 for r in layers))
        wall, got = sum(b - a for a, b in rest), bins[k].get(None, empty())
        outside.append(row(wall, got, sum(overlap_ns(busy, a, b) for a, b in rest), syncs, wait))
    return totals, per_layer, outside


# --- driving the steps --------------------------------------------------------------------------------------


def _all_threads_config():
    """An experimental config that records every thread's ops (PyTorch >= 2.7), or None."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        return None


def _counts(orchestra) -> tuple[int, float] | None:
    if orchestra is None:
        return None
    c = orchestra.counters
    return c.syncs, c.sync_wait_s


@torch.inference_mode()
def profile_decode(
    llm,
    prompt_ids: list[int],
    steps: int = 8,
    warmup: int = 2,
    all_threads: bool | None = None,
    eager: bool = False,
) -> StepProfile:
    """Profiles greedy decode steps of `llm` (a cadenza.LLM) after prefilling `prompt_ids` -> StepProfile.

    warmup steps run first without the profiler, then `steps` steps are timed without it and `steps` more under
    it. A step is what the engine runs for one token (`Engine.decode` where the engine has it, which may replay
    CUDA graphs, else the model's forward of one token with the cache), then the argmax read back to the host.
    eager: call the model's forward directly even where the engine would replay a CUDA graph: decoder layers
    inside a replayed graph never call their hooks, so only an eager step has per-layer rows
    (`StepProfile.layers_traced`). all_threads: trace the CPU worker thread through the profiler (None: when
    this torch can; False: measure it with perf_counter and move the intervals onto the profiler's clock)."""
    if not isinstance(steps, int) or steps < 1:
        raise CadenzaError(f"steps={steps!r}: profile at least one decode step.")
    if not isinstance(warmup, int) or warmup < 0:
        raise CadenzaError(f"warmup={warmup!r}: give a whole number of warm-up steps, 0 or more.")
    engine = llm.engine
    engine.check_prompt(prompt_ids)
    length = len(prompt_ids) + warmup + 2 * steps + 1
    if length > engine.max_context:
        raise CadenzaError(
            f"A prompt of {len(prompt_ids)} tokens and {warmup} + 2 x {steps} decode steps need {length} positions; "
            f"the context holds {engine.max_context}. Use a shorter prompt or fewer steps."
        )
    model, device, orch = engine.model, engine.device, engine.orchestra
    cuda = device.type == "cuda"
    cache = engine.cache_for(1, length)
    token = int(torch.argmax(engine.forward(list(prompt_ids), cache, last_only=True, rows=[0])[-1]))

    decode = None if eager else getattr(engine, "decode", None)

    def step(token: int) -> int:
        if decode is not None:
            logits = decode([token], cache, [0])
        else:
            ids = torch.tensor([[token]], dtype=torch.long, device=device)
            logits = model(ids, cache, last_only=True, rows=[0])[:, -1]
        return int(torch.argmax(logits[0]))

    for _ in range(warmup):
        token = step(token)
    plain = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        token = step(token)
        plain.append((time.perf_counter_ns() - t0) * 1e-6)

    # per-layer record_function ranges and counter deltas, through hooks removed afterwards
    decoder_layers = list(model.model.layers)
    open_ranges: dict[int, tuple] = {}
    counters: list[dict] = []

    def pre_hook(i, module, args):
        rf = record_function(f"{LAYER_PREFIX}{i}")
        rf.__enter__()
        open_ranges[i] = (rf, _counts(orch))

    def post_hook(i, module, args, output):
        rf, before = open_ranges.pop(i)
        rf.__exit__(None, None, None)
        after = _counts(orch)
        if before is not None and counters:
            counters[-1]["layers"][i] = {
                "syncs": float(after[0] - before[0]),
                "sync_wait_ms": (after[1] - before[1]) * 1e3,
            }

    # the CPU worker's jobs: a record_function (traced when the profiler records every thread) and perf_counter
    # intervals (the fallback), per instance so that only this model's layers change
    worker_ns: list[Interval] = []
    patched = []
    if orch is not None:
        for layer in orch.layers:
            original = layer._cpu_job

            @functools.wraps(original)
            def job(*args, _original=original, **kwargs):
                t0 = time.perf_counter_ns()
                try:
                    with record_function(CPU_EXPERTS_NAME):
                        return _original(*args, **kwargs)
                finally:
                    worker_ns.append((t0, time.perf_counter_ns()))

            layer._cpu_job = job
            patched.append(layer)

    config = _all_threads_config() if all_threads is not False else None
    if all_threads and config is None:
        raise CadenzaError("This PyTorch cannot profile every thread (profile_all_threads needs PyTorch >= 2.7).")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    anchors = []  # perf_counter_ns before and after each step's record_function enter
    handles = []
    try:
        for i, layer in enumerate(decoder_layers):
            handles.append(layer.register_forward_pre_hook(functools.partial(pre_hook, i)))
            handles.append(layer.register_forward_hook(functools.partial(post_hook, i)))
        if cuda:
            torch.cuda.synchronize(device)
        kw = {"experimental_config": config} if config is not None else {}
        t_profiled = time.perf_counter_ns()
        with profile(
            activities=activities, record_shapes=False, with_stack=False, profile_memory=False, with_flops=False,
            with_modules=False, **kw,
        ) as prof:  # fmt: skip
            for _ in range(steps):
                before = _counts(orch)
                counters.append({"layers": {}})
                t0 = time.perf_counter_ns()
                with record_function(STEP_NAME):
                    t1 = time.perf_counter_ns()
                    token = step(token)
                anchors.append((t0, t1))
                after = _counts(orch)
                if before is not None:
                    counters[-1]["syncs"] = float(after[0] - before[0])
                    counters[-1]["sync_wait_ms"] = (after[1] - before[1]) * 1e3
    finally:
        for h in handles:
            h.remove()
        for rf, _ in open_ranges.values():  # a layer that raised
            rf.__exit__(None, None, None)
        for layer in patched:
            del layer._cpu_job

    streamed = getattr(orch, "streamed", None)
    if streamed is not None:  # jobs the CUDA stream ran on the driver's thread: their own perf_counter times
        worker_ns += [iv for iv in streamed.intervals() if iv[0] >= t_profiled]
    trace = _read_trace(prof.profiler.kineto_results)
    if len(trace.steps) != steps:
        raise CadenzaError(f"The profiler recorded {len(trace.steps)} of {steps} steps; cannot split the step.")
    source = "none"
    if trace.cpu_experts:
        source = "profiler"
    elif worker_ns:
        offset = int(statistics.median(s - (a + b) // 2 for (s, _), (a, b) in zip(trace.steps, anchors, strict=True)))
        trace.cpu_experts = [(a + offset, b + offset) for a, b in worker_ns]
        source = "perf_counter"
    totals, per_layer, outside = _rows(trace, len(decoder_layers), counters, cuda)
    return StepProfile(
        step=median_row(totals),
        layers=[median_row([layers[i] for layers in per_layer]) for i in range(len(decoder_layers))],
        outside=median_row(outside),
        steps=totals,
        unprofiled_step_ms=float(statistics.median(plain)),
        device=str(device),
        cuda=cuda,
        cpu_experts_source=source,
        layers_traced=bool(trace.layers),
        prompt_tokens=len(prompt_ids),
        warmup=warmup,
        layer_steps=per_layer,
    )


__all__ = ["Row", "StepProfile", "profile_decode"]
