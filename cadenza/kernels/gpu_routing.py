"""Softmax top-k routing in one launch on the GPU (Mixtral, Qwen-MoE, Qwen3-MoE, OLMoE's router after its matmul).

Own Triton kernel because PyTorch runs it as five: softmax, top-k's gather and sort, the weights' sum and the
division. A decode step replays ~42 kernels a layer, and on the H200 each tiny one costs its few microseconds plus
the gap before the next (benchmarks/results/2026-12-04-s20/layer-kernels.txt), so four fewer a layer is ~0.5 ms of a
Mixtral step and more of Qwen3's 48 layers.

The same arithmetic as cadenza.moe.routing.softmax_topk (fp32 softmax as exp(x - max) / sum, the k largest
probabilities, lower index first among equal ones, then divided by their sum), so the weights match it to a few
ulp (the exponential's implementation differs) and the experts chosen match except where two probabilities are
within those ulp of each other.
"""

from __future__ import annotations

import os

import torch

from cadenza.kernels.triton_compat import MISSING, tl, triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as when triton.jit defined the kernel below
MAX_EXPERTS = 1024  # one program holds a token's logits in registers


def available(device: torch.device | str) -> bool:
    """Whether the kernel runs for tensors on `device` (a CUDA device with Triton; the CPU under the interpreter)."""
    if MISSING is not None:
        return False
    return torch.device(device).type == ("cpu" if _INTERPRET else "cuda")


@triton.jit
def _softmax_topk_kernel(
    logits, stride, weights, ids, E, K: tl.constexpr, KP: tl.constexpr, BE: tl.constexpr, NORM: tl.constexpr
):
    """Row `program_id` of logits [T, E] -> its k best softmax probabilities (weights [T, K] fp32, renormalised
    when NORM) and their experts (ids [T, K] int64), best first."""
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BE)
    x = tl.load(logits + row * stride + e, mask=e < E, other=float("-inf")).to(tl.float32)
    ex = tl.where(e < E, tl.exp(x - tl.max(x, 0)), 0.0)
    p = tl.where(e < E, ex / tl.sum(ex, 0), -1.0)  # -1: never chosen
    j = tl.arange(0, KP)
    w = tl.zeros([KP], tl.float32)
    chosen = tl.zeros([KP], tl.int64)
    for i in tl.static_range(K):
        best = tl.max(p, 0)
        at = tl.min(tl.where(p == best, e, BE), 0)
        w = tl.where(j == i, best, w)
        chosen = tl.where(j == i, at.to(tl.int64), chosen)
        p = tl.where(e == at, -2.0, p)
    if NORM:
        w = w / tl.sum(tl.where(j < K, w, 0.0), 0)
    tl.store(weights + row * K + j, w, mask=j < K)
    tl.store(ids + row * K + j, chosen, mask=j < K)


def fits(router_logits: torch.Tensor, top_k: int) -> bool:
    """Whether the fused kernel takes these logits ([T, E] on a device it runs on, E within MAX_EXPERTS)."""
    return (
        router_logits.dim() == 2
        and 0 < top_k <= router_logits.shape[1] <= MAX_EXPERTS
        and router_logits.shape[0] > 0
        and available(router_logits.device)
    )


def softmax_topk(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, ids [T, k] int64) as cadenza.moe.routing.softmax_topk, in one launch."""
    t, e = router_logits.shape
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    _softmax_topk_kernel[(t,)](
        logits,
        logits.stride(0),
        weights,
        ids,
        e,
        K=top_k,
        KP=max(2, triton.next_power_of_2(top_k)),
        BE=max(16, triton.next_power_of_2(e)),
        NORM=norm_topk_prob,
    )
    return weights, ids
