"""GPU slots for fetched experts: a cache keyed by (MoE layer, expert), filled over PCIe on a copy stream; which
expert leaves a full cache is an eviction policy's choice (cadenza.moe.offload.eviction: lru, lfu, lrfu).

Ordering is carried by events, never by host waits: a slot's copy waits (on the copy stream) for the last
computation that read the slot, and the computation waits (on the compute stream) for the copy that filled it.
Several experts of a layer taken at once (`get_many`, `prefetch_many`: a big step's waves) are copied in runs: the
experts that follow each other in host memory, going to slots that follow each other, in one copy a tensor and one
event, where one copy and ~6 CUDA calls an expert left the link idle for the Python in between (a 171-sequence
Qwen3-30B-A3B step issued ~11,000 copies of ~26 us each: the link busy 38% of the step, session 23). A run never
spans slots released by different waves, and the slots are filled in the order they were released: copies on one
stream run in the order issued, so a copy into a slot the last wave still reads would hold back the copies behind
it (T1's int4 step on the H200 left the link idle ~2-4 ms a layer that way, its first run of the next layer's
experts waiting for the current layer's last products).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cadenza.moe.offload.eviction import EvictionPolicy, make_policy


class SlotCache:
    """`num_slots` slots, each holding one expert as its tensors are stored: plain gate [I, H], up [I, H] and
    down [H, I] in the compute dtype (the default), or the `parts` given (quantized experts: their gate/up and
    down tiles, uint8). `stacks[j][slot]` is part j of a slot; the stacks are what the GPU kernels index. Where
    layers store experts in different sizes (a GGUF's Q4_K and Q6_K layers), `parts` is the largest of each part,
    flat, and `shaped(parts)` views the stacks as one layer's: the first bytes of each slot."""

    def __init__(
        self,
        num_slots: int,
        hidden: int | None = None,
        intermediate: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        eviction: str | EvictionPolicy = "lru",
        parts: list[tuple[tuple[int, ...], torch.dtype]] | None = None,
    ):
        self.num_slots = num_slots
        self.policy = make_policy(eviction) if isinstance(eviction, str) else eviction
        self.device = device
        self.cuda = device.type == "cuda"
        if parts is None:
            parts = [((intermediate, hidden), dtype), ((intermediate, hidden), dtype), ((hidden, intermediate), dtype)]
        self.parts = tuple((tuple(shape), dt) for shape, dt in parts)
        self.stacks = [torch.empty(num_slots, *shape, dtype=dt, device=device) for shape, dt in parts]
        self._views: dict[tuple, list[torch.Tensor]] = {self.parts: self.stacks}
        self.plain = len(self.stacks) == 3
        if self.plain:  # fill_rows (an expert shared with the CPU) reads plain rows
            self.gate, self.up, self.down = self.stacks
        self.where: dict[tuple[int, int], int] = {}  # (layer, expert) -> slot
        self.free = list(range(num_slots - 1, -1, -1))
        self.hits = 0
        self.misses = 0
        self.copies = 0  # runs of experts copied in (each one copy a part): what a step's copy calls cost
        self.in_use: set[int] = set()  # slots handed out by `get` and not yet released: never evicted
        self.release_seq = [0] * num_slots  # which `release_many` call last released each slot (0: none yet)
        self._releases = 0
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            # speculative copies run on a stream of their own: a needed copy never queues behind a wrong guess
            self.prefetch_stream = torch.cuda.Stream(device)
            self.filled = [torch.cuda.Event() for _ in range(num_slots)]
            self.released = [torch.cuda.Event() for _ in range(num_slots)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stacks)

    def shaped(self, parts=None) -> list[torch.Tensor]:
        """The stacks viewed as holding experts stored as `parts` ((shape, dtype) per tensor; None: as built)."""
        key = self.parts if parts is None else tuple((tuple(shape), dt) for shape, dt in parts)
        views = self._views.get(key)
        if views is None:
            views = []
            for s, (shape, dt) in zip(self.stacks, key, strict=True):
                flat, n = s.view(self.num_slots, -1), math.prod(shape)
                if dt != s.dtype or n > flat.shape[1]:
                    raise ValueError(f"a slot holds {flat.shape[1]} {s.dtype} values, not {list(shape)} {dt}")
                views.append(flat[:, :n].view(self.num_slots, *shape))
            self._views[key] = views
        return views

    def weights(self, slot: int, parts=None) -> tuple[torch.Tensor, ...]:
        return tuple(s[slot] for s in self.shaped(parts))

    def get(self, layer: int, expert: int, host: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> int:
        """The slot holding (layer, expert), copying it from `host` (gate, up, down) if it is not cached. The
        current stream is made to wait for the copy; call `release(slot)` once the work reading it is queued."""
        return self.get_many(layer, [expert], lambda _: host)[expert]

    def get_many(
        self, layer: int, experts: list[int], host_of: Callable[[int], tuple], stacked: bool = False
    ) -> dict[int, int]:
        """`get` for several experts of one layer: expert -> slot, the missing ones copied from `host_of(e)` in
        runs (`_fill_runs`; stacked: as there). `release_many` the slots once the work reading them is queued."""
        slots: dict[int, int] = {}
        missing = []
        for e in dict.fromkeys(experts):  # (each once)
            slot = self.where.get((layer, e))
            if slot is None:
                missing.append(e)
                continue
            self.hits += 1
            self.policy.touch((layer, e))
            self.in_use.add(slot)
            slots[e] = slot
        fills = []
        for e, slot in self._assign(layer, missing, [self._vacant() for _ in missing]):
            self.misses += 1
            self.in_use.add(slot)
            slots[e] = slot
            fills.append((slot, e, host_of(e)))
        self._fill_runs(fills, stacked=stacked)
        slots = {e: slots[e] for e in experts}  # (in the wave's order)
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            for ev in {id(self.filled[s]): self.filled[s] for s in slots.values()}.values():
                stream.wait_event(ev)
        return slots

    def prefetch(self, layer: int, expert: int, host: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> bool:
        """Starts copying (layer, expert) into a slot ahead of need (False: it is cached already). A later `get`
        waits for the copy's event only if it is still running."""
        return bool(self.prefetch_many(layer, [expert], lambda _: host))

    def prefetch_many(
        self, layer: int, experts: list[int], host_of: Callable[[int], tuple], stacked: bool = False
    ) -> list[int]:
        """`prefetch` for several experts of one layer, copied in runs on the prefetch stream: those issued."""
        issued, taken = [], []
        for e in dict.fromkeys(experts):  # (each once)
            if (layer, e) in self.where:
                continue
            if not self.free and len(self.in_use) >= len(self.where):  # no slot left to take
                break
            issued.append(e)
            taken.append(self._vacant())
        fills = [(slot, e, host_of(e)) for e, slot in self._assign(layer, issued, taken)]
        self._fill_runs(fills, self.prefetch_stream if self.cuda else None, stacked)
        return issued

    def borrow(self) -> int:
        """A slot taken out of the cache for one use (a partly fetched expert): keyed by nothing, never a hit.
        `give_back(slot)` once the work reading it is queued."""
        slot = self._vacant()
        self.in_use.add(slot)
        return slot

    def fill_rows(self, slot: int, host, rows: int) -> None:
        """Copies gate and up rows [0, rows) and the whole down projection of `host` into `slot`; the current
        stream waits for the copy."""
        gate, up, down = host
        parts = [(self.gate[slot][:rows], gate[:rows]), (self.up[slot][:rows], up[:rows]), (self.down[slot], down)]
        if not self.cuda:
            for dst, src in parts:
                dst.copy_(src)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.released[slot])
            for dst, src in parts:
                dst.copy_(src, non_blocking=True)
            self.filled[slot] = _recorded(self.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(self.filled[slot])

    def give_back(self, slot: int) -> None:
        self.release(slot)
        self.free.append(slot)

    def _assign(self, layer: int, experts: list[int], slots: list[int]) -> list[tuple[int, int]]:
        """The taken `slots` given to `experts` as (expert, slot), cached and touched in that order: the experts
        ascending, the slots in the order they were released, ascending among those one wave released: the first
        experts (a wave's first) go where a copy can start first, a layer's consecutive experts land in consecutive
        slots where the slots allow, one copy a run (`_fill_runs`), and since the oldest are evicted first the next
        wave's victims are those runs again."""
        slots = sorted(slots, key=lambda s: (self.release_seq[s], s))
        pairs = list(zip(sorted(experts), slots, strict=True))
        for e, slot in pairs:
            self.where[(layer, e)] = slot
            self.policy.touch((layer, e))
        return pairs

    def _vacant(self) -> int:
        """A free slot, else the eviction policy's victim among the slots not in use (forgotten by the cache)."""
        if self.free:
            return self.free.pop()
        victim = self.policy.victim_where(self.where, self.in_use)
        self.policy.forget(victim)
        return self.where.pop(victim)

    def _fill_runs(self, fills: list[tuple[int, int, tuple]], stream=None, stacked: bool = False) -> None:
        """Copies each (slot, expert, host tensors) of `fills` into its slot, in order: entries whose slots follow
        each other, were released together, and whose host tensors follow each other in one allocation (a layer's
        stacked experts) go as one copy a tensor. stacked: the caller knows that each expert's host tensors follow
        the previous expert's (LayerOffload.stacked): consecutive experts are then joined without checking the
        tensors (~5 us a pair, a third of a T2 wave's bookkeeping)."""
        i = 0
        while i < len(fills):
            j = i + 1
            while j < len(fills) and self._joins(fills[j - 1], fills[j], stacked):
                j += 1
            self._fill(fills[i][0], fills[i][2], stream, j - i)
            i = j

    def _joins(self, a: tuple[int, int, tuple], b: tuple[int, int, tuple], stacked: bool) -> bool:
        """Whether fill b continues a's run (`_fill_runs`)."""
        (slot_a, e_a, host_a), (slot_b, e_b, host_b) = a, b
        if slot_b != slot_a + 1 or self.release_seq[slot_a] != self.release_seq[slot_b]:
            return False
        return e_b == e_a + 1 if stacked else follows(host_a, host_b)

    def _fill(self, slot: int, host, stream=None, n: int = 1) -> None:
        """Copies `n` experts, the first `host` and the others after it in host memory, into slots slot..slot+n-1."""
        views = self.shaped([(src.shape, src.dtype) for src in host])
        if n > 1 and not all(v.is_contiguous() for v in views):  # slots wider than this layer's experts
            for k in range(n):
                self._fill(slot + k, tuple(_shifted(src, k) for src in host), stream)
            return
        if n == 1:
            pairs = [(v[slot], src) for v, src in zip(views, host, strict=True)]
        else:  # the run's host bytes as one [n, ...] tensor over the allocation
            pairs = [
                (v.narrow(0, slot, n), src.as_strided((n, *src.shape), (src.numel(), *src.stride())))
                for v, src in zip(views, host, strict=True)
            ]
        self.copies += 1
        if not self.cuda:  # emulated GPU side: a plain copy
            for dst, src in pairs:
                dst.copy_(src)
            return
        stream = stream or self.copy_stream
        with torch.cuda.stream(stream):
            for ev in {id(self.released[s]): self.released[s] for s in range(slot, slot + n)}.values():
                stream.wait_event(ev)  # the last reader of each slot is done
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            done = _recorded(stream)
        for s in range(slot, slot + n):
            self.filled[s] = done

    def release(self, slot: int) -> None:
        self.release_many([slot])

    def release_many(self, slots) -> None:
        """The work reading `slots` is queued: they may be evicted, and a copy into one waits for that work."""
        slots = list(slots)
        self.in_use.difference_update(slots)
        self._releases += 1
        for s in slots:
            self.release_seq[s] = self._releases
        if self.cuda:
            done = _recorded(torch.cuda.current_stream(self.device))
            for s in slots:
                self.released[s] = done

    def clear(self) -> None:
        self.where.clear()
        self.in_use.clear()
        self.policy.clear()
        self.free = list(range(self.num_slots - 1, -1, -1))
        self.release_seq = [0] * self.num_slots


def _recorded(stream) -> torch.cuda.Event:
    """A new event recorded on `stream`: slots filled or released together share one, so a slot's event is
    replaced, never recorded again."""
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


def follows(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    """Whether each tensor of `b` starts where the same tensor of `a` ends, in the same allocation."""
    for x, y in zip(a, b, strict=True):
        if (
            x.shape != y.shape or x.dtype != y.dtype or not (x.is_contiguous() and y.is_contiguous())
            or y.data_ptr() != x.data_ptr() + x.nbytes
            or y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        ):  # fmt: skip
            return False
    return True


def _shifted(t: torch.Tensor, k: int) -> torch.Tensor:
    """The tensor `k` places after `t` in its allocation (`follows` checked that it is there)."""
    return t if k == 0 else t.as_strided(t.shape, t.stride(), t.storage_offset() + k * t.numel())
