"""CPU experts launched from the CUDA stream: decode steps whose host layers need no synchronisation.

With the "cpu" policy nothing about a layer's experts is decided at run time: the residents are computed on the
GPU side, every other routed expert on the CPU. "auto" decodes the same way unless its cost model finds the link
much faster than the CPU (`policy.STREAM_MAX_CPU_OVER_LINK`); its many-token steps (prefill) keep fetching. So the host
need not look at the routing in the middle of a step, and a layer's CPU share can be queued like any GPU work
(ktransformers does the same):

    main stream:  router -> ids, w ─┬──────────────────── shared, residents (decode kernel, -1 rows skipped) ─┬─> y
    side stream:                    └─> x, ids, w to pinned staging -> the CPU's job -> y_cpu to the GPU ───────┘

The CPU's job is the fused CPU kernel's job for the layer (`cadenza.kernels.cpu_moe.job_new`): it reads the staged
ids and a per-layer mask of the experts not resident, computes them into a pinned buffer and returns; no CUDA call,
no Python, no GIL. Two ways to start it from the stream (`choose_launch` picks, `StreamedCpu.launch_reason` says):

- "worker" (where the driver's stream memory operations round-trip: `cadenza.kernels.handoff.probe`): a CPU thread
  of this Orchestra spins on a word of mapped pinned memory; the stream writes the job's number into it
  (cuStreamWriteValue32) and waits for the answer in it (cuStreamWaitValue32). x, ids and w are written by the GPU
  straight into one pinned block through its mapping, the result comes back in one copy (`handoff.Block`);
- "host_function": the job as a host function (cuLaunchHostFunc, run by the driver's callback thread), with its
  inputs copied into pinned buffers one by one: the fallback (slower per layer: `python -m cadenza.bench.handoff`).

Either way they are stream operations, so a CUDA graph captures them: with every host layer streamed, a decode step
is one graph (cadenza.graphs) and the host launches it and waits for nothing but the sampled token.

The job counts what it did in an int64 stats array (calls, tokens, pairs per side, experts per side, busy time,
routed pairs per expert, its last calls' start and end on perf_counter's clock); `collect` folds the differences
into the Orchestra's counters and live popularity whenever they are read.

Without CUDA (the emulated GPU side, "inline") the same job runs on the calling thread at the same point, so tests
cover everything but the stream.

Zero-copy share (`Orchestra.zero_copy_share`: CADENZA_ZERO_COPY=SHARE, or auto: `measure_direct` and
`policy.zero_copy_share` at calibration): of each token's n host pairs the GPU takes the first m in routing order
(m next to share * n, whichever ends the layer sooner: `split_host_pairs`) and computes them with the decode kernel
reading the experts' tiles straight from pinned host memory through its mapping (no copy, no slot: the layer's host
tensors are the kernel's stacks, indexed by expert id), while the CPU computes the others. The rule is computed on
the device, so a graph replays it. A layer of Mixtral with two host experts then costs the longer of one expert on
the CPU and one read over the link, not two on the CPU. The CPU's job sees a pair the GPU took as id + E:
counted, not computed.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

import numpy as np
import torch

from cadenza.kernels import cpu_moe, handoff
from cadenza.moe.offload.policy import choose_launch

RING = 64  # start/end times kept per layer (for the step profiler)
_STATS = 8  # fixed stats fields before the per-expert counts (cpu_moe.cpp)


# The worker's staging (handoff.Block): the GPU writes x, ids and w into the pinned block through its mapping (three
# small kernels and no copy, fenced by the request) and reads the result back with one copy. Reading the result
# through the mapping instead saves the copy node but has the adding kernel read host memory over PCIe:
# `python -m cadenza.bench.handoff` measures the three combinations ("worker", "worker_copies", "worker_mapped").
MAPPED_IN, MAPPED_OUT = True, False


_driver_fn = None


def _driver():
    """cuLaunchHostFunc(stream, fn, data) from the CUDA driver (always present where CUDA runs), or None."""
    global _driver_fn
    if _driver_fn is None:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuLaunchHostFunc
        except (OSError, AttributeError):
            return None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _driver_fn = fn
    return _driver_fn


def driver_available() -> bool:
    return _driver() is not None


@dataclass
class _Staging:
    """Pinned buffers for T tokens of one dtype, shared by every layer (the layers of a step run in turn)."""

    x: torch.Tensor  # [T, H]
    ids: torch.Tensor  # [T, k] int64
    w: torch.Tensor  # [T, k] float32
    y: torch.Tensor  # [T, H] float32: the CPU's sum
    y_dev: torch.Tensor  # [T, H] float32 on the GPU side


class StreamedCpu:
    """One Orchestra's streamed decode layers: staging per (tokens, dtype), a job per (layer, tokens, dtype)."""

    def __init__(self, orch):
        self.orch = orch
        self.cuda = orch.cuda
        self.num_experts = orch.layers[0].experts.num_experts
        width = _STATS + self.num_experts + 2 * RING
        self.stats = torch.zeros(len(orch.layers), width, dtype=torch.int64)
        self.expert_bytes = np.array([layer.expert_bytes for layer in orch.layers], dtype=np.int64)  # per layer
        self._stats = self.stats.numpy()  # the same memory, read without torch's dispatch
        self.seen = np.zeros((len(orch.layers), _STATS + self.num_experts), dtype=np.int64)
        self.staging: dict[tuple, _Staging | handoff.Block] = {}
        self.jobs: dict[tuple, int] = {}
        self.slots: dict[tuple, int] = {}  # job key -> its slot in the handoff worker
        self.stream = torch.cuda.Stream(orch.device) if self.cuda else None
        self.direct: dict[int, list | None] = {}  # layer -> its host tensors as zero-copy stacks (None: not had)
        self.zero_copy_reason: str | None = None
        self.fn = cpu_moe.job_function()
        forced = orch.options.stream_cpu == "host"
        problem = handoff.probe(orch.device) if self.cuda and not forced else None
        self.launch, self.launch_reason = choose_launch(self.cuda, forced, problem)
        self.host_function = _driver() if self.launch == "host_function" else None
        self.handoff: handoff.Worker | None = None
        if self.launch == "worker":
            self.memops = handoff.memops()
            self.handoff = handoff.Worker(pinned=True)
            with torch.cuda.device(orch.device):
                self.word = self.memops.device_pointer(self.handoff.state)  # the worker's word, as the GPU sees it

    def forward(self, layer, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, shared):
        """The layer's routed experts for a few tokens, residents on the GPU side and the rest on the CPU, with
        nothing read back to the host: x [T, H], topk_ids / topk_weights [T, k] -> [T, H] (plus `shared()`)."""
        st = self._staging(x.shape[0], topk_ids.shape[1], x.dtype)
        key, job = self._job(layer, st)
        share = self.orch.zero_copy_share
        direct = self._zero_copy_stacks(layer) if share > 0 else None
        ids_cpu, rows, rows_direct = topk_ids, None, None
        if direct is not None:  # (the residents' rows, -1 for a host expert, serve the split and the decode below)
            rows = layer.row_lut[topk_ids]
            ids_cpu, rows_direct = split_host_pairs(topk_ids, rows < 0, share, self.num_experts)
        if self.launch == "inline":  # the emulated GPU side: the same job, here and now
            st.x.copy_(x)
            st.ids.copy_(ids_cpu)
            st.w.copy_(topk_weights)
            cpu_moe.job_run(job)
            y_cpu = st.y_dev
        else:  # forked before the shared expert's kernels, so the CPU starts without waiting for them
            main = torch.cuda.current_stream(x.device)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                if self.launch == "worker":
                    st.put(x, ids_cpu, topk_weights)
                    self.memops.request(self.stream.cuda_stream, self.word, self._slot(key, job))
                    y_cpu = st.fetch()
                else:
                    st.x.copy_(x, non_blocking=True)
                    st.ids.copy_(ids_cpu.to(torch.int64), non_blocking=True)
                    st.w.copy_(topk_weights.to(torch.float32), non_blocking=True)
                    rc = self.host_function(self.stream.cuda_stream, self.fn, job)
                    if rc != 0:
                        raise RuntimeError(f"cuLaunchHostFunc failed ({rc})")
                    st.y_dev.copy_(st.y, non_blocking=True)
                    y_cpu = st.y_dev
        y_shared = shared() if shared is not None else None  # overlaps the CPU's share
        if layer.stacks:
            rows = layer.row_lut[topk_ids] if rows is None else rows
            y = layer.layout.decode(x, rows, topk_weights, layer.stacks)
        else:
            y = torch.zeros_like(x)
        if rows_direct is not None:  # the host experts the GPU took, read through the mapping
            y = y + layer.layout.decode(x, rows_direct, topk_weights, direct)
        if self.cuda:
            main.wait_stream(self.stream)
        y = y + y_cpu.to(y.dtype)  # (the order of the offloaded path's sums, so both give the same bits)
        return y if y_shared is None else y + y_shared

    def measure_direct(self, layer, dtype: torch.dtype, experts: int = 6) -> float | None:
        """Seconds for the GPU side to compute one of `layer`'s experts at one token reading it from host memory
        (the best of a few, each a different expert, so no cache holds it), or None where it cannot."""
        stacks = self._zero_copy_stacks(layer)
        if stacks is None:
            return None
        dev, n = self.orch.device, layer.experts.num_experts
        x = torch.randn(1, self.orch.hidden, dtype=dtype, device=dev)
        w = torch.ones(1, 1, dtype=torch.float32, device=dev)
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        layer.layout.decode(x, torch.zeros(1, 1, dtype=torch.int32, device=dev), w, stacks)  # compiled, warm
        best = float("inf")
        for e in range(1, min(n, experts + 1)):
            rows = torch.full((1, 1), e, dtype=torch.int32, device=dev)
            sync()
            t0 = time.perf_counter()
            layer.layout.decode(x, rows, w, stacks)
            sync()
            best = min(best, time.perf_counter() - t0)
        return best

    def _zero_copy_stacks(self, layer) -> list | None:
        """The layer's host tensors as the decode kernel's stacks (on CUDA: views through their device mapping), or
        None where they cannot be had (then the CPU computes every host pair, and `zero_copy_reason` says why)."""
        if layer.index in self.direct:
            return self.direct[layer.index]
        from cadenza.moe.offload.orchestra import host_tensors

        stacks = None
        tensors = host_tensors(layer.experts)
        e = layer.experts.num_experts
        shapes = [None if t is None else ((e, *t.shape[1:]), t.dtype) for t in tensors]
        if shapes != [((e, *shape), dtype) for shape, dtype in layer.parts]:  # the residents' stacks, row for row
            self.zero_copy_reason = "the host tensors are not stacks of the experts' parts"
        elif not self.cuda:
            stacks = tensors
        elif self.orch.host_memory is None or not self.orch.host_memory.complete:
            self.zero_copy_reason = "the host experts could not all be page-locked"
        else:
            try:
                ops = self.memops if self.launch == "worker" else handoff.memops()
                dev = self.orch.device
                stacks = [None if t is None else handoff.device_view(ops, t.contiguous(), dev) for t in tensors]
            except (RuntimeError, AttributeError) as e:
                self.zero_copy_reason = f"the host experts could not be mapped for the GPU ({e})"
        self.direct[layer.index] = stacks
        return stacks

    def _staging(self, t: int, k: int, dtype: torch.dtype) -> _Staging | handoff.Block:
        key = (t, k, dtype)
        st = self.staging.get(key)
        if st is None and self.launch == "worker":
            st = self.staging[key] = handoff.Block(
                t, k, self.orch.hidden, dtype, self.orch.device, self.memops, MAPPED_IN, MAPPED_OUT
            )
        elif st is None:
            h, pin = self.orch.hidden, self.cuda

            def host(*shape, dt=torch.float32):
                return torch.zeros(*shape, dtype=dt, pin_memory=pin)

            y = host(t, h)
            y_dev = torch.zeros(t, h, dtype=torch.float32, device=self.orch.device) if self.cuda else y
            st = self.staging[key] = _Staging(host(t, h, dt=dtype), host(t, k, dt=torch.int64), host(t, k), y, y_dev)
        return st

    def _job(self, layer, st: _Staging | handoff.Block) -> tuple[tuple, int]:
        key = (layer.index, *st.ids.shape, st.x.dtype)
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = cpu_moe.job_new(
                layer.kernel_layer,
                st.x,
                st.ids,
                st.w,
                layer.cpu_mask,
                layer.experts.hidden_act,
                self.orch.worker.threads,
                st.y,
                self.stats[layer.index],
                RING,
                prefetch=self.orch.cpu_prefetch,
                biases=layer.experts.kernel_biases(),
                activations=self.orch.options.cpu_activations,
            )
        return key, job

    def _slot(self, key: tuple, job: int) -> int:
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = self.handoff.add(self.fn, job)
        return slot

    def collect(self, counters) -> None:
        """Folds what the jobs did since the last call into `counters` (ExpertCounters) and live popularity."""
        if np.array_equal(self._stats[:, 0], self.seen[:, 0]):  # no job ran since (the common case: cheap)
            return
        now = self._stats[:, : self.seen.shape[1]].copy()
        d = now - self.seen
        self.seen = now
        failed = self.stats[:, 6].nonzero().view(-1).tolist()
        if failed:
            raise RuntimeError(f"the CPU expert job of layer {failed[0]} failed ({int(self.stats[failed[0], 6])})")
        eb = self.expert_bytes
        counters.cpu += int(d[:, 2].sum())
        counters.gpu += int(d[:, 3].sum())
        counters.host_bytes += int((d[:, 4].astype(np.int64) * eb).sum())
        counters.gpu_bytes += int((d[:, 7].astype(np.int64) * eb).sum())
        counters.cpu_busy_s += float(d[:, 5].sum()) * 1e-9
        for i in np.nonzero(d[:, 0])[0].tolist():
            self.orch.live.observe(i, d[i, _STATS:].tolist(), int(d[i, 1]))

    def intervals(self) -> list[tuple[int, int]]:
        """The jobs' last runs, [start, end) in perf_counter ns (at most RING per layer), oldest first."""
        out = []
        e = self.num_experts
        for row in self.stats:
            n = int(row[0])
            ring = row[_STATS + e :].view(RING, 2)
            out += [tuple(ring[i % RING].tolist()) for i in range(max(0, n - RING), n)]
        return sorted(out)

    def close(self) -> None:
        """Stops the handoff worker and frees the jobs (after the device has finished every step that could ask
        for them)."""
        if self.cuda:
            torch.cuda.synchronize(self.orch.device)
        if self.handoff is not None:
            self.handoff.close()
            self.slots.clear()
        for job in self.jobs.values():
            cpu_moe.job_free(job)
        self.jobs.clear()
        self.staging.clear()
        self.direct.clear()


