"""Adaptive placement: resident experts follow live traffic.

`LivePopularity` keeps an exponentially decayed count of (token, expert) pairs per MoE layer, fed from the routing
the orchestra already brings to the host each layer (no extra synchronisation). Between requests, never inside a
step, `plan_swaps` proposes exchanging resident experts for more popular non-resident ones of the same layer
(same shapes, so a resident row is overwritten in place): the most valuable exchanges first, each only when the
work it would move to the GPU over the coming `horizon` tokens is worth more than the copy, and no more than
`max_bytes` of copies per adaptation so a step that follows is never held up long.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class LivePopularity:
    """Per layer, per expert: decayed (token, expert) counts; `half_life` in tokens."""

    def __init__(self, num_layers: int, num_experts: int, half_life: float = 4096.0):
        self.counts = np.zeros((num_layers, num_experts), dtype=np.float64)
        self.tokens = np.zeros(num_layers, dtype=np.float64)  # decayed tokens seen per layer
        self.keep_per_token = 0.5 ** (1.0 / half_life)

    def observe(self, layer: int, counts: list[int], tokens: int) -> None:
        decay = self.keep_per_token**tokens
        self.counts[layer] *= decay
        self.counts[layer] += counts
        self.tokens[layer] = self.tokens[layer] * decay + tokens

    def shares(self) -> np.ndarray:
        """[layers, experts]: each expert's expected (token, expert) pairs per token of traffic."""
        return self.counts / np.maximum(self.tokens[:, None], 1e-9)


@dataclass(frozen=True)
class Swap:
    layer: int
    out: int  # resident expert that leaves the GPU
    into: int  # non-resident expert that takes its row
    gain: float  # expected seconds saved over the horizon, less the copy


def plan_swaps(
    shares: np.ndarray,
    resident: list[list[int]],
    host_cost_s: float,
    gpu_cost_s: float,
    copy_s: float,
    expert_bytes: int,
    max_bytes: int,
    horizon: int = 2048,
) -> list[Swap]:
    """Exchanges worth making, best first, within `max_bytes` of copies.

    shares [layers, experts]: expected uses per token (LivePopularity.shares); host_cost_s / gpu_cost_s: the cost
    of one (token, expert) pair off / on the GPU; copy_s: the time to copy one expert to the GPU. An exchange of a
    resident r for a non-resident n in one layer saves (share_n - share_r) * horizon * (host - gpu) seconds.
    """
    per_use = max(host_cost_s - gpu_cost_s, 0.0)
    candidates: list[Swap] = []
    for layer, res in enumerate(resident):
        if not res:
            continue
        row = shares[layer]
        res_set = set(res)
        outside = sorted((e for e in range(len(row)) if e not in res_set), key=lambda e: -row[e])
        inside = sorted(res, key=lambda e: row[e])
        for n, r in zip(outside, inside, strict=False):  # most popular outsider for least popular resident
            gain = (row[n] - row[r]) * horizon * per_use - copy_s
            if gain <= 0:
                break
            candidates.append(Swap(layer, r, n, gain))
    candidates.sort(key=lambda s: -s.gain)
    budget = max_bytes // max(expert_bytes, 1)
    return candidates[: int(budget)]
