"""Per MoE layer, per expert: run it resident on the GPU, compute it on the CPU, or fetch it to a GPU slot.

Every routed expert lives once in host memory (pinned, so fetches are DMA copies); the placement's residents
are also copied to the GPU. One MoE layer on the offloaded path:

1. the router's top-k ids and weights, and the hidden states, are copied to the host: the one GPU->host
   synchronisation of the layer;
2. the host groups tokens by expert and splits the non-resident experts between the CPU and fetching
   (`--offload-policy`: cpu, fetch, or auto: the cost model's split that finishes soonest, using the CPU and the
   PCIe link at once where that wins);
3. the CPU worker starts on its experts at once; meanwhile the main thread queues the family's shared experts (the
   `shared` callable, when the family has them), the resident experts and the fetches (copy stream) and their
   products on the GPU;
4. the CPU's partial sum is copied back (asynchronously, from a pinned buffer) and added, then the shared part.

A decode step of a few tokens under the cpu policy (and auto, where the CPU measured not much slower than the
link) skips steps 1-2: nothing is decided, so the CPU's share is queued on the GPU's stream as a host function
between copies (cadenza.moe.streamed) and the host never waits mid-step.

With the "GPU side" on the CPU (device cpu and a budget), the same code runs for tests: the emulated mode.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cadenza.errors import CadenzaError
from cadenza.models.common import act_fn
from cadenza.moe.adaptive import LivePopularity, plan_swaps
from cadenza.moe.cache import SlotCache
from cadenza.moe.costmodel import CostModel
from cadenza.moe.counters import ExpertCounters
from cadenza.moe.cpu import CpuWorker, physical_cores
from cadenza.moe.eviction import make_policy
from cadenza.moe.experts import Experts, expert_order, offsets, run_experts
from cadenza.moe.gpu_side import DECODE_MAX_TOKENS, ExpertLayout, decode_kernels_on
from cadenza.moe.placement import Placement
from cadenza.moe.streamed import StreamedCpu, unavailable_reason

POLICIES = ("auto", "cpu", "fetch")


def pin_host_memory(t: torch.Tensor) -> bool:
    """Page-locks a CPU tensor in place (cudaHostRegister), so copies from it are DMA and need no staging copy.
    Unlike `pin_memory()`, this neither copies nor rounds the allocation up to a power of two. The caller must
    `unpin_host_memory` it before the memory is freed (else a later allocation at the same address fails to
    register)."""
    if not torch.cuda.is_available():
        return False
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:
        cudart.cudaGetLastError()  # clear the sticky error, or the next kernel launch reports it
        return False
    return True


def unpin_host_memory(t: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostUnregister(t.data_ptr())) != 0:
        cudart.cudaGetLastError()


@dataclass
class Staging:
    """Pinned host buffers for one layer's hidden states, ids and weights going to the host."""

    x: torch.Tensor
    ids: torch.Tensor
    w: torch.Tensor
    guess: torch.Tensor | None = None


