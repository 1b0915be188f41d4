"""CUDA graphs of the decode step: the GPU work of a one-token step recorded once and replayed.

A Python engine that launches a few hundred small kernels per token one by one spends milliseconds on launching
alone; a graph replays them in one call. A captured step (`Captured`) is fixed in shape, so steps are grouped by
batch size and by a bucket of the cache length (`LENGTH_BUCKET` positions): the attention reads the cache up to
the bucket's end, and the mask hides positions past each row's length. The tokens, the rows' cache slots and
their positions live in static device tensors written before each replay (`AttentionContext.static`); nothing in
the step reads a value back to the host.

A MoE layer whose experts are all resident on the GPU runs inside the graph (the indexed decode kernels of
cadenza.moe.gpu_side), and so does a layer whose CPU share is launched from the stream (the cpu policy with the
fused CPU kernel: cadenza.moe.offload.streamed): its copies and its host function are graph nodes. A layer that
needs the host to decide in the middle of the step (the fetch and auto policies: fetched or prefetched experts)
splits it: the graph so far ends at the layer's expert call, the layer's offloaded forward runs eagerly on replay
(its one synchronisation, the CPU's share, the fetches) into a static output, and the next graph starts after it. So a
step is a list of segments, graphs and host calls, replayed in order; with every expert resident, or the CPU's
share streamed, it is one graph.

Where the layers are split over several GPUs (cadenza.layer_split), a graph's kernels stay on one device: the
step is cut at each block boundary too (`Recorder.crossing`). The hidden state and the few tensors of the pass's
context that the next block reads get static copies on its GPU, refreshed by an eager copy between the two graphs
(PyTorch orders a copy between devices after the source stream's work and before the destination's), and each
segment replays with its device current. Each device has its own capture stream and memory pool. So a split step
is one graph per GPU segment, plus the host segments its layers need.

Replays need the captured tensors to stay where they are: a new placement (`Orchestra.apply`: resident stacks
reallocated) drops every graph (`Orchestra.version`); swaps between steps rewrite rows in place and keep them.
Eager execution is the fallback wherever a graph cannot be used (`StepGraphs.reason` says why): a CPU device, the
emulated GPU side, a family whose rotary frequencies depend on the sequence's length, `--no-cuda-graphs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from cadenza.models.attention import RowIndex
from cadenza.models.common import CausalLM, StaticStep

LENGTH_BUCKET = 256  # cache positions per captured length bucket
MAX_GRAPHS = 64  # captured steps kept (batch sizes x length buckets); the least recently used goes first


@dataclass
class Captured:
    """One captured decode step: its static inputs, its output and its segments."""

    ids: torch.Tensor  # [B, 1] token ids
    index: RowIndex  # rows and positions
    # pinned [3, B]: ids, rows, starts of the next replay, and the event after their copy to the static inputs
    host: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None
    logits: torch.Tensor | None = None  # [B, 1, V] float32
    # (device, torch.cuda.CUDAGraph or a host call) in order, each run with its device current (on that device's
    # current stream)
    segments: list = field(default_factory=list)
    one_device: bool = True  # every segment on one GPU, current already: replayed without a device switch each
    # what the captured layers add to the orchestra's counters per step (the Python that counts them does not run
    # on replay; the host segments count for themselves)
    counted: object | None = None

    def replay(self) -> None:
        if self.one_device:
            for _, seg in self.segments:
                _run(seg)
            return
        for device, seg in self.segments:
            with torch.cuda.device(device):
                _run(seg)


def _run(seg) -> None:
    if isinstance(seg, torch.cuda.CUDAGraph):
        seg.replay()
    else:
        seg()


class Recorder:
    """The capture in progress, as segments on one device each: graphs, and between them host calls (MoE layers
    that need the host: `host`) and, where the layers are split over several GPUs, a boundary's copies
    (`crossing`)."""

    def __init__(self, pools: dict, device: torch.device):
        self.pools = pools  # device -> the memory pool its graphs share (the first graph captured there makes it)
        self.device = device  # where the graph in capture runs
        self.segments: list = []
        self.graph: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):  # (captures that device's current stream)
            self.graph.capture_begin(pool=self.pools.get(self.device))

    def end(self) -> None:
        with torch.cuda.device(self.device):
            self.graph.capture_end()
        self.pools.setdefault(self.device, self.graph.pool())
        self.segments.append((self.device, self.graph))
        self.graph = None

    def host(self, fn: Callable[[], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Ends the graph here; on replay `fn()` runs eagerly (reading tensors the graph so far wrote) and its
        result lands in the returned static tensor, which the next graph reads."""
        out = torch.empty_like(like)
        self.end()
        self.segments.append((self.device, lambda: out.copy_(fn())))
        self.begin()
        return out

    @contextlib.contextmanager
    def crossing(self, device: torch.device):
        """A block boundary of a layer split (StaticStep.crossing): the graph so far ends; each tensor given to the
        yielded move(t) gets a static copy on `device`, refreshed on replay between the two graphs (an eager copy
        between devices, which PyTorch orders after the source stream's work and before the destination's); the
        next graph captures on `device`. One graph per GPU segment: a graph's kernels stay on one device."""
        self.end()
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def move(t: torch.Tensor) -> torch.Tensor:  # (a copy on the same device too: two blocks on one GPU, tests')
            pairs.append((t, torch.empty_like(t, device=device)))  # (outside any capture: kept by the closure)
            return pairs[-1][1]

        yield move
        if pairs:

            def copy() -> None:
                for src, dst in pairs:
                    dst.copy_(src)

            self.segments.append((device, copy))
        self.device = device
        self.begin()


