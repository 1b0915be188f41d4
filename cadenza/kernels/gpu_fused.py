"""Small fused GPU kernels for a decode step's elementwise work: RMSNorm (alone, or after a residual sum), rotary
embeddings of queries and keys, and softmax top-k routing, one launch each.

Why: at batch 1 a decode layer is dozens of tiny kernels, and inside a CUDA graph each still costs a launch gap
whatever it computes (on the H200 a few microseconds plus the gap before the next:
benchmarks/results/2026-12-04-s20/layer-kernels.txt); PyTorch spells RMSNorm as several kernels and the router's
softmax, top-k and renormalisation as five. RMSNorm computes the same values in one launch (the mean of squares in
another summation order; on the GPU its bf16 outputs equalled PyTorch's). The router (Mixtral, Qwen-MoE, Qwen3-MoE,
OLMoE, after its matmul) does cadenza.moe.routing.softmax_topk's arithmetic (fp32 softmax as exp(x - max) / sum,
the k largest probabilities, lower index first among equal ones, then divided by their sum): the weights match to a
few ulp (the exponential's implementation differs), the experts chosen except where two probabilities are within
those ulp of each other.

Rotary embeddings of an attention's queries and keys take one launch for both instead of PyTorch's ten (a product,
rotate_half's negation and concatenation, another product and a sum, per tensor), bit for bit: each product and the
sum are rounded to the result dtype where PyTorch rounds them. The first version of this kernel (taken out in
01d2a10) rounded with plain conversions and differed from PyTorch by a bf16 step in some elements on the H200 only:
the compiler may turn a rounded product followed by a sum into one fused multiply-add (on sm_90 even in bf16), which
skips a rounding. Here the launch turns that contraction off and bf16 rounds through integer bit operations, which
no float rewrite can see through.
The reference is PyTorch's spelling in `cadenza.models.common` (RMSNorm), which calls this on CUDA
tensors and computes its own where it returns None. The kernels run on CUDA tensors, or on CPU tensors through
Triton's interpreter when TRITON_INTERPRET=1 was set before this module was imported (the tests do that).

Shape legend: R rows, H hidden, B batch, N query heads, K key heads, T tokens, D head dim, d rotated dims (d <= D,
even).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

# bf16 rounding to nearest even by integer operations: a float conversion could be folded into a fused multiply-add
# by the compiler, these cannot
from cadenza.kernels.gpu_moe_triton import _round_bf16
from cadenza.kernels.triton_compat import MISSING as _MISSING
from cadenza.kernels.triton_compat import tl, triton

__all__ = [
    "add_rms_norm",
    "available",
    "rms_norm",
    "rms_norm_applies",
    "rotary_qk",
    "softmax_topk",
    "sum_middle",
    "topk_fits",
]

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
        v = _round_bf16(v)
    return v.to(ty)


@triton.jit
def _scaled(v, w, c, ok, r, ty: tl.constexpr, oty: tl.constexpr, EMU_X: tl.constexpr, EMU_O: tl.constexpr):
    """RMSNorm's last two roundings for the values v at features c of a row whose factor is r, in oty."""
    n = _round(v * r, ty, EMU_X).to(tl.float32)  # x32.to(dtype), as the reference rounds it
    y = tl.load(w + c, mask=ok, other=0.0).to(tl.float32) * n
    return _round(y, oty, EMU_O)


@triton.jit
def _normed(v, w, c, ok, H, eps, ty: tl.constexpr, oty: tl.constexpr, EMU_X: tl.constexpr, EMU_O: tl.constexpr):
    """RMSNorm of the fp32 row v (the reference's arithmetic), in oty."""
    r = 1.0 / tl.sqrt(tl.sum(v * v, 0) / H + eps)
    return _scaled(v, w, c, ok, r, ty, oty, EMU_X, EMU_O)


