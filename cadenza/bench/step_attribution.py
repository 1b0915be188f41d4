"""How `cadenza bench --profile-step` (cadenza.bench.step_profile) turns a profiler trace into times: the Kineto
events sorted into steps, layers, CPU-expert intervals, kernels and transfers (each device event with the host time
that launched it), then each step's and layer's Rows. What each field measures: step_profile's docstring."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from torch.autograd import DeviceType

from cadenza.bench.step_report import Row

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
