"""Layers split over several GPUs (cadenza.layer_split): one Orchestra a device, one CPU worker for all.

Each device's Orchestra owns its block of MoE layers: their residents and fetch slots on its GPU, its copy and
compute streams, its cost model (measured against its own link). The CPU computes every device's host experts with
one worker (at batch 1 a pipeline by layer keeps one device busy at a time, so the blocks never compete for it),
and the counters are one set, so a generation's stats read as with one GPU. `Stages` answers what the engine, the
LLM, the server and the benchmarks ask of an Orchestra.
"""

from __future__ import annotations

import contextlib

import torch

from cadenza.moe.cpu import CpuWorker, physical_cores
from cadenza.moe.devices import DeviceShare, merged
from cadenza.moe.experts import Experts
from cadenza.moe.offload import calibration
from cadenza.moe.offload.counters import ExpertCounters
from cadenza.moe.offload.options import OffloadOptions
from cadenza.moe.offload.orchestra import Orchestra
from cadenza.moe.placement import Placement


class Stages:
    """The Orchestras of a split, in device order."""

    def __init__(
        self,
        layers: list[Experts],
        devices: list[torch.device],
        ranges: list[range],
        options: OffloadOptions,
        routers: list | None = None,
    ):
        """layers, routers: every MoE layer's (loader.moe_layers, moe_routers); ranges: each device's MoE layers."""
        routers = routers or [None] * len(layers)
        # each GPU's streamed layers have a handoff thread spinning through a step: one core each left to them
        cuda = devices[0].type == "cuda"
        self.worker = CpuWorker(options.cpu_threads or (max(1, physical_cores() - len(devices)) if cuda else None))
        self.orchestras: list[Orchestra] = []
        for device, r in zip(devices, ranges, strict=True):
            with on(device):
                o = Orchestra(layers[r.start : r.stop], device, options, routers[r.start : r.stop], self.worker)
            self.orchestras.append(o)
        for o, after in zip(self.orchestras[:-1], self.orchestras[1:], strict=True):  # copies run ahead across blocks
            o.next_block = after
        for o in self.orchestras:
            o.first_block = self.orchestras[0]
        self.shares: list[DeviceShare] | None = None
        self._counters = ExpertCounters()
        self._share_counters()

    def _share_counters(self) -> None:
        """One set of counters for every device; each device's streamed jobs fold their work into it."""
        for o in self.orchestras:
            o._counters = self._counters
        self._counters.pull = self._collect

    def _collect(self, counters: ExpertCounters) -> None:
        for o in self.orchestras:
            o._collect(counters)

    # --- what callers of an Orchestra read ---------------------------------------------------------------------

    @property
    def counters(self) -> ExpertCounters:
        self._collect(self._counters)
        return self._counters

    @counters.setter
    def counters(self, value: ExpertCounters) -> None:
        self._collect(self._counters)
        self._counters = value
        self._share_counters()

    @property
    def placement(self) -> Placement | None:
        return merged(self.shares) if self.shares is not None else None

    @property
    def options(self) -> OffloadOptions:
        return self.orchestras[0].options

    @property
    def policy(self) -> str:
        return self.options.policy

    @property
    def cuda(self) -> bool:
        return self.orchestras[0].cuda

    @property
    def device(self) -> torch.device:
        return self.orchestras[0].device

    @property
    def version(self) -> int:
        return sum(o.version for o in self.orchestras)

    @property
    def cache(self):
        """The first device's fetch slots (None: none): whether the run fetches experts."""
        return next((o.cache for o in self.orchestras if o.cache is not None), None)

    @property
    def streamed(self):
        """The first device's streamed CPU share (every device decides alike)."""
        return self.orchestras[0].streamed

    @property
    def streamed_reason(self) -> str | None:
        return self.orchestras[0].streamed_reason

    @property
    def zero_copy_share(self) -> float:
        return self.orchestras[0].zero_copy_share

    @property
    def cpu_prefetch(self) -> int:
        """The CPU kernel's prefetch distance for decode (calibrated once per machine: every device has the same)."""
        return self.orchestras[0].cpu_prefetch

    @property
    def cpu_one_s(self) -> float | None:
        return self.orchestras[0].cpu_one_s

    @property
    def expert_bytes(self) -> int:
        """The largest layer's expert as stored (Orchestra.expert_bytes)."""
        return max(o.expert_bytes for o in self.orchestras)

    @property
    def wraps(self) -> bool:
        return self.orchestras[0].wraps

    @wraps.setter
    def wraps(self, value: bool) -> None:
        """Orchestra.wraps on every device (the last block's last layer copies the first block's first layer)."""
        for o in self.orchestras:
            o.wraps = value

    @property
    def layers(self) -> list:
        return [layer for o in self.orchestras for layer in o.layers]

    # --- what they do ------------------------------------------------------------------------------------------

    def apply(self, shares: list[DeviceShare], policy_name: str | None = None) -> None:
        """Each device's placement (cadenza.moe.devices); policy_name as Orchestra.apply's."""
        if len(shares) != len(self.orchestras):
            raise ValueError(f"{len(shares)} placements for {len(self.orchestras)} devices")
        for o, s in zip(self.orchestras, shares, strict=True):
            if len(s.placement.resident) != len(o.layers):
                raise ValueError(
                    f"GPU {s.device}'s placement has {len(s.placement.resident)} layers, not {len(o.layers)}"
                )
            with on(o.device):
                o.apply(s.placement, policy_name)
        self.shares = list(shares)

    def calibrate(self, dtype: torch.dtype) -> None:
        """Each device's cost model (its own link; the CPU's part is the same measurement, cached once)."""
        for o in self.orchestras:
            with on(o.device):  # (Triton launches on the current device)
                calibration.calibrate(o, o.device, dtype)

    def adapt(self, max_bytes: int) -> list:
        """Orchestra.adapt on each device, max_bytes shared in order."""
        swaps: list = []
        for o in self.orchestras:
            with on(o.device):
                made = o.adapt(max_bytes)
            max_bytes -= len(made) * o.expert_bytes
            swaps += made
            if max_bytes < o.expert_bytes:
                break
        if self.shares is not None:
            self.shares = [
                DeviceShare(s.device, s.first, s.stop, o.placement)
                for s, o in zip(self.shares, self.orchestras, strict=True)
            ]
        return swaps

    @contextlib.contextmanager
    def recording(self, recorder):
        """While a decode step is captured (cadenza.graphs): every device's host-deciding layers cut its graphs
        (Orchestra.recording)."""
        with contextlib.ExitStack() as stack:
            for o in self.orchestras:
                stack.enter_context(o.recording(recorder))
            yield

    def close(self) -> None:
        for o in self.orchestras:
            with on(o.device):
                o.close()
        self.worker.close()


def on(device: torch.device):
    """`device` current while a device's Orchestra works (its kernels and streams are that GPU's)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
