"""The state every offloaded layer shares: placement, fetch slots, CPU worker, cost model, counters.

The decisions live in `policy`; the executors in `layer` (routing a call), `eager` (the host deciding) and
`streamed` (the CPU's share queued on the stream). An Orchestra attaches a `LayerOffload` to each MoE layer's
`Experts` and detaches them in `close()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading

import torch

from cadenza.errors import CadenzaError
from cadenza.models.common import glu_fn
from cadenza.moe.cpu import CpuWorker, physical_cores
from cadenza.moe.experts import Experts, run_experts
from cadenza.moe.gpu_side import decode_kernels_on
from cadenza.moe.offload import policy
from cadenza.moe.offload.adaptive import LivePopularity, plan_swaps
from cadenza.moe.offload.cache import SlotCache
from cadenza.moe.offload.costmodel import CostModel
from cadenza.moe.offload.counters import ExpertCounters
from cadenza.moe.offload.eviction import make_policy
from cadenza.moe.offload.host_memory import PinnedWeights, ToHost
from cadenza.moe.offload.layer import LayerOffload
from cadenza.moe.offload.options import POLICIES, OffloadOptions
from cadenza.moe.offload.streamed import StreamedCpu, driver_available
from cadenza.moe.placement import Placement

__all__ = ["POLICIES", "Orchestra", "OffloadOptions", "host_tensors"]


def slot_parts(layers_parts: list[tuple]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """What a fetch slot holds: the layers' (shape, dtype) per tensor of an expert where every layer stores its
    experts alike, else each tensor's largest, flat (a slot cache views it per layer)."""
    first = layers_parts[0]
    if all(p == first for p in layers_parts):
        return list(first)
    out = []
    for j, (_, dt) in enumerate(first):
        if any(p[j][1] != dt for p in layers_parts):
            raise ValueError(f"expert tensor {j} is stored in different dtypes across layers")
        out.append(((max(math.prod(p[j][0]) for p in layers_parts),), dt))
    return out


def host_tensors(experts: Experts) -> list[torch.Tensor]:
    """The host tensors a layer's routed experts live in (plain stacks, or the packed tiles)."""
    p = getattr(experts, "packed", None)
    if p is None:
        return experts.stacks()
    return [p.gate_up, p.down] + ([experts.gate_bias, experts.up_bias, experts.down_bias] if experts.bias else [])


