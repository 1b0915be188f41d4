"""GPU slots for fetched experts: an LRU cache keyed by (MoE layer, expert), filled over PCIe on a copy stream.

Ordering is carried by events, never by host waits: a slot's copy waits (on the copy stream) for the last
computation that read the slot, and the computation waits (on the compute stream) for the copy that filled it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class SlotCache:
    """`num_slots` slots, each holding one expert's gate [I, H], up [I, H] and down [H, I]."""

    def __init__(self, num_slots: int, hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device):
        self.num_slots = num_slots
        self.device = device
        self.cuda = device.type == "cuda"
        self.gate = torch.empty(num_slots, intermediate, hidden, dtype=dtype, device=device)
        self.up = torch.empty(num_slots, intermediate, hidden, dtype=dtype, device=device)
        self.down = torch.empty(num_slots, hidden, intermediate, dtype=dtype, device=device)
        self.where: OrderedDict[tuple[int, int], int] = OrderedDict()  # (layer, expert) -> slot, LRU first
        self.free = list(range(num_slots - 1, -1, -1))
        self.hits = 0
        self.misses = 0
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.filled = [torch.cuda.Event() for _ in range(num_slots)]
            self.released = [torch.cuda.Event() for _ in range(num_slots)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))

    def weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate[slot], self.up[slot], self.down[slot]

    def get(self, layer: int, expert: int, host: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> int:
        """The slot holding (layer, expert), copying it from `host` (gate, up, down) if it is not cached. The
        current stream is made to wait for the copy; call `release(slot)` once the work reading it is queued."""
        key = (layer, expert)
        slot = self.where.get(key)
        if slot is not None:
            self.where.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
            slot = self.free.pop() if self.free else self.where.popitem(last=False)[1]
            self.where[key] = slot
            self._fill(slot, host)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.filled[slot])
        return slot

    def _fill(self, slot: int, host: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        if not self.cuda:  # emulated GPU side: a plain copy
            for dst, src in zip(self.weights(slot), host, strict=True):
                dst.copy_(src)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.released[slot])  # the last reader of this slot is done
            for dst, src in zip(self.weights(slot), host, strict=True):
                dst.copy_(src, non_blocking=True)
            self.filled[slot].record(self.copy_stream)

    def release(self, slot: int) -> None:
        if self.cuda:
            self.released[slot].record(torch.cuda.current_stream(self.device))

    def clear(self) -> None:
        self.where.clear()
        self.free = list(range(self.num_slots - 1, -1, -1))
