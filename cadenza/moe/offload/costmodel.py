"""The cost model behind `--offload-policy auto`: for a non-resident expert with n tokens, is it cheaper to compute
it on the CPU or to fetch its weights over PCIe and compute it on the GPU?

Measured on the machine at first use (CPU time of an expert as a function of its token count, pinned
host-to-GPU bandwidth, GPU time of an expert) and cached on disk, keyed by the machine and the expert's shape;
`cadenza info` prints it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from cadenza.moe.experts import run_experts

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class CostModel:
    key: str
    expert_bytes: int
    cpu_s: tuple[float, float]  # seconds = a + b * tokens, one expert on the CPU (where cpu_points is empty)
    gpu_s: tuple[float, float]  # the same on the GPU
    h2d_gb_s: float  # pinned host -> GPU copy bandwidth, GB/s
    # (tokens, seconds) of one expert as measured, interpolated between and extended along the last segment: the
    # times are far from a line (the CPU's fused kernel below ~32 tokens, its matrix units above; the GPU's dots at
    # a few tokens, a dequantized product beyond): a line through 1, 16 and 128 tokens put one token of a G1 expert
    # at 9.6 ms on the box's CPU, where the engine's decode measured ~2.1 ms an expert
    cpu_points: tuple[tuple[int, float], ...] = ()
    gpu_points: tuple[tuple[int, float], ...] = ()
    # Learned while running (not cached): observed / calibrated CPU time, for CPU work alone and for CPU work
    # that shares DRAM with fetches. A CPU expert inside a decode step runs slower, and far more erratically,
    # than in a calibration loop.
    alone_scale: float = 1.0
    shared_scale: float | None = None  # None until observed: assume no slowdown, so the split gets tried
    # layer decisions since the last split: after EXPLORE_EVERY, one split is tried at the alone speed, so a
    # noisy early observation cannot rule the split out for the rest of the run
    since_split: int = 0
    EXPLORE_EVERY: ClassVar[int] = 64

    def observe_cpu(self, experts: int, tokens: int, seconds: float, shared: bool) -> None:
        """Feeds one CPU job's measured time back (an exponential moving average of observed / predicted)."""
        if experts == 0:
            return
        predicted = experts * self._cpu_base(tokens / experts)
        if predicted <= 0:
            return
        r = seconds / predicted
        if shared:
            self.shared_scale = r if self.shared_scale is None else 0.8 * self.shared_scale + 0.2 * r
        else:
            self.alone_scale = 0.8 * self.alone_scale + 0.2 * r

    def _cpu_base(self, n: float) -> float:
        """One expert with n tokens on the CPU as calibrated (before the learned scales)."""
        return _interpolate(self.cpu_points, n) if self.cpu_points else self.cpu_s[0] + self.cpu_s[1] * n

    def cpu_time(self, n: int, shared: bool = False) -> float:
        scale = self.shared_scale if shared and self.shared_scale is not None else self.alone_scale
        return self._cpu_base(n) * scale

    def gpu_time(self, n: int) -> float:
        return _interpolate(self.gpu_points, n) if self.gpu_points else self.gpu_s[0] + self.gpu_s[1] * n

    def fetch_time(self, n: int) -> float:
        return self.expert_bytes / (self.h2d_gb_s * 1e9) + self.gpu_time(n)

    def prefers_fetch(self, n: int) -> bool:
        return self.fetch_time(n) < self.cpu_time(n)

    def split(self, misses: list[int], counts: list[int]) -> tuple[list[int], list[int]]:
        """Non-resident experts of one layer -> (fetch, compute on the CPU), chosen so the layer's expert work
        ends soonest: the CPU works through its list while the copy engine streams the other experts' weights.
        The experts are ranked by what fetching gains them; the split fetches the best prefix of that ranking
        (CPU time counted at its learned speed when sharing DRAM with fetches). Every prefix is weighed, not only
        while each step helps: once the CPU is slower when sharing, the first fetch alone can look worse than none
        while fetching most of a long prompt's experts is far better."""
        alone = {e: self.cpu_time(counts[e]) for e in misses}
        explore = self.since_split >= self.EXPLORE_EVERY
        shared = alone if explore else {e: self.cpu_time(counts[e], shared=True) for e in misses}
        fetch = {e: self.fetch_time(counts[e]) for e in misses}
        ranked = sorted(misses, key=lambda x: (-(alone[x] - fetch[x]), x))
        best_k, best = 0, sum(alone.values())
        fetch_total, cpu_left = 0.0, sum(shared.values())
        for k, e in enumerate(ranked, start=1):
            fetch_total += fetch[e]
            cpu_left -= shared[e]
            span = max(cpu_left, fetch_total)
            if span < best:
                best_k, best = k, span
        fetched = set(ranked[:best_k])
        self.since_split = 0 if fetched and best_k < len(ranked) else self.since_split + 1
        return sorted(fetched), [e for e in misses if e not in fetched]

    SPLIT_GAIN = 0.9  # split an expert only when the layer's span drops below this share of the unsplit one

    def split_expert(
        self, fetched: list[int], on_cpu: list[int], counts: list[int]
    ) -> tuple[list[int], list[int], dict[int, float]]:
        """One expert shared by both sides: its down projection and a share g of its gate/up rows cross PCIe, the
        CPU computes the other gate/up rows, the GPU finishes. A layer whose one or two misses each went wholly
        to one side leaves the other side idle; this balances it. Returns (fetch, cpu, {expert: g})."""
        misses = fetched + on_cpu
        if not misses:
            return fetched, on_cpu, {}
        link = {e: self.fetch_time(counts[e]) for e in misses}
        cpu = {e: self.cpu_time(counts[e], shared=True) for e in misses}
        span = max(sum(link[e] for e in fetched), sum(cpu[e] for e in on_cpu))
        best = None
        for e in misses:
            f0 = sum(link[x] for x in fetched if x != e)
            c0 = sum(cpu[x] for x in on_cpu if x != e)
            p, c = link[e], cpu[e]
            # link: f0 + p (1 + 2g) / 3; CPU: c0 + c 2 (1 - g) / 3; equal at g
            g = (c0 + 2 * c / 3 - f0 - p / 3) / (2 * p / 3 + 2 * c / 3)
            g = min(max(g, 0.0), 1.0)
            if g >= 0.95:
                continue  # that is a fetch
            s = max(f0 + p * (1 + 2 * g) / 3, c0 + c * 2 * (1 - g) / 3)
            if best is None or s < best[0]:
                best = (s, e, g)
        if best is None or best[0] >= self.SPLIT_GAIN * span:
            return fetched, on_cpu, {}
        _, e, g = best
        return [x for x in fetched if x != e], [x for x in on_cpu if x != e], {e: g}

    def crossover_tokens(self) -> int | None:
        """The fewest tokens at which fetching an expert beats computing it on the CPU (None: never, up to 64k)."""
        lo, hi = 1, 65536
        if not self.prefers_fetch(hi):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.prefers_fetch(mid) else (mid + 1, hi)
        return lo

    def describe(self) -> str:
        cross = self.crossover_tokens()
        at = [n for n, _ in self.cpu_points[1:]] or [128]
        cpu = ", ".join(f"{1e3 * self.cpu_time(n):.2f} at {n}" for n in at)
        at = [n for n, _ in self.gpu_points[1:]] or [2048]
        gpu = ", ".join(f"{1e3 * self.gpu_time(n):.3f} at {n}" for n in at)
        return (
            f"CPU expert {1e3 * self.cpu_time(1):.2f} ms at 1 token ({cpu}); "
            f"GPU expert {1e3 * self.gpu_time(1):.3f} ms ({gpu}); "
            f"host->GPU {self.h2d_gb_s:.1f} GB/s ({1e3 * self.expert_bytes / (self.h2d_gb_s * 1e9):.2f} ms per "
            f"expert); fetch beats CPU from {cross if cross else 'never (<=64k)'} tokens"
        )

    def as_dict(self) -> dict:
        """What is cached: the calibration, not the scales learned in one run."""
        d = asdict(self)
        d["cpu_points"] = [list(p) for p in self.cpu_points]
        d["gpu_points"] = [list(p) for p in self.gpu_points]
        for learned in ("alone_scale", "shared_scale", "since_split"):
            d.pop(learned)
        return d