class Orchestra:
    """Shared by every offloaded layer: placement, slot cache, CPU worker, cost model, counters."""

    def __init__(
        self,
        layers: list[Experts],
        device: torch.device,
        options: OffloadOptions | None = None,
        routers: list[tuple[torch.Tensor, int] | None] | None = None,
        worker: CpuWorker | None = None,
    ):
        """options: how the user asked the experts to run (its policy is applied by `apply`). routers: per MoE
        layer, (router weight [E, H], top_k) for the speculative prefetch that guesses a layer's experts from the
        layer before (None: no guessing for that layer). worker: another Orchestra's CPU worker to share (layers
        split over several GPUs: one CPU computes every device's host experts; the owner closes it)."""
        if not layers:
            raise ValueError("no MoE layers to offload")
        self.options = options or OffloadOptions()
        make_policy(self.options.eviction)  # refuse an unknown name now
        self.routers = routers or [None] * len(layers)
        self._pending: dict[int, set[int]] = {}  # layer -> experts prefetched for it, not yet accounted
        self.live = LivePopularity(len(layers), layers[0].num_experts)
        self.device = device
        self.cuda = device.type == "cuda"
        self.layers = [LayerOffload(self, ex, i) for i, ex in enumerate(layers)]
        # layers may store experts in different formats (a GGUF's Q4_K_M mixes Q4_K and Q6_K): the largest layer's
        # is what calibration measures, the cost model prices and the planner sizes
        self.reference = max(self.layers, key=lambda layer: layer.expert_bytes)
        first = self.reference.experts
        self.hidden, self.intermediate = first.hidden_size, first.intermediate_size
        self.layout = self.reference.layout
        # the compute dtype of plain experts (None for quantized ones: their products run in the activations' dtype)
        self.dtype = first.stacks()[-1].dtype if self.layout.plain else None  # (down, or a bias: compute dtype)
        self.expert_parts = slot_parts([layer.parts for layer in self.layers])  # what a fetch slot holds
        self.expert_bytes = self.reference.expert_bytes  # as stored: what a use reads
        self.decode_kernels = decode_kernels_on(self.layout, device, self.options.gpu_kernel)
        # default: one core fewer than the machine has when a GPU is driven, so the main thread launching GPU
        # work never preempts one of the worker's threads (a GEMV waits for its slowest thread)
        threads = self.options.cpu_threads
        self.owns_worker = worker is None
        self.worker = worker or CpuWorker(threads or (max(1, physical_cores() - 1) if self.cuda else None))
        self._counters = ExpertCounters(pull=self._collect)
        # decode layers' CPU share launched from the stream (streamed.StreamedCpu), or None and why not
        self.streamed: StreamedCpu | None = None
        self.streamed_reason: str | None = "no placement applied yet"
        # the fused CPU kernel's software prefetch distance (bytes) for calls of a few tokens (calibration.py), and
        # one expert at one token on the CPU with it (None: not measured)
        self.cpu_prefetch = 0
        self.cpu_one_s: float | None = None
        # the GPU's share of each token's host experts, read from host memory in graph decode (streamed.py): the
        # option's, or under "auto" measured by calibration (0 until then)
        self.zero_copy_share = self.options.zero_copy or 0.0
        self.recorder = None  # cadenza.graphs.Recorder while a decode step is captured (`recording`)
        # micro-batches decoding in threads (Engine, --micro-batches): one layer call at a time, each finished on
        # its stream before the next starts (slots, staging buffers and counters are shared)
        self.concurrent = False
        self.lock = threading.Lock()
        # an offline job's passes (Engine.run_many): a big pass's last layer copies the first layer's experts ahead
        # for the next pass, which keeps the batch (`fetch_ahead`)
        self.wraps = False
        # where the layers are split over several GPUs (Stages): the next block's Orchestra, whose first layer follows
        # this one's last, and the first block's, whose first layer a wrapping pass's last layer copies ahead
        self.next_block: Orchestra | None = None
        self.first_block: Orchestra = self
        # bumped by each apply() (through choose_streamed): captured steps refer to the resident tensors of one
        # placement and to one way of running the host's layers
        self.version = 0
        self.cache: SlotCache | None = None
        self.cost: CostModel | None = None
        self.placement: Placement | None = None
        self.to_host = ToHost(self.cuda)
        self.host_memory = PinnedWeights([w for ex in layers for w in host_tensors(ex)], device) if self.cuda else None
        for layer, ex in zip(self.layers, layers, strict=True):
            ex.offload = layer
        self.cpu_kernel = self._use_cpu_kernel()

    @property
    def policy(self) -> str:
        return self.options.policy

    @property
    def pinned(self) -> bool:
        """Whether every host expert is page-locked (fetches are DMA copies)."""
        return self.host_memory is not None and self.host_memory.complete

    def _use_cpu_kernel(self) -> bool:
        """The fused CPU MoE kernel reads bf16 experts in place; other plain dtypes (and CPUs without AVX-512, with
        a one-line notice from the kernel module) keep PyTorch's path. Quantized experts always go through the
        kernel module (its torch fallback where the kernel cannot run)."""
        from cadenza.kernels import cpu_moe

        if not self.layout.plain:
            for layer in self.layers:
                layer.kernel_layer = layer.experts.packed
            return cpu_moe.available() and self.options.cpu_kernel
        if self.dtype != torch.bfloat16 or not self.options.cpu_kernel:
            return False
        if not cpu_moe.available() or not self.layout.kernel_math:
            return False
        for layer in self.layers:
            ex = layer.experts
            layer.kernel_layer = cpu_moe.plain_layer(ex.gate.data, ex.up.data, ex.down.data)
        return True

    def apply(self, placement: Placement, policy_name: str | None = None) -> None:
        """Copies the placement's residents to the GPU side and sizes the slot cache; replaces any earlier plan.
        policy_name: another offload policy from now on (None: keep the options')."""
        if policy_name is not None:
            if policy_name not in POLICIES:
                raise CadenzaError(f"Unknown offload policy {policy_name!r}. Use one of: {', '.join(POLICIES)}.")
            self.options = self.options.with_policy(policy_name)
        self.placement = placement
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
                placement.fetch_slots, device=self.device, eviction=self.options.eviction, parts=self.expert_parts
            )
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.choose_streamed()

    def choose_streamed(self) -> None:
        """Decides whether decode layers launch the CPU's share from the stream (policy.stream_unavailable): after
        each placement, and once auto's cost model is known."""
        self._drop_streamed()
        self.streamed_reason = policy.stream_unavailable(
            self.options, self.cpu_kernel, self.cuda, driver_available(), self.cost, self.cpu_one_s
        )
        if self.streamed_reason is None:
            self.streamed = StreamedCpu(self)
        self.version += 1  # captured steps refer to the old residents, or took the other path

    def _drop_streamed(self) -> None:
        if self.streamed is not None:
            self.streamed.collect(self._counters)
            self.streamed.close()
            self.streamed = None

    @contextlib.contextmanager
    def recording(self, recorder):
        """While a decode step is captured as CUDA graphs: host-deciding layers run through `recorder.host`, between
        two graphs."""
        self.recorder = recorder
        try:
            yield
        finally:
            self.recorder = None

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

    def guess_next(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """The experts layer index+1's router would pick for this layer's hidden states x [T, H] (ids [T, k]),
        computed on the GPU side so they reach the host with this layer's one synchronisation; None when there is
        nothing to prefetch (policy.wants_guess)."""
        nxt = index + 1
        exists = nxt < len(self.layers)
        if not policy.wants_guess(
            policy.prefetch_on(self.options),
            self.cache is not None,
            exists,
            exists and self.routers[nxt] is not None,
            x.shape[0],
            exists and self.layers[nxt].all_resident,
        ):
            return None
        weight, top_k = self.routers[nxt]
        # in the router's dtype: GLM-4.5 keeps its router weight in float32 (a no-op for the other families)
        return torch.topk(x.to(weight.dtype) @ weight.T, top_k, dim=-1).indices

    def prefetch(self, layer: int, guess_h: torch.Tensor) -> None:
        """Starts copying the guessed experts of `layer` into fetch slots (policy.prefetch_picks)."""
        offload = self.layers[layer]
        counts = torch.bincount(guess_h.reshape(-1), minlength=offload.experts.num_experts).tolist()
        wanted = [e for e, n in enumerate(counts) if n and e not in offload.resident_rows]
        self._copy_ahead(layer, policy.prefetch_picks(counts, offload.resident_rows, self.cache.num_slots), wanted)

    def _copy_ahead(self, layer: int, picks: list[int], wanted: list[int]) -> None:
        """Starts the copies of `picks` (experts of `layer`) into fetch slots and books them: the guess (`wanted`:
        what the layer is expected to need, cached or copied now) is checked by `account_prefetch`."""
        offload = self.layers[layer]
        issued = set(self.cache.prefetch_many(layer, picks, offload.host_weights, offload.stacked))
        self.counters.prefetch_issued += len(issued)
        guessed = issued | {e for e in wanted if (layer, e) in self.cache.where}
        self.counters.prefetch_guessed += len(guessed)
        self._pending[layer] = guessed

    def fetch_ahead(self, index: int, tokens: int, top_k: int) -> None:
        """After layer `index` queued its copies: the next layer's non-resident experts, as many as the slots hold,
        copied ahead when a step of `tokens` wants them all (policy.fetch_ahead), in the order its waves take them
        (cached first, then by id). Each copy waits for the slot's last reader. Not while micro-batches decode: the
        next micro-batch calls this same layer next, and finds its experts in the slots only if nothing evicts them.
        In an offline job (`wraps`) the last layer's next is the next pass's first: otherwise the link idles from
        the last layer's copies to the first layer's (the LM head, sampling, the next step's launches: 11-14 ms a
        step in session 26's T1 timeline, ~3%); at the job's end that costs one layer's copies, unused. Where the
        layers are split over several GPUs, a block's last layer copies the next block's first (on that GPU's link,
        idle until then), and the last block's wraps to the first block's."""
        if index + 1 < len(self.layers):
            self._fetch_layer_ahead(index + 1, tokens, top_k)
            return
        after = self.next_block or (self.first_block if self.wraps else None)
        if after is not None and not self.concurrent:
            with torch.cuda.device(after.device) if after.cuda else contextlib.nullcontext():
                after._fetch_layer_ahead(0, tokens, top_k)

    def _fetch_layer_ahead(self, nxt: int, tokens: int, top_k: int) -> None:
        """fetch_ahead's copies of layer `nxt` (of this Orchestra), where policy.fetch_ahead wants them."""
        if self.cache is None or self.concurrent or not policy.fetch_ahead(
            self.options, True, True, self.layers[nxt].all_resident, tokens, top_k,
            self.layers[nxt].experts.num_experts,
        ):  # fmt: skip
            return
        offload = self.layers[nxt]
        missing = [e for e in range(offload.experts.num_experts) if e not in offload.resident_rows]
        self._copy_ahead(nxt, missing[: self.cache.num_slots], missing[: self.cache.num_slots])

    def account_prefetch(self, layer: int, misses: list[int]) -> None:
        """Precision/recall bookkeeping once a layer's real experts are known."""
        guessed = self._pending.pop(layer, None)
        if guessed is None:
            return
        self.counters.prefetch_needed += len(misses)
        self.counters.prefetch_used += len(guessed.intersection(misses))

    def adapt(self, max_bytes: int, horizon: int = 2048) -> list:
        """Between requests: exchanges resident experts for more popular non-resident ones of the same layer,
        as live traffic asks (cadenza.moe.offload.adaptive), copying at most max_bytes. Returns the swaps made."""
        if self.placement is None or self.cost is None:
            return []
        cost = self.cost
        host_s = policy.host_seconds_per_expert(self.policy, cost)
        resident = [sorted(layer.resident_rows) for layer in self.layers]
        swaps = plan_swaps(
            self.live.shares(),
            resident,
            host_s,
            cost.gpu_time(1),
            self.expert_bytes / (cost.h2d_gb_s * 1e9),
            self.expert_bytes,
            max_bytes,
            horizon,
        )
        for sw in swaps:
            self.layers[sw.layer].swap(sw.out, sw.into)
        if swaps:  # (a swapped-in expert may also sit in a fetch slot: harmless, residents are looked up first)
            resident = [sorted(layer.resident_rows) for layer in self.layers]
            self.placement = dataclasses.replace(self.placement, resident=resident)
        return swaps

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
        biases = None
        if not self.layout.plain:
            gate_up, down, *bias = weights  # gpt-oss: then the expert's gate, up and down biases
            packed = self.reference.experts.packed
            layer = dataclasses.replace(packed, num_experts=1, gate_up=gate_up[None], down=down[None])
            biases = tuple(b[None].float() for b in bias) if bias else None
        if prefetch is None:
            prefetch = policy.cpu_prefetch_for(x.shape[0], self.cpu_prefetch)
        moe_forward(
            layer, x, ids, w, [0], self.layout.act, self.worker.threads, prefetch=prefetch, biases=biases,
            activations=self.options.cpu_activations,
        )  # fmt: skip

    def gpu_run_one(self, weights, x: torch.Tensor) -> None:
        """One expert on the GPU side from a fetch slot's tensors, as a layer computes it (for calibration)."""
        n = x.shape[0]
        y = torch.zeros_like(x)
        w = torch.ones(n, 1, dtype=torch.float32, device=x.device)
        self.layout.run(x, 1, w, torch.arange(n, device=x.device), [n], [0], lambda e: weights, y)

    @property
    def format_name(self) -> str:
        """How experts are stored, for the cost model's key: the plain dtype, or the quantized format."""
        if not self.layout.plain:
            return self.layout.describe()
        storage = getattr(self.layers[0].experts, "storage", "plain")  # gpt-oss keeps MXFP4 blocks
        return str(self.dtype) if storage == "plain" else f"{storage}/{self.dtype}"

    @property
    def act(self):
        return glu_fn(self.layout.act)

    def calibration_experts(self, max_bytes: int = 1_500_000_000) -> list:
        """Experts from different layers stored as the reference layer's, together larger than a CPU's last-level
        cache."""
        like = [layer for layer in self.layers if layer.parts == self.reference.parts]
        n = max(3, min(len(like), max_bytes // max(self.expert_bytes, 1)))
        picks = [like[(i * len(like)) // n] for i in range(n)]
        return [layer.host_weights(i % layer.experts.num_experts) for i, layer in enumerate(picks)]

    def close(self) -> None:
        """Stops the worker, drops the GPU side's copies (residents, fetch slots) and unregisters the page-locked
        host memory (idempotent)."""
        self._drop_streamed()
        for layer in self.layers:
            layer.experts.offload = None
            layer.stacks, layer.row_lut = [], None
        self.cache = None
        if self.owns_worker:
            self.worker.close()
        if self.host_memory is not None:
            self.host_memory.release()
