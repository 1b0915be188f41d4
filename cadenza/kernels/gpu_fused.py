"""Small fused GPU kernels for a decode step's elementwise work: RMSNorm and rotary embeddings, one launch each.

Why: at batch 1 a decode layer is ~60 tiny kernels, and inside a CUDA graph each still costs ~2 µs of launch gap
on an H200 whatever it computes; PyTorch spells RMSNorm as ~8 kernels and rotary as ~5 per tensor. These
kernels compute the same values in one launch each (RMSNorm's mean in another summation order; rotary bit for
bit: every product is rounded to the result dtype where PyTorch rounds it).

The reference is PyTorch's spelling in `cadenza.models.common` (RMSNorm, apply_rotary), which calls these on CUDA
tensors and computes its own where they return None. The kernels run on CUDA tensors, or on CPU tensors through
Triton's interpreter when TRITON_INTERPRET=1 was set before this module was imported (the tests do that).

Shape legend: R rows, H hidden, B batch, N heads, T tokens, D head dim, d rotated dims (d <= D, even).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

try:
    import triton
    import triton.language as tl

    _MISSING: str | None = None
except ImportError as err:  # the kernels below still parse; they are never launched

    class _NoTriton:
        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton
    _MISSING = f"Triton is not importable ({err})"

__all__ = ["available", "rms_norm", "rotary"]

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
                rows, weight, out, rows.stride(0), out.stride(0), h, eps, EMU_X=_emu(x.dtype), EMU_O=_emu(out.dtype),
                BLOCK=block, num_warps=warps,
            )  # fmt: skip
    return out.view(*x.shape[:-1], h)


# --- rotary embeddings ---------------------------------------------------------------------------------------------


@triton.jit
def _rotary_kernel(x, cos, sin, out, N, T, sxb, sxn, sxt, scb, sct, D, HALF, EMU: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (b, n, t) row of D values; out is contiguous [B, N, T, D] in the result dtype."""
    pid = tl.program_id(0)
    t = pid % T
    n = (pid // T) % N
    b = pid // (T * N)
    c = tl.arange(0, BLOCK)
    xr = x + b.to(tl.int64) * sxb + n.to(tl.int64) * sxn + t.to(tl.int64) * sxt
    cr = b.to(tl.int64) * scb + t.to(tl.int64) * sct
    d = 2 * HALF
    v = tl.load(xr + c, mask=c < D, other=0.0)
    lo = c < HALF
    partner = tl.where(lo, c + HALF, c - HALF)  # rotate_half: -x[c + half] below half, x[c - half] above
    pv = tl.load(xr + partner, mask=c < d, other=0.0).to(tl.float32)
    pv = tl.where(lo, -pv, pv)
    cv = tl.load(cos + cr + c, mask=c < d, other=0.0).to(tl.float32)
    sv = tl.load(sin + cr + c, mask=c < d, other=0.0).to(tl.float32)
    ty = out.dtype.element_ty
    a = _round(v.to(tl.float32) * cv, ty, EMU).to(tl.float32)  # each product rounded, then the sum, as PyTorch
    s = _round(pv * sv, ty, EMU).to(tl.float32)
    y = tl.where(c < d, _round(a + s, ty, EMU), v.to(ty))
    tl.store(out + pid.to(tl.int64) * D + c, y, mask=c < D)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """`cadenza.models.common.apply_rotary` in one launch: x [B, N, T, D] (any strides), cos and sin [T, d] or
    [B, 1, T, d] (d <= D, even); a new contiguous tensor. None where the kernel does not apply."""
    d = cos.shape[-1]
    b, n, t, dd = x.shape if x.dim() == 4 else (0, 0, 0, 0)
    ok = (
        available(x.device)
        and x.dim() == 4
        and x.dtype in _DTYPES
        and cos.dtype == sin.dtype
        and cos.dtype in _DTYPES
        and cos.shape == sin.shape
        and cos.device == x.device == sin.device
        and d % 2 == 0
        and 0 < d <= dd <= 4096
        and cos.shape in ((t, d), (b, 1, t, d))
    )
    if not ok:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    c4 = cos.view(1, 1, t, d) if cos.dim() == 2 else cos
    s4 = sin.view(1, 1, t, d) if sin.dim() == 2 else sin
    if c4.stride(-1) != 1 or s4.stride() != c4.stride():
        c4, s4 = c4.contiguous(), s4.contiguous()
    out = torch.empty(b, n, t, dd, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    if out.numel():
        scb = c4.stride(0) if c4.shape[0] > 1 else 0
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            _rotary_kernel[(b * n * t,)](
                x, c4, s4, out, n, t, x.stride(0), x.stride(1), x.stride(2), scb, c4.stride(2), dd, d // 2,
                EMU=_emu(out.dtype), BLOCK=triton.next_power_of_2(dd), num_warps=1,
            )  # fmt: skip
    return out
