"""Where a model's expert work went: pairs and bytes per side, synchronisations, time in them, prefetch quality.

The Orchestra keeps one `ExpertCounters` (cadenza.moe.offload.orchestra); generations, the server's metrics and the
benchmarks take snapshots and differences. Work counted outside Python (the streamed CPU jobs' stats,
cadenza.moe.offload.streamed) is folded in through `pull` whenever the values are read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ExpertCounters:
    """Where expert work went: (token, expert) pairs per side, and expert weight bytes read per side."""

    gpu: int = 0
    cpu: int = 0
    fetched: int = 0
    host_bytes: int = 0  # experts read from host memory: computed on the CPU or fetched
    gpu_bytes: int = 0  # experts read from GPU memory: resident or fetched
    syncs: int = 0  # GPU->host synchronisations
    sync_wait_s: float = 0.0  # host time spent waiting in those synchronisations (the GPU's work before them)
    cpu_busy_s: float = 0.0  # the CPU worker's time computing experts
    cpu_wait_s: float = 0.0  # main-thread time waiting for the CPU worker after queueing the GPU's share
    # speculative prefetch (the next layer's router applied to this layer's hidden state): experts copied ahead,
    # how many of them the next layer used, and how many non-resident experts those layers needed
    prefetch_issued: int = 0  # copies started on a guess
    prefetch_guessed: int = 0  # guessed non-resident experts (copied now, or already in a slot)
    prefetch_used: int = 0
    prefetch_needed: int = 0
    cache_hits: int = 0  # fetched experts found in a slot (fetched lately or prefetched)
    cache_misses: int = 0  # fetched experts copied when needed
    split: int = 0  # (token, expert) pairs of experts shared by the CPU and the GPU (auto)

    # folds in work counted elsewhere (the streamed jobs') before a snapshot: set by the Orchestra
    pull: Callable[[ExpertCounters], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    def values(self) -> dict:
        if self.pull is not None:
            self.pull(self)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "pull"}

    def snapshot(self) -> ExpertCounters:
        return ExpertCounters(**self.values())

    def minus(self, other: ExpertCounters) -> ExpertCounters:
        return ExpertCounters(**{k: v - getattr(other, k) for k, v in self.values().items()})

    def add(self, other: ExpertCounters) -> None:
        """Adds what `other` counted (a captured step's work, once per replay)."""
        for name, value in other.values().items():
            setattr(self, name, getattr(self, name) + value)

    def prefetch_quality(self) -> dict[str, float | None]:
        """Precision (guessed experts that were used) and recall (needed experts that were guessed)."""
        p = self.prefetch_used / self.prefetch_guessed if self.prefetch_guessed else None
        r = self.prefetch_used / self.prefetch_needed if self.prefetch_needed else None
        return {"precision": p, "recall": r}

    def shares(self) -> dict[str, float]:
        total = self.gpu + self.cpu + self.fetched + self.split
        if not total:
            return {"gpu": 0.0, "cpu": 0.0, "fetched": 0.0, "split": 0.0}
        return {k: getattr(self, k) / total for k in ("gpu", "cpu", "fetched", "split")}