class LayerOffload:
    """The offloaded forward of one layer's `Experts`: attached as `experts.offload`."""

    def __init__(self, orchestra: Orchestra, experts: Experts, index: int):
        self.orch, self.experts, self.index = orchestra, experts, index
        self.layout = ExpertLayout.of(experts)
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

    def host_weights(self, e: int) -> tuple[torch.Tensor, ...]:
        return self.experts.host_weights(e)

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

    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        shared: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        orch = self.orch
        decode = orch.decode_kernels and x.shape[0] <= DECODE_MAX_TOKENS
        if decode and self.all_resident:  # nothing for the host to decide: no synchronisation
            y = self.layout.decode(x, self.row_lut[topk_ids], topk_weights, self.stacks)
            pairs = topk_ids.numel()
            orch.counters.gpu += pairs
            orch.counters.gpu_bytes += min(pairs, self.experts.num_experts) * orch.expert_bytes  # (at most)
            return y if shared is None else y + shared()
        if orch.streamed is not None and x.shape[0] <= DECODE_MAX_TOKENS:  # the CPU's share queued on the stream
            return orch.streamed.forward(self, x, topk_ids, topk_weights, shared)
        if orch.recorder is not None:  # a CUDA graph in capture: the host's part runs between two graphs
            return orch.recorder.host(lambda: self.offloaded(x, topk_ids, topk_weights, shared, decode), x)
        return self.offloaded(x, topk_ids, topk_weights, shared, decode)

    def offloaded(self, x, topk_ids, topk_weights, shared, decode: bool) -> torch.Tensor:
        """The layer's experts with the host deciding: the one synchronisation, the CPU's share, fetches."""
        orch, k = self.orch, topk_ids.shape[1]
        guess = orch.guess_next(self.index, x)  # the next layer's likely experts, for prefetch (or None)
        x_h, ids_h, w_h, guess_h = orch.to_host(x, topk_ids, topk_weights, guess)
        counts = torch.bincount(ids_h.reshape(-1), minlength=self.experts.num_experts).tolist()
        orch.live.observe(self.index, counts, x_h.shape[0])
        active = [e for e, n in enumerate(counts) if n]
        resident = [e for e in active if e in self.resident_rows]
        misses = [e for e in active if e not in self.resident_rows]
        # experts already in a fetch slot (fetched lately, or prefetched) cost no copy: they go to the GPU
        cached = [e for e in misses if orch.cache is not None and (self.index, e) in orch.cache.where]
        fetch, on_cpu, shares = orch.split([e for e in misses if e not in cached], counts)
        fetch = cached + fetch
        orch.account_prefetch(self.index, misses)
        inter = self.experts.intermediate_size
        # experts both sides work on: gate/up rows [0, r) and down cross PCIe, the CPU computes rows [r, I)
        split = {e: min(inter, int(g * inter) // 16 * 16) for e, g in shares.items()}

        job = None
        if on_cpu or split:
            out = self._out_buffer(x_h.shape[0], x.dtype)
            job = orch.worker.submit(
                self._cpu_job, x_h, k, w_h, ids_h, counts, on_cpu, out, bool(fetch or split), split
            )
        # the shared experts go to the GPU first, to run while the CPU computes its share
        y_shared = shared() if shared is not None else None
        # (token, slot) pairs grouped by expert on the GPU side; counts from the host slice it without a sync
        order = expert_order(topk_ids) if (resident or fetch) and not decode or split else None
        if decode and resident:  # one launch per matrix for all the layer's resident experts
            y = self.layout.decode(x, self.row_lut[topk_ids], topk_weights, self.stacks)
        else:
            y = torch.zeros_like(x)
            if resident:
                self.layout.run(x, k, topk_weights, order, counts, resident, self.resident_weights, y)
        if fetch:
            cache = orch.cache
            hits0, misses0 = cache.hits, cache.misses
            for i in range(0, len(fetch), cache.num_slots):  # waves of at most num_slots fetches
                wave = fetch[i : i + cache.num_slots]
                slots = {e: cache.get(self.index, e, self.host_weights(e)) for e in wave}
                if decode:
                    lut = torch.full((self.experts.num_experts,), -1, dtype=torch.int32)
                    for e, slot in slots.items():
                        lut[e] = slot
                    rows = lut.to(x.device, non_blocking=True)[topk_ids]
                    y += self.layout.decode(x, rows, topk_weights, cache.stacks)
                else:
                    self.layout.run(x, k, topk_weights, order, counts, wave, lambda e, s=slots: cache.weights(s[e]), y)
                for slot in slots.values():
                    cache.release(slot)
            orch.counters.cache_hits += cache.hits - hits0
            orch.counters.cache_misses += cache.misses - misses0
        halves = {}
        if split:  # the GPU's rows of the shared experts, while the CPU computes the others
            starts = offsets(counts)
            for e, r in split.items():
                slot = orch.cache.borrow()
                orch.cache.fill_rows(slot, self.host_weights(e), r)
                pairs = order[starts[e] : starts[e] + counts[e]]
                tokens = pairs // k
                h_gpu = None
                if r:
                    gate, up, _ = orch.cache.weights(slot)
                    xe = x[tokens]
                    h_gpu = self.experts.act_fn(xe @ gate[:r].T) * (xe @ up[:r].T)
                halves[e] = (slot, pairs, tokens, h_gpu)
        if guess_h is not None:  # this layer's needed copies are queued: start the next layer's likely ones
            orch.prefetch(self.index + 1, guess_h)
        if job is not None:
            t0 = time.perf_counter()
            y_cpu, h_cpu = job.result()
            orch.counters.cpu_wait_s += time.perf_counter() - t0
            if on_cpu:
                y += y_cpu.to(x.device, non_blocking=True) if x.device.type == "cuda" else y_cpu
            flat_w = topk_weights.reshape(-1)
            for e, (slot, pairs, tokens, h_gpu) in halves.items():
                rest = h_cpu[e].to(x.device, non_blocking=True)
                h = rest if h_gpu is None else torch.cat((h_gpu, rest), dim=1)
                ye = (h @ orch.cache.weights(slot)[2].T) * flat_w[pairs, None]
                y.index_add_(0, tokens, ye.to(y.dtype))
                orch.cache.give_back(slot)
        if y_shared is not None:
            y = y + y_shared

        c, eb = orch.counters, orch.expert_bytes
        c.gpu += sum(counts[e] for e in resident)
        c.fetched += sum(counts[e] for e in fetch)
        c.cpu += sum(counts[e] for e in on_cpu)
        c.split += sum(counts[e] for e in split)
        c.host_bytes += (len(fetch) + len(on_cpu) + len(split)) * eb
        c.gpu_bytes += (len(resident) + len(fetch)) * eb + sum((1 + 2 * r / inter) / 3 for r in split.values()) * eb
        return y

    def _out_buffer(self, t: int, dtype: torch.dtype) -> torch.Tensor:
        # Per layer, so the asynchronous copy of this layer's result never races the next layer's CPU job.
        if self.out is None or self.out.shape[0] < t or self.out.dtype != dtype:
            pin = self.orch.device.type == "cuda"
            self.out = torch.empty(max(t, 1), self.experts.hidden_size, dtype=dtype, pin_memory=pin)
        return self.out[:t]

    @torch.inference_mode()  # grad mode is per thread: the worker needs its own
    def _cpu_job(self, x_h, k, w_h, ids_h, counts, experts, out, shared: bool, split=None):
        """The CPU's share: the whole of `experts` summed into `out`, and for each split expert e the activations
        of its gate/up rows [r, I) for its tokens (in the order the GPU side groups them)."""
        t0 = time.perf_counter()
        h_cpu = {}
        use_kernel = self.kernel_layer is not None
        order = expert_order(ids_h) if split or (experts and not use_kernel) else None
        if split:
            starts = offsets(counts)
            for e, r in split.items():
                tokens = order[starts[e] : starts[e] + counts[e]] // k
                xe = x_h[tokens]
                gate, up, _ = self.host_weights(e)
                h_cpu[e] = self.experts.act_fn(xe @ gate[r:].T) * (xe @ up[r:].T)
        if experts and use_kernel:  # all of the layer's CPU experts in one parallel pass
            from cadenza.kernels.cpu_moe import moe_forward

            pf = self.orch.cpu_prefetch if x_h.shape[0] <= DECODE_MAX_TOKENS else 0
            act, threads = self.experts.hidden_act, self.orch.worker.threads
            y = moe_forward(self.kernel_layer, x_h, ids_h, w_h, experts, act, threads, prefetch=pf)
            out.copy_(y)
        elif experts:
            out.zero_()
            run_experts(x_h, k, w_h, order, counts, experts, self.host_weights, self.experts.act_fn, out)
        busy = time.perf_counter() - t0
        self.orch.counters.cpu_busy_s += busy
        inter = self.experts.intermediate_size
        if self.orch.cost is not None:  # the cost model learns the CPU's speed inside real steps
            work = len(experts) + sum(2 * (inter - r) / (3 * inter) for r in (split or {}).values())
            tokens = sum(counts[e] for e in experts) + sum(counts[e] for e in (split or {}))
            self.orch.cost.observe_cpu(work, tokens, busy, shared)
        return out, h_cpu


def host_tensors(experts: Experts) -> list[torch.Tensor]:
    """The host tensors a layer's routed experts live in (plain stacks, or the packed tiles)."""
    p = getattr(experts, "packed", None)
    return [experts.gate, experts.up, experts.down] if p is None else [p.gate_up, p.down]


class Orchestra:
    """Shared by every offloaded layer: placement, slot cache, CPU worker, cost model, counters."""

    def __init__(
        self,
        layers: list[Experts],
        device: torch.device,
        cpu_threads: int | None = None,
        routers: list[tuple[torch.Tensor, int] | None] | None = None,
        eviction: str = "lru",
        prefetch: bool | None = None,
        cpu_kernel: bool = True,
    ):
        """routers: per MoE layer, (router weight [E, H], top_k) for the speculative prefetch that guesses a layer's
        experts from the layer before (None: no guessing for that layer). prefetch: True / False, or None for the
        default: on with the fetch policy, off with auto (whose CPU + PCIe split counts on the link for the current
        layer's fetches; prefetching there moved work off the CPU and onto a saturated link in D1: 2.88 tok/s
        against 3.25)."""
        if not layers:
            raise ValueError("no MoE layers to offload")
        make_policy(eviction)  # refuse an unknown name now
        self.eviction, self.prefetch_on = eviction, prefetch
        # auto may share one expert of a layer between the CPU and the link (CADENZA_SPLIT_EXPERTS=1). Off by
        # default: measured on D1 it ran at 2.96 tok/s against 4.11 without, because the CPU's half (gate/up rows
        # through PyTorch, 26 GB/s) is far slower than the fused kernel's whole experts; it needs a kernel entry
        # that computes a row range of gate/up only.
        self.split_experts = os.environ.get("CADENZA_SPLIT_EXPERTS") == "1"
        self.routers = routers or [None] * len(layers)
        self._pending: dict[int, set[int]] = {}  # layer -> experts prefetched for it, not yet accounted
        self.live = LivePopularity(len(layers), layers[0].num_experts)
        self.device = device
        self.cuda = device.type == "cuda"
        first = layers[0]
        self.hidden, self.intermediate = first.hidden_size, first.intermediate_size
        self.layout = ExpertLayout.of(first)
        # the compute dtype of plain experts (None for quantized ones: their products run in the activations' dtype)
        self.dtype = first.gate.dtype if self.layout.plain else None
        one = first.host_weights(0)
        self.expert_parts = [(tuple(w.shape), w.dtype) for w in one]  # how one expert is stored (a fetch slot)
        self.expert_bytes = sum(w.numel() * w.element_size() for w in one)  # as stored: what a use reads
        self.layers = [LayerOffload(self, ex, i) for i, ex in enumerate(layers)]
        self.decode_kernels = decode_kernels_on(self.layout, device)
        # default: one core fewer than the machine has when a GPU is driven, so the main thread launching GPU
        # work never preempts one of the worker's threads (a GEMV waits for its slowest thread)
        self.worker = CpuWorker(cpu_threads or (max(1, physical_cores() - 1) if self.cuda else None))
        self._counters = ExpertCounters(pull=self._collect)
        # decode layers' CPU share launched from the stream (cpu, and auto where measured to pay; cadenza.moe.streamed),
        # or None and why not
        self.streamed: StreamedCpu | None = None
        self.stream_cpu = os.environ.get("CADENZA_STREAM_CPU") != "0"  # (read once: replans keep the choice)
        # the fused CPU kernel's software prefetch distance (bytes) for calls of a few tokens: measured on the
        # machine at first use (LLM._calibrate, costmodel.tune_prefetch), CADENZA_CPU_PREFETCH forces it
        self.cpu_prefetch = 0
        self.cpu_one_s: float | None = None  # one expert, one token, on the CPU with it (measured with it)
        self.streamed_reason: str | None = "no placement applied yet"
        self.recorder = None  # cadenza.graphs.Recorder while a decode step is captured
        # bumped by each apply() (through choose_streamed): captured steps refer to the resident tensors of one
        # placement and to one way of running the host's layers
        self.version = 0
        self.policy = "cpu"
        self.cache: SlotCache | None = None
        self.cost: CostModel | None = None
        self.placement: Placement | None = None
        self.pinned = False
        self._staging: Staging | None = None
        self._registered: list[torch.Tensor] = []
        if self.cuda:
            held = [w for ex in layers for w in host_tensors(ex)]
            for w in held:
                if pin_host_memory(w):
                    self._registered.append(w)
            self.pinned = len(self._registered) == len(held)
            self._event = torch.cuda.Event()
        for layer, ex in zip(self.layers, layers, strict=True):
            ex.offload = layer
        self.cpu_kernel = False
        if cpu_kernel:
            self.cpu_kernel = self._use_cpu_kernel()

    def _use_cpu_kernel(self) -> bool:
        """The fused CPU MoE kernel reads bf16 experts in place; other plain dtypes (and CPUs without AVX-512, with
        a one-line notice from the kernel module) keep PyTorch's path. Quantized experts always go through the
        kernel module (its torch fallback where the kernel cannot run)."""
        from cadenza.kernels import cpu_moe

        if not self.layout.plain:
            for layer in self.layers:
                layer.kernel_layer = layer.experts.packed
            return cpu_moe.available() and os.environ.get("CADENZA_CPU_KERNEL") != "0"
        if self.dtype != torch.bfloat16 or os.environ.get("CADENZA_CPU_KERNEL") == "0":
            return False
        if not cpu_moe.available() or self.layers[0].experts.hidden_act not in cpu_moe.ACT_CODES:
            return False
        for layer in self.layers:
            ex = layer.experts
            layer.kernel_layer = cpu_moe.plain_layer(ex.gate.data, ex.up.data, ex.down.data)
        return True

    def apply(self, placement: Placement, policy: str) -> None:
        """Copies the placement's residents to the GPU side and sizes the slot cache; replaces any earlier plan."""
        if policy not in POLICIES:
            raise CadenzaError(f"Unknown offload policy {policy!r}. Use one of: {', '.join(POLICIES)}.")
        self.placement, self.policy = placement, policy
        self._drop_streamed()
        for layer in self.layers:
            layer.place([])
        self.cache = None
        if self.cuda:
            torch.cuda.empty_cache()
        for layer, residents in zip(self.layers, placement.resident, strict=True):
            layer.place(residents)
        if placement.fetch_slots > 0:
            self.cache = SlotCache(
                placement.fetch_slots, device=self.device, eviction=self.eviction, parts=self.expert_parts
            )
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.choose_streamed()

    def choose_streamed(self) -> None:
        """Decides whether decode layers launch the CPU's share from the stream (cadenza.moe.streamed): after each
        placement, and once auto's cost model is known."""
        self._drop_streamed()
        self.streamed_reason = unavailable_reason(self, self.policy)
        if self.streamed_reason is None:
            self.streamed = StreamedCpu(self)
        self.version += 1  # captured steps refer to the old residents, or took the other path

    def _drop_streamed(self) -> None:
        if self.streamed is not None:
            self.streamed.collect(self._counters)
            self.streamed.close()
            self.streamed = None

    @property
    def counters(self) -> ExpertCounters:
        """Where expert work went so far (the streamed jobs' work folded in at each read and snapshot)."""
        self._collect(self._counters)
        return self._counters

    @counters.setter
    def counters(self, value: ExpertCounters) -> None:
        self._collect(self._counters)  # what the jobs did up to now belongs to the counters being replaced
        value.pull = self._collect
        self._counters = value

    def _collect(self, counters: ExpertCounters) -> None:
        if self.streamed is not None:
            self.streamed.collect(counters)

    def split(self, misses: list[int], counts: list[int]) -> tuple[list[int], list[int], dict[int, float]]:
        """Non-resident experts with tokens -> (fetch, compute on the CPU, {expert: share of its gate/up rows
        fetched} for experts both sides work on: auto only, when that shortens the layer)."""
        if not misses or self.cache is None or self.policy == "cpu":
            return [], misses, {}
        if self.policy == "fetch" or self.cost is None:
            return misses, [], {}
        fetch, on_cpu = self.cost.split(misses, counts)
        if not self.split_experts or not self.layout.plain:
            return fetch, on_cpu, {}
        return self.cost.split_expert(fetch, on_cpu, counts)

    PREFETCH_MAX_TOKENS = 8  # beyond a few tokens a layer needs most experts anyway: no guessing

    def guess_next(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """The experts layer index+1's router would pick for this layer's hidden states x [T, H] (ids [T, k]),
        computed on the GPU side so they reach the host with this layer's one synchronisation; None when there is
        nothing to prefetch (no fetch cache, no router, too many tokens, the next layer all resident)."""
        nxt = index + 1
        on = self.prefetch_on if self.prefetch_on is not None else self.policy == "fetch"
        if not on or self.cache is None or nxt >= len(self.layers) or self.routers[nxt] is None:
            return None
        if x.shape[0] > self.PREFETCH_MAX_TOKENS:
            return None
        if len(self.layers[nxt].resident_rows) == self.layers[nxt].experts.num_experts:
            return None
        weight, top_k = self.routers[nxt]
        return torch.topk(x @ weight.T, top_k, dim=-1).indices

    def prefetch(self, layer: int, guess_h: torch.Tensor) -> None:
        """Starts copying the guessed experts of `layer` (most often guessed first) into fetch slots, at most
        half the slots so a wrong guess cannot flush the cache."""
        offload = self.layers[layer]
        counts = torch.bincount(guess_h.reshape(-1), minlength=offload.experts.num_experts).tolist()
        wanted = sorted(
            (e for e, n in enumerate(counts) if n and e not in offload.resident_rows), key=lambda e: -counts[e]
        )
        issued = set()
        for e in wanted[: max(1, self.cache.num_slots // 2)]:
            if self.cache.prefetch(layer, e, offload.host_weights(e)):
                issued.add(e)
        self.counters.prefetch_issued += len(issued)
        guessed = issued | {e for e in wanted if (layer, e) in self.cache.where}
        self.counters.prefetch_guessed += len(guessed)
        self._pending[layer] = guessed

    def account_prefetch(self, layer: int, misses: list[int]) -> None:
        """Precision/recall bookkeeping once a layer's real experts are known."""
        guessed = self._pending.pop(layer, None)
        if guessed is None:
            return
        self.counters.prefetch_needed += len(misses)
        self.counters.prefetch_used += len(guessed.intersection(misses))

    def adapt(self, max_bytes: int, horizon: int = 2048) -> list:
        """Between requests: exchanges resident experts for more popular non-resident ones of the same layer,
        as live traffic asks (cadenza.moe.adaptive), copying at most max_bytes. Returns the swaps made."""
        if self.placement is None or self.cost is None:
            return []
        cost = self.cost
        host_s = cost.cpu_time(1) if self.policy != "fetch" else cost.fetch_time(1)
        if self.policy == "auto":
            host_s = min(host_s, cost.fetch_time(1))
        resident = [sorted(layer.resident_rows) for layer in self.layers]
        swaps = plan_swaps(
            self.live.shares(), resident, host_s, cost.gpu_time(1), self.expert_bytes / (cost.h2d_gb_s * 1e9),
            self.expert_bytes, max_bytes, horizon,
        )  # fmt: skip
        for sw in swaps:
            self.layers[sw.layer].swap(sw.out, sw.into)
        if swaps:  # (a swapped-in expert may also sit in a fetch slot: harmless, residents are looked up first)
            resident = [sorted(layer.resident_rows) for layer in self.layers]
            self.placement = dataclasses.replace(self.placement, resident=resident)
        return swaps

    def to_host(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, guess: torch.Tensor | None = None):
        """The layer's one GPU->host synchronisation: hidden states, ids and weights (and the prefetch guess)
        land in pinned buffers."""
        self.counters.syncs += 1
        if not self.cuda:
            return x, ids, w, guess
        t = x.shape[0]
        s = self._staging
        if s is None or s.x.shape[0] < t or s.x.dtype != x.dtype or s.ids.shape[1] != ids.shape[1]:
            n = max(t, 1)
            s = self._staging = Staging(
                torch.empty(n, x.shape[1], dtype=x.dtype, pin_memory=True),
                torch.empty(n, ids.shape[1], dtype=ids.dtype, pin_memory=True),
                torch.empty(n, w.shape[1], dtype=w.dtype, pin_memory=True),
            )
        x_h, ids_h, w_h = s.x[:t], s.ids[:t], s.w[:t]
        x_h.copy_(x, non_blocking=True)
        ids_h.copy_(ids, non_blocking=True)
        w_h.copy_(w, non_blocking=True)
        guess_h = None
        if guess is not None:
            if s.guess is None or s.guess.shape[0] < t or s.guess.shape[1] != guess.shape[1]:
                s.guess = torch.empty(max(t, 1), guess.shape[1], dtype=guess.dtype, pin_memory=True)
            guess_h = s.guess[:t]
            guess_h.copy_(guess, non_blocking=True)
        self._event.record()
        t0 = time.perf_counter()
        self._event.synchronize()
        self.counters.sync_wait_s += time.perf_counter() - t0
        return x_h, ids_h, w_h, guess_h

    def cpu_run_one(self, weights, x: torch.Tensor, prefetch: int | None = None) -> None:
        """One expert on the CPU as the CPU job computes it (for calibrating the cost model): through the kernel
        module (the fused kernel, or for quantized experts its fallback), else PyTorch's products. prefetch: the
        kernel's prefetch distance (default: the one in use for a few tokens)."""
        from cadenza.kernels.cpu_moe import moe_forward, plain_layer

        ids = torch.zeros(x.shape[0], 1, dtype=torch.int64)
        w = torch.ones(x.shape[0], 1)
        if self.layout.plain and not self.cpu_kernel:
            y = torch.zeros_like(x)
            run_experts(x, 1, w, torch.arange(x.shape[0]), [x.shape[0]], [0], lambda e: weights, self.act, y)
            return
        if self.layout.plain:
            gate, up, down = weights
            layer = plain_layer(gate[None], up[None], down[None])
        else:
            gate_up, down = weights
            packed = self.layers[0].experts.packed
            layer = dataclasses.replace(packed, num_experts=1, gate_up=gate_up[None], down=down[None])
        if prefetch is None:
            prefetch = self.cpu_prefetch if x.shape[0] <= DECODE_MAX_TOKENS else 0
        moe_forward(layer, x, ids, w, [0], self.layout.act, self.worker.threads, prefetch=prefetch)

    def gpu_run_one(self, weights, x: torch.Tensor) -> None:
        """One expert on the GPU side from a fetch slot's tensors, as a layer computes it (for calibration)."""
        n = x.shape[0]
        y = torch.zeros_like(x)
        w = torch.ones(n, 1, dtype=torch.float32, device=x.device)
        self.layout.run(x, 1, w, torch.arange(n, device=x.device), [n], [0], lambda e: weights, y)

    @property
    def format_name(self) -> str:
        """How experts are stored, for the cost model's key: the plain dtype, or the quantized format."""
        return str(self.dtype) if self.layout.plain else self.layout.describe()

    @property
    def act(self):
        return act_fn(self.layout.act)

    def calibration_experts(self, max_bytes: int = 1_500_000_000) -> list:
        """Experts from different layers, together larger than a CPU's last-level cache."""
        n = max(3, min(len(self.layers), max_bytes // max(self.expert_bytes, 1)))
        picks = [self.layers[(i * len(self.layers)) // n] for i in range(n)]
        return [layer.host_weights(i % layer.experts.num_experts) for i, layer in enumerate(picks)]

    def close(self) -> None:
        """Stops the worker, drops the GPU side's copies (residents, fetch slots) and unregisters the page-locked
        host memory (idempotent)."""
        self._drop_streamed()
        for layer in self.layers:
            layer.experts.offload = None
            layer.stacks, layer.row_lut = [], None
        self.cache = None
        self.worker.close()
        if self._registered:
            torch.cuda.synchronize(self.device)  # no copy may still read the memory
            for w in self._registered:
                unpin_host_memory(w)
            self._registered = []
