"""Routing traces: which experts each token used, per MoE layer.

`ExpertTrace(model)` hooks every routed-expert module (a forward pre-hook on the seam, so every family and every
offload policy is covered) and counts (token, expert) pairs per layer on the device the routing ran on: no host
synchronisation is added, and nothing at all runs when no trace is attached. With `keep_tokens`, it also keeps
the per-token expert ids of the most recent tokens (a bounded ring per layer) for analyses that need sequences.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial

import torch
from torch import nn

# During a pass of right-padded prompts (cadenza.engine's grouped prefill): which of its B*T tokens are real. The
# padding tokens are routed and computed like any (their results are thrown away), but routing statistics (traces,
# the live popularity) count real tokens only, so they stay what each prompt alone gives.
_REAL: ContextVar[torch.Tensor | None] = ContextVar("cadenza_real_tokens", default=None)


@contextmanager
def padded(real: torch.Tensor | None) -> Iterator[None]:
    """Marks the pass inside as padded: real [B*T] bool on the host, True at the prompts' own tokens (None: no
    padding, every token counts)."""
    token = _REAL.set(real)
    try:
        yield
    finally:
        _REAL.reset(token)


def real_tokens(topk_ids: torch.Tensor) -> torch.Tensor:
    """topk_ids [N, k] of the pass, less the padding's rows inside `padded` (as they are outside it)."""
    real = _REAL.get()
    if real is None or real.shape[0] != topk_ids.shape[0]:
        return topk_ids
    return topk_ids[real.to(topk_ids.device, non_blocking=True)]


class ExpertTrace:
    def __init__(self, model: nn.Module, keep_tokens: int = 0):
        from cadenza.loader import moe_layers

        self.layers = moe_layers(model)
        self.num_experts = self.layers[0].num_experts if self.layers else 0
        self._counts: list[torch.Tensor | None] = [None] * len(self.layers)
        self.keep_tokens = keep_tokens
        self.recent: list[deque[torch.Tensor]] = [deque() for _ in self.layers]  # per layer, [n, k] id blocks
        self._recent_n = [0] * len(self.layers)
        self._handles = [m.register_forward_pre_hook(partial(self._record, i)) for i, m in enumerate(self.layers)]

    def _record(self, layer: int, module, args) -> None:
        topk_ids = real_tokens(args[1])
        flat = topk_ids.reshape(-1)
        counts = torch.bincount(flat, minlength=self.num_experts)
        if self._counts[layer] is None:
            self._counts[layer] = counts.to(torch.int64)
        else:
            self._counts[layer] += counts
        if self.keep_tokens:
            ring = self.recent[layer]
            ring.append(topk_ids.detach().to("cpu", non_blocking=True))
            self._recent_n[layer] += topk_ids.shape[0]
            while self._recent_n[layer] - ring[0].shape[0] >= self.keep_tokens:
                self._recent_n[layer] -= ring.popleft().shape[0]

    def counts(self) -> list[list[int]]:
        """[num_moe_layers][num_experts]: (token, expert) pairs routed so far."""
        return [
            [0] * self.num_experts if c is None else c.cpu().tolist()  # one sync, when asked
            for c in self._counts
        ]

    def tokens(self, layer: int) -> torch.Tensor:
        """The expert ids [n, k] of the most recent tokens (at most keep_tokens) at one MoE layer."""
        ring = self.recent[layer]
        if not ring:
            return torch.empty(0, 0, dtype=torch.long)
        ids = torch.cat(list(ring))
        return ids[-self.keep_tokens :]

    def reset(self) -> None:
        self._counts = [None] * len(self.layers)
        for ring in self.recent:
            ring.clear()
        self._recent_n = [0] * len(self.layers)

    def close(self) -> None:
        """Detaches the hooks: tracing costs nothing afterwards."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ExpertTrace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
