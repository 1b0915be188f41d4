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

import torch

from cadenza.moe.experts import run_experts

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class CostModel:
    key: str
    expert_bytes: int
    cpu_s: tuple[float, float]  # seconds = a + b * tokens, one expert on the CPU
    gpu_s: tuple[float, float]  # the same on the GPU
    h2d_gb_s: float  # pinned host -> GPU copy bandwidth, GB/s
    # how much slower each side runs while the other also reads host memory (CPU experts and PCIe fetches share
    # the DRAM bandwidth); >= 1
    both_slowdown: float = 1.0

    def cpu_time(self, n: int) -> float:
        return self.cpu_s[0] + self.cpu_s[1] * n

    def gpu_time(self, n: int) -> float:
        return self.gpu_s[0] + self.gpu_s[1] * n

    def fetch_time(self, n: int) -> float:
        return self.expert_bytes / (self.h2d_gb_s * 1e9) + self.gpu_time(n)

    def prefers_fetch(self, n: int) -> bool:
        return self.fetch_time(n) < self.cpu_time(n)

    def split(self, misses: list[int], counts: list[int]) -> tuple[list[int], list[int]]:
        """Non-resident experts of one layer -> (fetch, compute on the CPU), chosen so the layer's expert work
        ends soonest: the CPU works through its list while the copy engine streams the other experts' weights.
        Greedy: start with everything on the CPU, move the expert that gains most from fetching while that
        shortens the span (counting the slowdown of sharing DRAM when both sides work)."""
        cpu = {e: self.cpu_time(counts[e]) for e in misses}
        fetch = {e: self.fetch_time(counts[e]) for e in misses}
        on_cpu, fetched = set(misses), []
        cpu_total, fetch_total = sum(cpu.values()), 0.0
        span = cpu_total
        while on_cpu:
            e = max(on_cpu, key=lambda x: (cpu[x] - fetch[x], -x))
            c, f = cpu_total - cpu[e], fetch_total + fetch[e]
            new_span = max(c, f) * (self.both_slowdown if c > 0 and f > 0 else 1.0)
            if new_span >= span:
                break
            on_cpu.remove(e)
            fetched.append(e)
            cpu_total, fetch_total, span = c, f, new_span
        return sorted(fetched), [e for e in misses if e in on_cpu]

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
        return (
            f"CPU expert {1e3 * self.cpu_time(1):.2f} ms at 1 token, +{1e6 * self.cpu_s[1]:.1f} us per token; "
            f"GPU expert {1e3 * self.gpu_time(1):.3f} ms, +{1e6 * self.gpu_s[1]:.2f} us per token; "
            f"host->GPU {self.h2d_gb_s:.1f} GB/s ({1e3 * self.expert_bytes / (self.h2d_gb_s * 1e9):.2f} ms per "
            f"expert); fetch beats CPU from {cross if cross else 'never (<=64k)'} tokens; both at once run "
            f"{self.both_slowdown:.2f}x slower each"
        )

    def as_dict(self) -> dict:
        return asdict(self)


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
    token_counts_cpu: Sequence[int] = (1, 16, 128),
    token_counts_gpu: Sequence[int] = (1, 256, 2048),
) -> CostModel:
    """Times experts on this machine. `host_experts` should span more bytes than the CPU's last-level cache
    (the caller rotates through several layers) so DRAM, not the cache, is measured. `slot`: GPU buffers for one
    expert (None: no fetching, GPU costs are left at zero)."""
    gate0 = host_experts[0][0]
    hidden, dtype = gate0.shape[1], gate0.dtype
    expert_bytes = sum(w.numel() * w.element_size() for w in host_experts[0])
    one = [0]

    def run_on(weights: Weights, x: torch.Tensor) -> None:
        w = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        y = torch.zeros_like(x)
        run_experts(x, 1, w, torch.arange(x.shape[0], device=x.device), [x.shape[0]], one, lambda e: weights, act, y)

    cpu_points = []
    nothing = lambda: None  # noqa: E731
    for n in token_counts_cpu:
        x = torch.randn(n, hidden, dtype=dtype)
        run_on(host_experts[0], x)  # warm-up (thread pool, kernels)
        times = []
        for weights in host_experts:
            times.append(_time(lambda w=weights, x=x: run_on(w, x), nothing, 1))
        times.sort()
        cpu_points.append((n, times[len(times) // 2]))
    cpu_s = _fit_line(cpu_points)

    if slot is None:
        return CostModel(key, expert_bytes, cpu_s, (0.0, 0.0), 1e-9)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else nothing

    def fetch(weights: Weights) -> None:
        for dst, src in zip(slot, weights, strict=True):
            dst.copy_(src, non_blocking=cuda)

    fetch(host_experts[0])
    h2d_s = min(_time(lambda w=w: fetch(w), sync, 1) for w in host_experts)
    gpu_points = []
    for n in token_counts_gpu:
        x = torch.randn(n, hidden, dtype=dtype, device=device)
        run_on(slot, x)
        gpu_points.append((n, _time(lambda x=x: run_on(slot, x), sync, 3)))
    slowdown = _both_slowdown(host_experts, run_on, fetch, sync, hidden, dtype) if cuda else 1.0
    return CostModel(key, expert_bytes, cpu_s, _fit_line(gpu_points), expert_bytes / h2d_s / 1e9, slowdown)


def _both_slowdown(host_experts, run_on, fetch, sync, hidden, dtype) -> float:
    """Times a CPU expert and a fetch alone, then together (the fetch in a second thread, as the scheduler
    overlaps them); returns the larger ratio together / alone."""
    import threading

    x = torch.randn(1, hidden, dtype=dtype)
    a, b = host_experts[0], host_experts[len(host_experts) // 2]
    cpu_alone = min(_time(lambda: run_on(a, x), lambda: None, 1) for _ in range(3))
    fetch_alone = min(_time(lambda: fetch(b), sync, 1) for _ in range(3))
    ratios = []
    for _ in range(3):
        done: dict[str, float] = {}

        def copier(done: dict[str, float] = done) -> None:
            t0 = time.perf_counter()
            fetch(b)
            sync()
            done["fetch"] = time.perf_counter() - t0

        th = threading.Thread(target=copier)
        th.start()
        t0 = time.perf_counter()
        run_on(a, x)
        cpu_t = time.perf_counter() - t0
        th.join()
        ratios.append(max(cpu_t / cpu_alone, done["fetch"] / fetch_alone))
    return max(1.0, sorted(ratios)[1])


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
        return CostModel(
            key=entry["key"],
            expert_bytes=int(entry["expert_bytes"]),
            cpu_s=tuple(entry["cpu_s"]),
            gpu_s=tuple(entry["gpu_s"]),
            h2d_gb_s=float(entry["h2d_gb_s"]),
            both_slowdown=float(entry.get("both_slowdown", 1.0)),
        )
    except (KeyError, TypeError, ValueError):
        return None  # an older or damaged entry: measure again


def save_cached(cache_dir: Path, model: CostModel) -> None:
    path = cost_model_path(cache_dir)
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[model.key] = model.as_dict()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)  # atomic: a reader never sees half a file
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
