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

from cadenza.models.common import CausalLM, RowIndex, StaticStep

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
    segments: list = field(default_factory=list)  # torch.cuda.CUDAGraph or a host call, in order
    # what the captured layers add to the orchestra's counters per step (the Python that counts them does not run
    # on replay; the host segments count for themselves)
    counted: object | None = None

    def replay(self) -> None:
        for seg in self.segments:
            if isinstance(seg, torch.cuda.CUDAGraph):
                seg.replay()
            else:
                seg()


class Recorder:
    """The capture in progress: MoE layers that need the host call `host(fn, like)` to cut the step there."""

    def __init__(self, pool):
        self.pool = pool
        self.segments: list = []
        self.graph: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool)

    def end(self) -> None:
        self.graph.capture_end()
        if self.pool is None:
            self.pool = self.graph.pool()
        self.segments.append(self.graph)
        self.graph = None

    def host(self, fn: Callable[[], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Ends the graph here; on replay `fn()` runs eagerly (reading tensors the graph so far wrote) and its
        result lands in the returned static tensor, which the next graph reads."""
        out = torch.empty_like(like)
        self.end()
        self.segments.append(lambda: out.copy_(fn()))
        self.begin()
        return out


class StepGraphs:
    """Captures and replays the decode steps of one model (`run`), or says why it cannot (`reason`)."""

    def __init__(
        self, model: nn.Module, device: torch.device, orchestra=None, enabled: bool = True, kv_host: bool = False
    ):
        self.model, self.device, self.orchestra = model, device, orchestra
        self.kv_host = kv_host
        self._asked = enabled
        self.graphs: dict[tuple[int, int], Captured] = {}
        self.pool = None
        self.version = None
        self.captures = 0  # steps captured so far (a re-capture after a new placement counts again)
        self.replays = 0
        self.reason = self._why_not(enabled)

    def _why_not(self, enabled: bool) -> str | None:
        if not enabled:
            return "turned off (--no-cuda-graphs)"
        from cadenza.layer_split import layer_devices

        if layer_devices(self.model) is not None:
            return "the layers are split over several GPUs (--gpus): decode steps run eagerly"
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

    def describe(self) -> str:
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
        self.pool = None

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

    def _capture(self, b: int, end: int, cache, ids: list[int], rows: list[int], starts: list[int]) -> Captured:
        cap = Captured(torch.zeros(b, 1, dtype=torch.int64, device=self.device), RowIndex.static(b, self.device))
        cap.ids.copy_(torch.tensor(ids).view(b, 1))
        cap.index.rows_t.copy_(torch.tensor(rows))
        cap.index.starts_t.copy_(torch.tensor(starts))
        static = StaticStep(cap.index, end)
        orch = self.orchestra
        counters = orch.counters.snapshot() if orch is not None else None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # one eager pass first (kernels compiled and tuned, libraries' workspaces made): it writes this step's
            # keys and values where the replay writes them again
            self.model(cap.ids, cache, last_only=True, static=static)
            torch.cuda.synchronize(self.device)
            before = orch.counters.snapshot() if orch is not None else None
            rec = Recorder(self.pool)
            try:
                with orch.recording(rec) if orch is not None else contextlib.nullcontext():
                    rec.begin()
                    cap.logits = self.model(cap.ids, cache, last_only=True, static=static)
                    rec.end()
            finally:
                if rec.graph is not None:  # capture failed midway: leave the stream usable
                    rec.graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if orch is not None:  # the warm-up pass is not a step: keep the counters honest
            cap.counted = orch.counters.minus(before)
            orch.counters = counters
        self.pool = rec.pool
        cap.segments = rec.segments
        self.captures += 1
        return cap
