"""GPU slots for fetched experts: a cache keyed by (MoE layer, expert), filled over PCIe on a copy stream; which
expert leaves a full cache is an eviction policy's choice (cadenza.moe.offload.eviction: lru, lfu, lrfu).

Ordering is carried by events, never by host waits: a slot's copy waits (on the copy stream) for the last
computation that read the slot, and the computation waits (on the compute stream) for the copy that filled it.
"""

from __future__ import annotations

import math

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
        self.in_use: set[int] = set()  # slots handed out by `get` and not yet released: never evicted
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
        key = (layer, expert)
        slot = self.where.get(key)
        if slot is not None:
            self.hits += 1
        else:
            self.misses += 1
            slot = self._take(key)
            self._fill(slot, host)
        self.policy.touch(key)
        self.in_use.add(slot)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.filled[slot])
        return slot

    def prefetch(self, layer: int, expert: int, host: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> bool:
        """Starts copying (layer, expert) into a slot ahead of need (False: it is cached already). A later `get`
        waits for the copy's event only if it is still running."""
        key = (layer, expert)
        if key in self.where or (not self.free and len(self.in_use) >= len(self.where)):
            return False
        slot = self._take(key)
        self._fill(slot, host, self.prefetch_stream if self.cuda else None)
        self.policy.touch(key)
        return True

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
            self.filled[slot].record(self.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(self.filled[slot])

    def give_back(self, slot: int) -> None:
        self.release(slot)
        self.free.append(slot)

    def _take(self, key) -> int:
        """A slot for `key`."""
        slot = self._vacant()
        self.where[key] = slot
        return slot

    def _vacant(self) -> int:
        """A free slot, else the eviction policy's victim among the slots not in use (forgotten by the cache)."""
        if self.free:
            return self.free.pop()
        victim = self.policy.victim([k for k, s in self.where.items() if s not in self.in_use])
        self.policy.forget(victim)
        return self.where.pop(victim)

    def _fill(self, slot: int, host, stream=None) -> None:
        slot_views = self.weights(slot, [(src.shape, src.dtype) for src in host])
        if not self.cuda:  # emulated GPU side: a plain copy
            for dst, src in zip(slot_views, host, strict=True):
                dst.copy_(src)
            return
        stream = stream or self.copy_stream
        with torch.cuda.stream(stream):
            stream.wait_event(self.released[slot])  # the last reader of this slot is done
            for dst, src in zip(slot_views, host, strict=True):
                dst.copy_(src, non_blocking=True)
            self.filled[slot].record(stream)

    def release(self, slot: int) -> None:
        self.in_use.discard(slot)
        if self.cuda:
            self.released[slot].record(torch.cuda.current_stream(self.device))

    def clear(self) -> None:
        self.where.clear()
        self.in_use.clear()
        self.policy.clear()
        self.free = list(range(self.num_slots - 1, -1, -1))