def _interpolate(points: Sequence[tuple[int, float]], n: float) -> float:
    """Seconds at n tokens from (tokens, seconds) measured at increasing token counts: the first below them,
    linear between them, the last segment's slope (never negative) beyond them."""
    if len(points) == 1 or n <= points[0][0]:
        return points[0][1]
    for (n0, t0), (n1, t1) in zip(points, points[1:], strict=False):
        if n <= n1:
            return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
    (n0, t0), (n1, t1) = points[-2], points[-1]
    return t1 + max(0.0, (t1 - t0) / (n1 - n0)) * (n - n1)


def _fit_line(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares a + b*n through (n, seconds), both kept non-negative."""
    n = torch.tensor([p[0] for p in points], dtype=torch.float64)
    t = torch.tensor([p[1] for p in points], dtype=torch.float64)
    a_mat = torch.stack([torch.ones_like(n), n], dim=1)
    sol = torch.linalg.lstsq(a_mat, t[:, None]).solution.flatten()
    a, b = float(sol[0]), float(sol[1])
    if b < 0:
        a, b = float(t.mean()), 0.0
    return max(a, 0.0), b


def _time(fn: Callable[[], None], sync: Callable[[], None], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(
    key: str,
    host_experts: Sequence[Weights],
    act,
    device: torch.device,
    slot: Weights | None,
    token_counts_cpu: Sequence[int] = (1, 4, 16, 64, 128),
    token_counts_gpu: Sequence[int] = (1, 8, 64, 256, 2048),
    cpu_run: Callable[[Weights, torch.Tensor], None] | None = None,
    gpu_run: Callable[[Weights, torch.Tensor], None] | None = None,
    hidden: int | None = None,
    dtype: torch.dtype | None = None,
) -> CostModel:
    """Times experts on this machine. `host_experts` should span more bytes than the CPU's last-level cache
    (the caller rotates through several layers) so DRAM, not the cache, is measured. `slot`: GPU buffers for one
    expert (None: no fetching, GPU costs are left at zero). cpu_run(weights, x): how the CPU computes one expert
    (default: PyTorch's path, as `run_experts`); gpu_run(weights, x): how the GPU side computes one expert from a
    slot (default: the same products). hidden, dtype: the activations' (default: those of plain experts' gate).
    Weights are whatever tensors an expert is stored as (plain gate, up, down; or quantized tiles)."""
    gate0 = host_experts[0][0]
    hidden = hidden or gate0.shape[1]
    dtype = dtype or gate0.dtype
    expert_bytes = sum(w.numel() * w.element_size() for w in host_experts[0])
    one = [0]

    def run_on(weights: Weights, x: torch.Tensor) -> None:
        w = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        y = torch.zeros_like(x)
        run_experts(x, 1, w, torch.arange(x.shape[0], device=x.device), [x.shape[0]], one, lambda e: weights, act, y)

    run_cpu = cpu_run or run_on
    cpu_points = []
    nothing = lambda: None  # noqa: E731
    for n in token_counts_cpu:
        x = torch.randn(n, hidden, dtype=dtype)
        run_cpu(host_experts[0], x)  # warm-up (thread pool, kernels)
        times = []
        for weights in host_experts:
            times.append(_time(lambda w=weights, x=x: run_cpu(w, x), nothing, 1))
        times.sort()
        cpu_points.append((n, times[len(times) // 2]))
    cpu_s = _fit_line(cpu_points)
    points = tuple(cpu_points)

    if slot is None:
        return CostModel(key, expert_bytes, cpu_s, (0.0, 0.0), 1e-9, cpu_points=points)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else nothing

    def fetch(weights: Weights) -> None:
        for dst, src in zip(slot, weights, strict=True):
            dst.copy_(src, non_blocking=cuda)

    fetch(host_experts[0])
    h2d_s = min(_time(lambda w=w: fetch(w), sync, 1) for w in host_experts)
    gpu_points = []
    run_gpu = gpu_run or run_on
    for n in token_counts_gpu:
        x = torch.randn(n, hidden, dtype=dtype, device=device)
        run_gpu(slot, x)
        gpu_points.append((n, _time(lambda x=x: run_gpu(slot, x), sync, 3)))
    h2d = expert_bytes / h2d_s / 1e9
    return CostModel(
        key, expert_bytes, cpu_s, _fit_line(gpu_points), h2d, cpu_points=points, gpu_points=tuple(gpu_points)
    )


def cost_model_path(cache_dir: Path) -> Path:
    return cache_dir / "costmodel.json"


def load_cached(cache_dir: Path, key: str) -> CostModel | None:
    try:
        entry = json.loads(cost_model_path(cache_dir).read_text()).get(key)
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict):
        return None
    try:
        return from_dict(entry)
    except (KeyError, TypeError, ValueError):
        return None  # an older (no measured CPU points) or damaged entry: measure again


def from_dict(entry: dict) -> CostModel:
    """A cached entry (`CostModel.as_dict`) -> the model; KeyError / TypeError / ValueError if it is not one."""
    points = tuple((int(n), float(s)) for n, s in entry["cpu_points"])
    gpu = tuple((int(n), float(s)) for n, s in entry.get("gpu_points", ()))
    for p in (points, gpu):
        if any(b[0] <= a[0] for a, b in zip(p, p[1:], strict=False)):
            raise ValueError("points must be measured at increasing token counts")
    if not points:
        raise ValueError("no CPU points: a line fit of an older cadenza")
    return CostModel(
        key=entry["key"],
        expert_bytes=int(entry["expert_bytes"]),
        cpu_s=tuple(entry["cpu_s"]),
        gpu_s=tuple(entry["gpu_s"]),
        h2d_gb_s=float(entry["h2d_gb_s"]),
        cpu_points=points,
        gpu_points=gpu,
    )


def save_cached(cache_dir: Path, model: CostModel) -> None:
    _update(cost_model_path(cache_dir), model.key, model.as_dict())


PREFETCH_CANDIDATES = (0, 2048)  # bytes ahead the CPU kernel prefetches: none, or the best distance measured


def tune_prefetch(
    run: Callable[[Weights, torch.Tensor, int], None],
    host_experts: Sequence[Weights],
    hidden: int,
    dtype: torch.dtype,
    candidates: Sequence[int] = PREFETCH_CANDIDATES,
    rounds: int = 3,
) -> tuple[int, float]:
    """The CPU kernel's software prefetch distance for one-token calls, measured: `run(weights, x, prefetch)` over
    experts spanning more than the last-level cache, each candidate in turn, `rounds` times; the fastest wins if it
    beats the first candidate by 5% (the best distance differs by machine and format, and some machines are slowed
    by any: it is the machine's to say). Returns (distance, seconds per
    expert at one token with it): a direct measure of the CPU's decode speed, steadier than the cost model's
    line through 1, 16 and 128 tokens."""
    x = torch.randn(1, hidden, dtype=dtype)
    run(host_experts[0], x, candidates[0])  # warm-up (thread pool)
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for pf in candidates:  # interleaved, so a slow spell of the machine hits every candidate
            t0 = time.perf_counter()
            for weights in host_experts:
                run(weights, x, pf)
            best[pf] = min(best[pf], time.perf_counter() - t0)
    choice = min(candidates, key=best.__getitem__)
    if best[choice] >= 0.95 * best[candidates[0]]:
        choice = candidates[0]
    return choice, best[choice] / len(host_experts)


def prefetch_path(cache_dir: Path) -> Path:
    return cache_dir / "cpu_prefetch.json"


def load_prefetch(cache_dir: Path, key: str) -> tuple[int, float] | None:
    """(distance, seconds per expert at one token) measured earlier for this key, or None."""
    try:
        entry = json.loads(prefetch_path(cache_dir).read_text()).get(key)
        value = (int(entry["prefetch"]), float(entry["cpu_one_s"]))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None
    return value if value[0] >= 0 and value[1] > 0 else None


def save_prefetch(cache_dir: Path, key: str, value: tuple[int, float]) -> None:
    _update(prefetch_path(cache_dir), key, {"prefetch": value[0], "cpu_one_s": value[1]})


def _update(path: Path, key: str, value) -> None:
    """Sets data[key] = value in the JSON object at path, atomically; a read-only cache is left alone."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)  # atomic: a reader never sees half a file
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
