"""Small fused GPU kernels for a decode step's elementwise work: RMSNorm in one launch.

Why: at batch 1 a decode layer is dozens of tiny kernels, and inside a CUDA graph each still costs a launch gap
whatever it computes; PyTorch spells RMSNorm as several kernels. This kernel computes the same values in one
launch (the mean of squares in another summation order; on the GPU its bf16 outputs equalled PyTorch's).

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

__all__ = ["available", "rms_norm"]

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