def split_host_pairs(
    topk_ids: torch.Tensor, host: torch.Tensor, share: float, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which host pairs the GPU computes reading host memory: of each token's n host pairs (host [T, k] bool), the
    first m in routing order, m the whole number next to share * n (below or above) whose slower side finishes
    first, share being what the GPU would take of a divisible load (one expert costs the GPU (1 - share) / share of
    the CPU's time): 2 pairs at share 0.42 -> 1, 1 pair -> 0. -> (ids for the CPU's job, a taken pair's id +
    num_experts; rows [T, k] int32 for the zero-copy decode, the expert's id where taken, else -1). Device ops only:
    a graph replays them."""
    h = host.to(torch.int32)
    n = h.sum(dim=1, keepdim=True).to(torch.float32)
    lo = torch.floor(n * share)
    hi = torch.minimum(lo + 1, n)
    ratio = (1.0 - share) / share if share > 0 else float("inf")  # the GPU's time for one expert, in CPU times
    cost = lambda m: torch.maximum(m * ratio, n - m)  # noqa: E731
    m = torch.where(cost(hi) < cost(lo), hi, lo)
    take = host & (torch.cumsum(h, dim=1) <= m)
    ids_cpu = torch.where(take, topk_ids + num_experts, topk_ids)
    rows = torch.where(take, topk_ids, torch.full_like(topk_ids, -1)).to(torch.int32)
    return ids_cpu, rows
