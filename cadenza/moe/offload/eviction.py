"""Which fetched expert leaves a full GPU slot cache: pluggable eviction policies.

A policy sees every access (`touch`: a hit, or an insert after a miss) and names the victim when a slot is needed.
- `lru`: the least recently used (good when routing has short-term locality: consecutive tokens of one text);
- `lfu`: the least frequently used, ties broken by recency (good when a few experts dominate a workload);
- `lrfu`: a blend, each key's score decays by half every `half_life` accesses and gains 1 per access, lowest
  score leaves (the LRFU family: half_life → 0 is LRU, → ∞ is LFU).
Keys are (layer, expert). Policies keep counts for evicted keys too (a returning expert keeps its history).
"""

from __future__ import annotations

import math
from collections import OrderedDict


class EvictionPolicy:
    name = "base"

    def touch(self, key) -> None:  # an access (hit or newly inserted)
        raise NotImplementedError

    def victim(self, keys) -> object:  # the key to evict among the cached `keys`
        raise NotImplementedError

    def victim_where(self, where: dict, in_use: set) -> object:
        """The victim among the keys of `where` (key -> slot) whose slot is not in `in_use`."""
        return self.victim([k for k, s in where.items() if s not in in_use])

    def forget(self, key) -> None:  # `key` left the cache
        pass

    def clear(self) -> None:
        pass


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self):
        self.order: OrderedDict = OrderedDict()

    def touch(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def victim(self, keys):
        cached = set(keys)
        return next(k for k in self.order if k in cached)

    def victim_where(self, where: dict, in_use: set) -> object:
        # from the oldest: a big step's waves take hundreds of slots, and a list of every cached key per take cost
        # O(slots) each
        return next(k for k in self.order if k in where and where[k] not in in_use)

    def forget(self, key) -> None:
        self.order.pop(key, None)

    def clear(self) -> None:
        self.order.clear()


class LFU(EvictionPolicy):
    name = "lfu"

    def __init__(self):
        self.freq: dict = {}
        self.last: dict = {}
        self.clock = 0

    def touch(self, key) -> None:
        self.clock += 1
        self.freq[key] = self.freq.get(key, 0) + 1
        self.last[key] = self.clock

    def victim(self, keys):
        return min(keys, key=lambda k: (self.freq.get(k, 0), self.last.get(k, 0)))

    def clear(self) -> None:
        self.freq.clear()
        self.last.clear()
        self.clock = 0


class LRFU(EvictionPolicy):
    """score(k) = sum over k's accesses of 2 ** (-(now - t) / half_life), kept incrementally."""

    name = "lrfu"

    def __init__(self, half_life: float = 32.0):
        self.decay = math.log(2) / half_life
        self.score: dict = {}
        self.last: dict = {}
        self.clock = 0

    def _now(self, key) -> float:
        return self.score.get(key, 0.0) * math.exp(-self.decay * (self.clock - self.last.get(key, self.clock)))

    def touch(self, key) -> None:
        self.clock += 1
        self.score[key] = self._now(key) + 1.0
        self.last[key] = self.clock

    def victim(self, keys):
        return min(keys, key=lambda k: (self._now(k), self.last.get(k, 0)))

    def clear(self) -> None:
        self.score.clear()
        self.last.clear()
        self.clock = 0


POLICIES = {"lru": LRU, "lfu": LFU, "lrfu": LRFU}


def make_policy(name: str) -> EvictionPolicy:
    from cadenza.errors import CadenzaError

    if name not in POLICIES:
        raise CadenzaError(f"Unknown eviction policy {name!r}. Use one of: {', '.join(POLICIES)}.")
    return POLICIES[name]()