class StepGraphs:
    """Captures and replays the decode steps of one model (`run`), or says why it cannot (`reason`)."""

    def __init__(
        self, model: nn.Module, device: torch.device, orchestra=None, enabled: bool = True, kv_host: bool = False
    ):
        self.model, self.device, self.orchestra = model, device, orchestra
        self.kv_host = kv_host
        self._asked = enabled
        self.graphs: dict[tuple[int, int], Captured] = {}
        self.pools: dict = {}  # device -> the memory pool every captured step's graphs there share
        self.version = None
        self.captures = 0  # steps captured so far (a re-capture after a new placement counts again)
        self.replays = 0
        self.reason = self._why_not(enabled)

    def _why_not(self, enabled: bool) -> str | None:
        if not enabled:
            return "turned off (--no-cuda-graphs)"
        if self.device.type != "cuda":
            return "no CUDA device (CPU execution, or the emulated GPU side)"
        if self.kv_host:
            return "the KV cache is in host memory (--kv-cache host): attention runs on the CPU between GPU kernels"
        if type(self.model).forward is not CausalLM.forward:
            return f"{type(self.model).__name__} has its own forward pass (LongRoPE's switch re-runs the sequence)"
        rotary = getattr(self.model.model, "rotary_emb", None)
        if rotary is not None and rotary.grows:
            return f"rotary scaling {rotary.rope.rope_type!r} recomputes its frequencies as the sequence grows"
        return None

    @property
    def enabled(self) -> bool:
        return self.reason is None

    def describe(self, gpus: int | None = None) -> str:
        """In words, for `cadenza info`; gpus: the GPUs a split would run on (info --gpus, before a split is made;
        a model already split says for itself)."""
        from cadenza.layer_split import layer_devices

        text = self._describe()
        if layer_devices(self.model) is not None:
            gpus = len(self._devices())
        if self.enabled and gpus:
            text += (
                f"; layers split over {gpus} GPU(s): one graph per GPU segment, a block boundary's hidden state "
                "copied between them"
            )
        return text

    def _describe(self) -> str:
        if not self.enabled:
            return f"off: {self.reason}"
        orch = self.orchestra
        if orch is not None and orch.streamed is not None:
            return (
                "on (decode steps replayed as one CUDA graph each; CPU experts run from the stream inside it, started "
                f"by {orch.streamed.launch_reason})"
            )
        if orch is not None:
            return f"on (decode steps replayed as CUDA graphs; host layers run between graphs: {orch.streamed_reason})"
        return (
            "on (decode steps replayed as CUDA graphs; with experts on the CPU, one graph a step when their work is "
            "launched from the stream: the cpu policy, and auto unless the CPU is much slower than the link)"
        )

    def clear(self) -> None:
        self.graphs.clear()
        self.pools = {}

    def set_kv_host(self, kv_host: bool) -> None:
        """The KV cache moved (to host memory or back): whether graphs apply is decided anew, old captures dropped."""
        self.kv_host = kv_host
        self.reason = self._why_not(self._asked)
        self.clear()

    def run(self, ids: list[int], cache, rows: list[int]) -> torch.Tensor:
        """One decode step: token ids[b] appended to cache slot rows[b] -> logits [B, V] float32 (a view of the
        graph's output: read it before the next step)."""
        version = getattr(self.orchestra, "version", None)
        if version != self.version:  # new resident tensors: every capture refers to the old ones
            self.clear()
            self.version = version
        b = len(rows)
        starts = [cache.lengths[r] for r in rows]
        if cache.ensure(max(starts) + 1):  # (a reserved cache never grows; a CPU-sized one may)
            self.clear()
        key = self._key(cache, rows)
        end = key[1]
        cap = self.graphs.pop(key, None)
        if cap is None:
            cap = self._capture(b, end, cache, ids, rows, starts)
        self.graphs[key] = cap  # most recently used last
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        if cap.host is None:
            cap.host = torch.empty(3, b, dtype=torch.int64, pin_memory=True)
            cap.copied = torch.cuda.Event()
        else:
            cap.copied.synchronize()  # the last replay's inputs have left the buffer (done long ago, in practice)
        cap.host.numpy()[:] = (ids, rows, starts)
        cap.ids.copy_(cap.host[0].view(b, 1), non_blocking=True)
        cap.index.rows_t.copy_(cap.host[1], non_blocking=True)
        cap.index.starts_t.copy_(cap.host[2], non_blocking=True)
        cap.copied.record()
        cap.replay()
        if cap.counted is not None:
            self.orchestra.counters.add(cap.counted)
        self.replays += 1
        cache.advance(rows, 1)
        return cap.logits[:, -1]

    def _key(self, cache, rows: list[int]) -> tuple[int, int, int]:
        """(batch, cache length bucket's end, cache): the captured step a step of `rows` replays."""
        end = min(cache.capacity, (max(cache.lengths[r] for r in rows) // LENGTH_BUCKET + 1) * LENGTH_BUCKET)
        return len(rows), end, id(cache)

    def captured(self, cache, rows: list[int]) -> bool:
        """Whether a step of `rows` would replay a graph already captured (nothing to capture first)."""
        return getattr(self.orchestra, "version", None) == self.version and self._key(cache, rows) in self.graphs

    def _devices(self) -> list[torch.device]:
        """The devices a step runs on: the model's first (tokens in, logits out), then each other GPU of a split."""
        from cadenza.layer_split import layer_devices

        return list(dict.fromkeys([self.device, *(layer_devices(self.model) or [])]))

    def _capture(self, b: int, end: int, cache, ids: list[int], rows: list[int], starts: list[int]) -> Captured:
        from cadenza.layer_split import layer_devices

        cap = Captured(torch.zeros(b, 1, dtype=torch.int64, device=self.device), RowIndex.static(b, self.device))
        cap.ids.copy_(torch.tensor(ids).view(b, 1))
        cap.index.rows_t.copy_(torch.tensor(rows))
        cap.index.starts_t.copy_(torch.tensor(starts))
        orch = self.orchestra
        counters = orch.counters.snapshot() if orch is not None else None
        devices = self._devices()
        streams = {d: torch.cuda.Stream(d) for d in devices}  # each device's capture stream (a graph's own)
        for d, stream in streams.items():
            stream.wait_stream(torch.cuda.current_stream(d))
        rec = Recorder(self.pools, self.device)
        split = layer_devices(self.model) is not None
        with contextlib.ExitStack() as on_streams:
            for stream in streams.values():
                on_streams.enter_context(torch.cuda.stream(stream))
            on_streams.enter_context(torch.cuda.device(self.device))
            # one eager pass first (kernels compiled and tuned, libraries' workspaces made): it writes this step's
            # keys and values where the replay writes them again; a linear layer's state it would advance is put back
            restore = cache.checkpoint(rows)
            self.model(cap.ids, cache, last_only=True, static=StaticStep(cap.index, end))
            restore()
            for d in devices:
                torch.cuda.synchronize(d)
            before = orch.counters.snapshot() if orch is not None else None
            static = StaticStep(cap.index, end, rec.crossing if split else None)
            try:
                with orch.recording(rec) if orch is not None else contextlib.nullcontext():
                    rec.begin()
                    cap.logits = self.model(cap.ids, cache, last_only=True, static=static)
                    rec.end()
            finally:
                if rec.graph is not None:  # capture failed midway: leave the stream usable
                    with torch.cuda.device(rec.device):
                        rec.graph.capture_end()
        for d, stream in streams.items():
            torch.cuda.current_stream(d).wait_stream(stream)
        if orch is not None:  # the warm-up pass is not a step: keep the counters honest
            cap.counted = orch.counters.minus(before)
            orch.counters = counters
        cap.segments = rec.segments
        cap.one_device = len({device for device, _ in rec.segments}) == 1  # (decided once, not at each replay)
        self.captures += 1
        return cap
