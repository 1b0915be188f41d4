"""Small fused GPU kernels for a decode step's elementwise work: RMSNorm and softmax top-k routing, one launch
each.

Why: at batch 1 a decode layer is dozens of tiny kernels, and inside a CUDA graph each still costs a launch gap
whatever it computes (on the H200 a few microseconds plus the gap before the next:
benchmarks/results/2026-12-04-s20/layer-kernels.txt); PyTorch spells RMSNorm as several kernels and the router's
softmax, top-k and renormalisation as five. RMSNorm computes the same values in one launch (the mean of squares in
another summation order; on the GPU its bf16 outputs equalled PyTorch's). The router (Mixtral, Qwen-MoE, Qwen3-MoE,
OLMoE, after its matmul) does cadenza.moe.routing.softmax_topk's arithmetic (fp32 softmax as exp(x - max) / sum,
the k largest probabilities, lower index first among equal ones, then divided by their sum): the weights match to a
few ulp (the exponential's implementation differs), the experts chosen except where two probabilities are within
those ulp of each other.

A fused rotary kernel, bit-exact against PyTorch under Triton's interpreter, differed by one bf16 step in some
elements on the GPU and moved a bf16 model's logits measurably (benchmarks/README.md): it was taken out until
that is understood. The reference is PyTorch's spelling in `cadenza.models.common` (RMSNorm), which calls this on CUDA
tensors and computes its own where it returns None. The kernels run on CUDA tensors, or on CPU tensors through
Triton's interpreter when TRITON_INTERPRET=1 was set before this module was imported (the tests do that).

Shape legend: R rows, H hidden.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from cadenza.kernels.triton_compat import MISSING as _MISSING
from cadenza.kernels.triton_compat import tl, triton

__all__ = ["available", "rms_norm", "softmax_topk", "topk_fits"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _emu(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def available(device: torch.device | str) -> bool:
    """Whether the kernels run for tensors on `device` (CUDA with Triton, or the CPU under the interpreter)."""
    device = torch.device(device)
    if _MISSING is not None:
        return False
    return device.type == "cpu" if _INTERPRET else device.type == "cuda"


# --- RMSNorm -------------------------------------------------------------------------------------------------------


@triton.jit
def _round(v, ty: tl.constexpr, EMU_RNE: tl.constexpr):
    """fp32 v rounded to ty; under the interpreter, whose bf16 conversion truncates, to nearest even first (as GPUs
    round), so the conversion after it is exact."""
    if EMU_RNE:
        b = v.to(tl.int32, bitcast=True)
        v = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return v.to(ty)


@triton.jit
def _rms_norm_kernel(x, w, out, xs, os_, H, eps, EMU_X: tl.constexpr, EMU_O: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < H
    v = tl.load(x + row * xs + c, mask=ok, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(v * v, 0) / H + eps)
    n = _round(v * r, x.dtype.element_ty, EMU_X).to(tl.float32)  # x32.to(dtype), as the reference rounds it
    y = tl.load(w + c, mask=ok, other=0.0).to(tl.float32) * n
    tl.store(out + row * os_ + c, _round(y, out.dtype.element_ty, EMU_O), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of x [..., H] with weight [H] (`cadenza.models.common.RMSNorm`'s values) in one launch, one
    program per row; None where the kernel does not apply (the caller computes the reference). The result's
    dtype is the reference's (weight * x-dtype values: PyTorch's promotion)."""
    h = x.shape[-1]
    if (
        not available(x.device)
        or x.dtype not in _DTYPES
        or weight.dtype not in _DTYPES
        or weight.shape != (h,)
        or weight.device != x.device
        or h > 65536
    ):
        return None
    rows = x.reshape(-1, h)  # a view for the usual contiguous x
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(h)
        warps = 4 if block <= 4096 else 8
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            _rms_norm_kernel[(rows.shape[0],)](
                rows,
                weight,
                out,
                rows.stride(0),
                out.stride(0),
                h,
                eps,
                EMU_X=_emu(x.dtype),
                EMU_O=_emu(out.dtype),
                BLOCK=block,
                num_warps=warps,
            )
    return out.view(*x.shape[:-1], h)


# --- softmax top-k routing -----------------------------------------------------------------------------------------

MAX_EXPERTS = 1024  # one program holds a token's logits in registers


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


def topk_fits(router_logits: torch.Tensor, top_k: int) -> bool:
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
    with torch.cuda.device(logits.device) if logits.is_cuda else nullcontext():
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
