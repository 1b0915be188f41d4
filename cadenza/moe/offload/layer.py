"""One offloaded MoE layer: its residents on the GPU side, and its call, routed by `policy.route`.

Attached to the layer's `Experts` as `experts.offload` by the Orchestra; `Experts.forward` hands every call here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import record_function

from cadenza.moe.experts import Experts
from cadenza.moe.gpu_side import ExpertLayout
from cadenza.moe.offload import eager, policy
from cadenza.moe.offload.cache import follows
from cadenza.moe.offload.policy import Route

EXPERTS_SPAN = "cadenza.experts"  # a micro-batch's layer call, on a timeline (cadenza.bench.timeline)


class LayerOffload:
    """The offloaded forward of one layer's `Experts`, and where its experts are."""

    def __init__(self, orchestra, experts: Experts, index: int):
        self.orch, self.experts, self.index = orchestra, experts, index
        self.layout = ExpertLayout.of(experts)
        self.grouped = self.layout.grouped(orchestra.device)  # many tokens in a few launches, no read-back
        one = experts.host_weights(0)
        self.parts = tuple((tuple(w.shape), w.dtype) for w in one)  # how an expert is stored (a fetch slot's view)
        self.expert_bytes = sum(w.numel() * w.element_size() for w in one)  # as stored: what a use reads
        self.resident_rows: dict[int, int] = {}
        # the residents' copies on the GPU side: one stack [R, ...] per tensor an expert is stored as (plain: gate,
        # up, down; quantized: gate/up tiles, down tiles), and each expert's row in them (-1: not resident), on
        # the GPU side, for the decode kernels
        self.stacks: list[torch.Tensor] = []
        self.row_lut: torch.Tensor | None = None
        # on the host, per expert: 1 where the CPU computes it (not resident), for the streamed decode's jobs
        self.cpu_mask = torch.ones(experts.num_experts, dtype=torch.uint8)
        self.out: torch.Tensor | None = None  # pinned [T, H] buffer for the CPU's partial sum
        # the fused CPU kernel's view of the host experts (bf16 read in place, or the packed quantized layer), or
        # None: PyTorch's path
        self.kernel_layer = None
        self._host: list[tuple[torch.Tensor, ...]] | None = None  # (host_weights)
        self._stacked: bool | None = None

    def host_weights(self, e: int) -> tuple[torch.Tensor, ...]:
        """Expert e's host tensors, as views made once (a big step's fetch waves ask for ~120 a layer, and each
        view costs ~1.5 us to make: half a T2 wave's bookkeeping)."""
        if self._host is None:
            self._host = [self.experts.host_weights(i) for i in range(self.experts.num_experts)]
        return self._host[e]

    @property
    def stacked(self) -> bool:
        """Whether each expert's host tensors follow the previous expert's in one allocation a part (a loaded or
        packed layer's stacks): the fetch slots then join consecutive experts into one copy unchecked."""
        if self._stacked is None:
            h = [self.host_weights(e) for e in range(self.experts.num_experts)]
            self._stacked = all(follows(a, b) for a, b in zip(h, h[1:], strict=False))
        return self._stacked

    def resident_weights(self, e: int) -> tuple[torch.Tensor, ...]:
        r = self.resident_rows[e]
        return tuple(s[r] for s in self.stacks)

    @property
    def all_resident(self) -> bool:
        return len(self.resident_rows) == self.experts.num_experts

    def swap(self, out: int, into: int) -> None:
        """Resident `out` leaves the GPU and `into` takes its row (copied on the compute stream, so it is ordered
        after every step that read the row). Between steps only."""
        r = self.resident_rows.pop(out)
        for dst, src in zip((s[r] for s in self.stacks), self.host_weights(into), strict=True):
            dst.copy_(src, non_blocking=True)
        self.resident_rows[into] = r
        self.row_lut[out] = -1
        self.row_lut[into] = r
        self.cpu_mask[out], self.cpu_mask[into] = 1, 0

    def place(self, residents: list[int]) -> None:
        self.stacks = []
        self.resident_rows = {e: r for r, e in enumerate(residents)}
        dev = self.orch.device
        lut = torch.full((self.experts.num_experts,), -1, dtype=torch.int32)
        for r, e in enumerate(residents):
            lut[e] = r
        self.row_lut = lut.to(dev)
        self.cpu_mask = (lut < 0).to(torch.uint8)
        if not residents:
            return
        self.stacks = [
            torch.empty((len(residents), *w.shape), dtype=w.dtype, device=dev) for w in self.host_weights(residents[0])
        ]
        for r, e in enumerate(residents):
            for dst, src in zip((s[r] for s in self.stacks), self.host_weights(e), strict=True):
                dst.copy_(src, non_blocking=True)

    def decode_residents(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, counts: list[int] | None = None
    ) -> torch.Tensor:
        """The resident experts' share of a few tokens, in one launch per matrix (non-resident pairs skipped).
        counts: the pairs of each expert of the layer, where the host knows them."""
        row_counts = None
        if counts is not None and self.takes_counts(x.shape[0]):  # (a decode step's few tokens: not built)
            row_counts = [0] * len(self.resident_rows)
            for e, r in self.resident_rows.items():
                row_counts[r] = counts[e]
        return self.decode_rows(x, self.row_lut[topk_ids], topk_weights, self.stacks, row_counts)

    def decode_rows(self, x, rows, topk_weights, stacks, row_counts: list[int] | None = None) -> torch.Tensor:
        """`layout.decode` of the pairs' rows of `stacks` (residents, fetch slots): grouped products past the decode
        kernels' few tokens where this layer has them. row_counts: how many pairs name each row of the stacks,
        where the host knows it (None: not known)."""
        grouped = self.takes_counts(x.shape[0])
        return self.layout.decode(x, rows, topk_weights, stacks, grouped, row_counts if grouped else None)

    def takes_counts(self, tokens: int) -> bool:
        """Whether a call of `tokens` tokens goes through the grouped products, which use the host's counts."""
        return self.grouped and tokens > policy.DECODE_MAX_TOKENS

    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        shared: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        orch = self.orch
        if not orch.concurrent:
            return self._call(x, topk_ids, topk_weights, shared)
        with orch.lock, record_function(EXPERTS_SPAN):  # another micro-batch may want the layer: finish this call first
            y = self._call(x, topk_ids, topk_weights, shared)
            if x.is_cuda:
                torch.cuda.current_stream(x.device).synchronize()
            return y

    def _call(self, x, topk_ids, topk_weights, shared) -> torch.Tensor:
        orch = self.orch
        tokens = x.shape[0]
        how = policy.route(
            tokens,
            orch.decode_kernels,
            self.all_resident,
            orch.streamed is not None,
            orch.recorder is not None,
            self.grouped,
        )
        if how is Route.GPU:  # nothing for the host to decide: no synchronisation
            y = self.decode_residents(x, topk_ids, topk_weights)
            pairs = topk_ids.numel()
            orch.counters.gpu += pairs
            orch.counters.gpu_bytes += min(pairs, self.experts.num_experts) * orch.expert_bytes  # (at most)
            return y if shared is None else y + shared()
        if how is Route.STREAMED:
            return orch.streamed.forward(self, x, topk_ids, topk_weights, shared)
        decode = policy.uses_decode_kernels(tokens, orch.decode_kernels, self.grouped)
        if how is Route.BETWEEN_GRAPHS:
            return orch.recorder.host(lambda: eager.offloaded(self, x, topk_ids, topk_weights, shared, decode), x)
        return eager.offloaded(self, x, topk_ids, topk_weights, shared, decode)

    def out_buffer(self, t: int, dtype: torch.dtype) -> torch.Tensor:
        """The CPU's partial sum for t tokens. Per layer, so the asynchronous copy of this layer's result never
        races the next layer's CPU job."""
        if self.out is None or self.out.shape[0] < t or self.out.dtype != dtype:
            pin = self.orch.device.type == "cuda"
            self.out = torch.empty(max(t, 1), self.experts.hidden_size, dtype=dtype, pin_memory=pin)
        return self.out[:t]

    def _cpu_job(self, *args):
        """The CPU's share on the worker (eager.cpu_job); a method, so a profiler can wrap it per layer."""
        return eager.cpu_job(self, *args)
