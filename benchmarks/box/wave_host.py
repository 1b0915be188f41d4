"""The host's Python per fetch wave of a big step (SlotCache.get_many then release_many): T2's shape, Qwen3-30B-A3B's
128 experts a layer over 48 layers, 128 fetch slots taken in waves of 64, ~122 experts fetched a layer, the host
experts stacked as a packed layer stores them (tiny here: the copies are CPU copies of a few bytes, so what is
timed is the bookkeeping). Session 25's T2 timeline showed ~1 ms of host time between a decode step's wave kernels;
this is the cache's part of it. Runs anywhere (no GPU needed): python3 benchmarks/box/wave_host.py [STEPS]
[unchecked] [fresh] (unchecked: the layer says its experts are stacked, as LayerOffload.stacked does; fresh: the
host views made at each call, as before LayerOffload kept them). On the development machine (2 cores): ~430 us a wave
`fresh`, 270 with the views kept, 150 `unchecked` too (what cadenza does now).
"""

import random
import sys
import time

import torch

from cadenza.moe.offload.cache import SlotCache

LAYERS, EXPERTS, SLOTS, FETCHED = 48, 128, 128, 122
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
STACKED = "unchecked" in sys.argv  # as LayerOffload.stacked tells the cache for a stacked layer
FRESH = "fresh" in sys.argv  # host views made at each call, as LayerOffload.host_weights did before 4ce2a68
parts = [((64, 8), torch.uint8), ((32, 8), torch.uint8)]
cache = SlotCache(SLOTS, device=torch.device("cpu"), parts=parts)
gate_up = torch.zeros(LAYERS, EXPERTS, 64, 8, dtype=torch.uint8)
down = torch.zeros(LAYERS, EXPERTS, 32, 8, dtype=torch.uint8)
views = [[(gate_up[i, e], down[i, e]) for e in range(EXPERTS)] for i in range(LAYERS)]  # (LayerOffload's views)
rng = random.Random(0)
waves, seconds = 0, 0.0
for _ in range(steps):
    for layer in range(LAYERS):
        fetched = sorted(rng.sample(range(EXPERTS), FETCHED))
        for i in range(0, FETCHED, SLOTS // 2):
            t0 = time.perf_counter()
            host = (lambda e, n=layer: (gate_up[n, e], down[n, e])) if FRESH else views[layer].__getitem__
            slots = cache.get_many(layer, fetched[i : i + SLOTS // 2], host, STACKED)
            cache.release_many(slots.values())
            seconds += time.perf_counter() - t0
            waves += 1
print(
    f"{seconds / waves * 1e6:.0f} us of host time a wave of {SLOTS // 2} ({waves} waves, {cache.copies / waves:.1f} "
    f"copies a wave, {cache.misses / (cache.hits + cache.misses):.2f} missed)"
)