@triton.jit
def _rms_norm_kernel(x, w, out, xs, os_, H, eps, EMU_X: tl.constexpr, EMU_O: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < H
    v = tl.load(x + row * xs + c, mask=ok, other=0.0).to(tl.float32)
    y = _normed(v, w, c, ok, H, eps, x.dtype.element_ty, out.dtype.element_ty, EMU_X, EMU_O)
    tl.store(out + row * os_ + c, y, mask=ok)


@triton.jit
def _add_rms_norm_kernel(
    x, r, w, s, out, xs, rs, H, eps, EMU_X: tl.constexpr, EMU_O: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """s = x + r (rounded to x's dtype, as PyTorch's sum), out = RMSNorm(s): a residual sum and the next norm."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    ok = c < H
    a = tl.load(x + row * xs + c, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(r + row * rs + c, mask=ok, other=0.0).to(tl.float32)
    v = _round(a + b, s.dtype.element_ty, EMU_X)
    tl.store(s + row * H + c, v, mask=ok)
    y = _normed(v.to(tl.float32), w, c, ok, H, eps, s.dtype.element_ty, out.dtype.element_ty, EMU_X, EMU_O)
    tl.store(out + row * H + c, y, mask=ok)


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the RMSNorm kernels take x [..., H] with this weight [H]."""
    h = x.shape[-1]
    return (
        available(x.device)
        and x.dtype in _DTYPES
        and weight.dtype in _DTYPES
        and weight.shape == (h,)
        and weight.device == x.device
        and h <= 65536
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of x [..., H] with weight [H] (`cadenza.models.common.RMSNorm`'s values) in one launch, one
    program per row; None where the kernel does not apply (the caller computes the reference). The result's
    dtype is the reference's (weight * x-dtype values: PyTorch's promotion)."""
    h = x.shape[-1]
    if not rms_norm_applies(x, weight):
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


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x + r, RMSNorm(x + r)) in one launch (a decoder layer's residual sum and the norm after it): the sum in x's
    dtype as PyTorch's, the norm as `rms_norm`; None where the kernel does not apply."""
    h = x.shape[-1]
    if r.shape != x.shape or r.dtype != x.dtype or r.device != x.device or not rms_norm_applies(x, weight):
        return None
    xr, rr = x.reshape(-1, h), r.reshape(-1, h)
    if xr.stride(-1) != 1 or rr.stride(-1) != 1:
        xr, rr = xr.contiguous(), rr.contiguous()
    s = torch.empty(xr.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(xr.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if xr.shape[0]:
        block = triton.next_power_of_2(h)
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            _add_rms_norm_kernel[(xr.shape[0],)](
                xr, rr, weight, s, out, xr.stride(0), rr.stride(0), h, eps, EMU_X=_emu(x.dtype),
                EMU_O=_emu(out.dtype), BLOCK=block, num_warps=4 if block <= 4096 else 8,
            )  # fmt: skip
    return s.view(x.shape), out.view(x.shape)


# --- sums of partial results ----------------------------------------------------------------------------------------


@triton.jit
def _sum_middle_kernel(part, out, S, B, N, EMU: tl.constexpr, BLOCK: tl.constexpr):
    """out[a, b] = part[a, 0, b] + part[a, 1, b] + ... (fp32, in that order) in out's dtype; N = A B."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    base = i + (i // B) * (S - 1) * B  # a S B + b, for i = a B + b
    acc = tl.load(part + base, mask=m, other=0.0)
    for s in range(1, S):
        acc += tl.load(part + base + s * B, mask=m, other=0.0)
    tl.store(out + i, _round(acc, out.dtype.element_ty, EMU), mask=m)


def sum_middle(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """part [A, S, B] (fp32, contiguous) summed over S in order and cast to dtype, [A, B], in one launch where
    PyTorch takes two (the sum, the cast): the experts' per-slot outputs of a token, a split product's partial sums.
    For a device the kernels run on (the caller checks)."""
    a, s_, b = part.shape
    out = torch.empty(a, b, dtype=dtype, device=part.device)
    if out.numel():
        with torch.cuda.device(part.device) if part.is_cuda else nullcontext():
            _sum_middle_kernel[(triton.cdiv(a * b, 1024),)](part, out, s_, b, a * b, EMU=_emu(dtype), BLOCK=1024)
    return out


# --- rotary embeddings of queries and keys -------------------------------------------------------------------------


@triton.jit
def _rounded(v, ty: tl.constexpr, BF16: tl.constexpr):
    """fp32 v rounded to the result dtype ty, as fp32 (exact in ty)."""
    if BF16:
        v = _round_bf16(v)  # then exact in bf16: the conversions below change nothing
    return v.to(ty).to(tl.float32)


@triton.jit
def _rotary_row(x, cos, sin, out, w, eps, b, h, t, NH, T, sxb, sxh, sxt, scb, sct, D, HALF,
                NORM: tl.constexpr, EMU_X: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Row (b, h, t) of x [B, NH, T, D] (any strides, unit last) rotated into out [B, NH, T, D] (contiguous); with
    NORM first RMSNorm'd over its D features with weight w (Qwen3's and GLM-4.5's per-head q / k norms)."""
    c = tl.arange(0, BLOCK)
    xr = x + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + t.to(tl.int64) * sxt
    cr = b.to(tl.int64) * scb + t.to(tl.int64) * sct
    d = 2 * HALF
    v = tl.load(xr + c, mask=c < D, other=0.0).to(tl.float32)
    lo = c < HALF
    partner = tl.where(lo, c + HALF, c - HALF)  # rotate_half: -x[c + half] below half, x[c - half] above
    pv = tl.load(xr + partner, mask=c < d, other=0.0).to(tl.float32)
    if NORM:  # the norm of the row, then of the partners' values with the same factor
        r = 1.0 / tl.sqrt(tl.sum(v * v, 0) / D + eps)
        ty_x = x.dtype.element_ty
        v = _scaled(v, w, c, c < D, r, ty_x, ty_x, EMU_X, EMU_X).to(tl.float32)
        pv = _scaled(pv, w, partner, c < d, r, ty_x, ty_x, EMU_X, EMU_X).to(tl.float32)
    pv = tl.where(lo, -pv, pv)
    cv = tl.load(cos + cr + c, mask=c < d, other=0.0).to(tl.float32)
    sv = tl.load(sin + cr + c, mask=c < d, other=0.0).to(tl.float32)
    ty = out.dtype.element_ty
    a = _rounded(v * cv, ty, BF16)  # x * cos, rounded as PyTorch's product is
    s = _rounded(pv * sv, ty, BF16)  # rotate_half(x) * sin, rounded
    y = tl.where(c < d, _rounded(a + s, ty, BF16).to(ty), v.to(ty))
    row = (b.to(tl.int64) * NH + h) * T + t
    tl.store(out + row * D + c, y, mask=c < D)


@triton.jit
def _rotary_qk_kernel(
    q, k, cos, sin, qo, ko, qw, kw, eps, N, K, T, QROWS,
    sqb, sqh, sqt, skb, skh, skt, scb, sct, D, HALF,
    NORM: tl.constexpr, EMU_X: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row: q's QROWS = B N T rows first, then k's B K T rows."""
    pid = tl.program_id(0)
    if pid < QROWS:
        r = pid // T
        _rotary_row(q, cos, sin, qo, qw, eps, r // N, r % N, pid % T, N, T, sqb, sqh, sqt, scb, sct, D, HALF,
                    NORM, EMU_X, BF16, BLOCK)  # fmt: skip
    else:
        r = (pid - QROWS) // T
        _rotary_row(k, cos, sin, ko, kw, eps, r // K, r % K, pid % T, K, T, skb, skh, skt, scb, sct, D, HALF,
                    NORM, EMU_X, BF16, BLOCK)  # fmt: skip


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norms: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`cadenza.models.rope.apply_rotary` of q [B, N, T, D] and k [B, K, T, D] (any strides with a unit last one)
    with cos, sin [T, d] or [B, 1, T, d] (d <= D, even; the features past d pass through), in one launch: new
    contiguous tensors in the result dtype (x's and the tables' promoted). norms: (q weight [D], k weight [D], eps)
    of an RMSNorm over each head's features before rotary (`rms_norm`'s arithmetic), weights of q's dtype or
    narrower. None where the kernel does not apply."""
    d = cos.shape[-1]
    ok = (
        available(q.device)
        and q.dim() == k.dim() == 4
        and q.dtype == k.dtype
        and q.dtype in _DTYPES
        and cos.dtype == sin.dtype
        and cos.dtype in _DTYPES
        and cos.shape == sin.shape
        and q.device == k.device == cos.device == sin.device
    )
    if norms is not None:
        qw, kw, eps = norms
        ok = ok and all(
            w.shape == (q.shape[-1],) and w.device == q.device and torch.promote_types(w.dtype, q.dtype) == q.dtype
            for w in (qw, kw)
        )
    if not ok:
        return None
    (b, n, t, dd), kh = q.shape, k.shape[1]
    if not (
        k.shape == (b, kh, t, dd)
        and d % 2 == 0
        and 0 < d <= dd <= 4096
        and cos.shape in ((t, d), (b, 1, t, d))
        and q.stride(-1) == k.stride(-1) == 1
    ):
        return None
    c4 = cos.view(1, 1, t, d) if cos.dim() == 2 else cos
    s4 = sin.view(1, 1, t, d) if sin.dim() == 2 else sin
    if c4.stride(-1) != 1 or s4.stride() != c4.stride():
        c4, s4 = c4.contiguous(), s4.contiguous()
    dtype = torch.promote_types(q.dtype, cos.dtype)
    qo = torch.empty(b, n, t, dd, dtype=dtype, device=q.device)
    ko = torch.empty(b, kh, t, dd, dtype=dtype, device=q.device)
    rows = b * (n + kh) * t
    if rows:
        scb = c4.stride(0) if c4.shape[0] > 1 else 0
        with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
            qw, kw, eps = norms if norms is not None else (q, k, 0.0)  # without norms: never read
            _rotary_qk_kernel[(rows,)](
                q, k, c4, s4, qo, ko, qw, kw, eps, n, kh, t, b * n * t,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), scb, c4.stride(2),
                dd, d // 2, NORM=norms is not None, EMU_X=_emu(q.dtype), BF16=dtype == torch.bfloat16,
                BLOCK=triton.next_power_of_2(dd), num_warps=1, enable_fp_fusion=False,
            )  # fmt: skip
    return qo, ko


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
