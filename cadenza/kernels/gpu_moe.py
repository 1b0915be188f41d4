"""Routed experts on the GPU: Triton kernels that read the CPU kernel's weight layouts as they are.

A GPU copy of an expert is the same bytes as its host copy (rows of `gate_up` / `down` copied over), so these
kernels read both layouts that cadenza.kernels.layout defines, with no conversion:

- plain: gate, up [R, I, H] and down [R, H, I], row-major, in the compute dtype (bf16, fp16, fp32);
- tiled ("bf16", "int8", "int4"; `pack_layer`, byte layout in cpu_moe.cpp's header comment): gate_up
  uint8 [R, Ip/2, gu_bytes], tile j = rows gate 2j, gate 2j+1, up 2j, up 2j+1 over Hp columns; down uint8
  [R, Hp/4, dn_bytes], tile j = rows 4j .. 4j+3 over Ip columns. A tile is its scales, then 64-byte pieces of its
  4 rows interleaved: 256 contiguous bytes per piece, which is what a warp reads in one go.

`moe_decode` is the routed-expert part of a decode step: y[t] = sum over slots j of w[t, j] * expert(x[t]) for
the (token, slot) pairs whose row is not -1. Two Triton launches (three for int4), then a sum over the k slots in
torch; nothing waits on the host and nothing depends on the routing's values, so a CUDA graph can capture it:

  0. int4 only: x staged, per 128 columns plane by plane and scaled by powers of two (_stage_int4_kernel);
  1. gate/up, grid (pair, block of weight rows): the rows' dot products with x[token] over all columns (fp32,
     dequantizing on the fly), h[pair, i] = act(gate_i . x) * (up_i . x), fp32 (h is I floats a pair, nothing
     next to the weights; fp32 keeps the one rounding at the end, like the fallback); int4 writes h staged;
  2. down, grid (pair, block of down rows): y_pair[pair, r] = (down_r . h[pair]) * w[pair], fp32 [T k, H];
  3. y = y_pair.view(T, k, H).sum(1) in fp32, cast to x's dtype: deterministic, no atomics.

The pair is the fastest grid axis, so pairs that share an expert read its rows at about the same time (from L2).
A pair with row -1 runs its loops zero times and writes zeros. Decode is bound by reading weights, and quantized
weights must be unpacked at that rate, so the kernels read int32 words and spend about two instructions on a
weight: bf16 halves become floats by a shift or a mask; an int8 byte, flipped by 0x80 into a float's mantissa
next to 2^23's exponent, is 2^23 + 128 + q; an int4 nibble masked in place is the denormal q 16^n 2^-149, which
one FMA with x staged times 2^(89 - 4n) turns into q x 2^-60. x is met in the order the words hold the columns;
scales apply per (row, group) to partial sums (int4: sum (q - z) x = sum q x - z sum x).

`dequantize_expert` / `dequantize_into` unpack one expert's tiles into gate, up [I, H] and down [H, I] of any
dtype (the prefill path: then a tensor-core matmul); `expert_forward` does both for one expert and many tokens.

Every function runs on CPU tensors too: through Triton's interpreter when TRITON_INTERPRET=1 was set before this
module was imported (the tests do that), otherwise through the pure-torch fallback, which is the reference.

Shape legend: E experts of a layer, R stacked expert rows (any experts, e.g. a GPU cache's slots), T tokens,
k slots per token, P = T k pairs, H hidden, I intermediate, Hp / Ip: H / I padded to multiples of 128.
"""

import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from cadenza.kernels.cpu_moe import ACT_CODES
from cadenza.kernels.layout import (
    FORMATS,
    INT4_GROUPS,
    INT8_GROUPS,
    PAD,
    ROWS,
    _header_bytes,
    _tile_bytes,
    dequantize_tiles,
)
from cadenza.kernels.triton_compat import MISSING as _MISSING
from cadenza.kernels.triton_compat import tl, triton
from cadenza.models.common import act_fn

__all__ = [
    "Blocks",
    "available",
    "default_blocks",
    "dequantize_expert",
    "dequantize_into",
    "expert_forward",
    "moe_decode",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as when triton.jit defined the kernels below
_FMT_CODES = {None: 0, "bf16": 1, "int8": 2, "int4": 3}
_BYTES_PER_COL = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}
_warned = False


def available(device: torch.device | str) -> bool:
    """Whether the Triton kernels run for tensors on `device`: a CUDA device with Triton importable, or the CPU
    under Triton's interpreter (TRITON_INTERPRET=1 before this module was imported)."""
    device = torch.device(device)
    if _MISSING is not None:
        return False
    return device.type == "cpu" if _INTERPRET else device.type == "cuda"


def _use_triton(device: torch.device, route: str) -> bool:
    global _warned
    if route not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown route {route!r}: use auto, triton or torch")
    if route == "torch":
        return False
    ok = available(device)
    if route == "triton" and not ok:
        raise RuntimeError(f"the Triton kernels cannot run on {device}: {_MISSING or 'not a CUDA device'}")
    if not ok and device.type == "cuda" and not _warned:
        warnings.warn(f"{_MISSING}: routed experts on the GPU use the slower PyTorch fallback", stacklevel=3)
        _warned = True
    return ok


@dataclass(frozen=True)
class Blocks:
    """Work per program of the decode kernels. Rows are weight rows (gate and up rows count apart; tiled: 4 a
    tile); cols are columns per loop step (capped at the row's length); warps per program, for both kernels
    (int4: cols / 1024 keeps each tile's rows in one thread). Powers of two. The benchmark
    (cadenza.bench.gpu_kernel) times several; `default_blocks` picks one from the shapes."""

    gu_rows: int = 16
    gu_cols: int = 512
    dn_rows: int = 8
    dn_cols: int = 512
    warps: int = 4
    int4_rows: int = 0  # int4's inner loop: 0 rows across threads, 1 a tile's 4 rows in each thread (x read once)

    def __post_init__(self):
        pow2 = lambda n, lo: n >= lo and n & (n - 1) == 0
        if not (pow2(self.gu_rows, 4) and pow2(self.dn_rows, 4) and pow2(self.gu_cols, 128)):
            raise ValueError(f"{self}: rows must be powers of two >= 4, cols powers of two >= 128")
        if not (pow2(self.dn_cols, 128) and pow2(self.warps, 1)):
            raise ValueError(f"{self}: cols must be powers of two >= 128, warps a power of two")
        if self.int4_rows not in (0, 1):
            raise ValueError(f"{self}: int4_rows is 0 or 1")


def _step_cols(n: int, cap: int) -> int:
    return max(128, min(cap, 1 << max(0, (n - 1).bit_length())))


def default_blocks(fmt: str | None, hidden: int, intermediate: int, pairs: int, elem_bytes: int = 2) -> Blocks:
    """Block sizes for a call: 512 bytes of each weight row per loop step with four warps (bf16: 256 columns;
    int8: 256 columns and two warps, measured faster), and rows per program halved from 16 (gate/up) and 8
    (down) down to 4 while the grid has fewer than ~1024 programs (about 8 per SM of an H200's 132, to keep
    enough loads in flight); int4: the rows-in-thread loop with its own measured blocks.
    cadenza.bench.gpu_kernel times these against other choices."""
    if fmt == "int4":
        # measured on an H200 (cadenza.bench.gpu_kernel, 2026-12-02): a tile's rows in each thread with 8 tiles of
        # gate/up and 4 of down per program, 512 columns a step, 4 warps, was the fastest at 1-8 tokens at both
        # Mixtral's shapes (T=1: 108 us for two experts, 1.78 TB/s; the rows-across-threads loop: 220 us) and
        # Qwen3's (18 us against 28)
        return Blocks(32, _step_cols(hidden, 512), 16, _step_cols(intermediate, 512), 4, int4_rows=1)
    bpc = _BYTES_PER_COL[fmt] if fmt else elem_bytes
    cols = int(512 / bpc)
    warps = 4
    if fmt == "int8":
        # measured on an H200 (a sweep of rows x cols x warps at T=1): 256 columns and 2 warps per program read
        # int8 at 2.8 TB/s and 1.6 TB/s (from 2.76 and 0.66)
        cols, warps = 256, 2
    gu, dn = 16, 8
    while gu > 4 and pairs * 2 * intermediate / gu < 1024:
        gu //= 2
    while dn > 4 and pairs * hidden / dn < 1024:
        dn //= 2
    return Blocks(gu, _step_cols(hidden, cols), dn, _step_cols(intermediate, cols), warps)


# --- Triton: dot products of tile rows with a vector ---------------------------------------------------------------
# Each returns [BT, 4] fp32: the 4 rows of tiles t [BT] (at w, uint8; tile stride tbw int32 words, body after hbw
# words) dotted with x (xr, n_x valid values, zero past them) over K (padded) columns, in n_iter steps of BK.


@triton.jit
def _dot_bf16(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, BT: tl.constexpr, BK: tl.constexpr):
    NP: tl.constexpr = BK // 32  # 64-byte pieces per row and step; word m holds columns 2m (low half), 2m + 1
    p = tl.arange(0, NP)
    r = tl.arange(0, 4)
    m = tl.arange(0, 16)
    wi = w.to(tl.pointer_type(tl.int32))
    off = t[:, None, None, None] * tbw + hbw + p[None, :, None, None] * 64 + r[None, None, :, None] * 16
    off = off + m[None, None, None, :]
    acc = tl.zeros([BT, NP, 4, 16], tl.float32)
    for it in range(n_iter):
        pg = it * NP + p
        ok = tmask[:, None, None, None] & (pg < K // 32)[None, :, None, None]
        wv = tl.load(wi + off + it * (NP * 64), mask=ok, other=0)
        col = pg[:, None] * 32 + 2 * m[None, :]
        x0 = tl.load(xr + col, mask=col < n_x, other=0.0).to(tl.float32)[None, :, None, :]
        x1 = tl.load(xr + col + 1, mask=col + 1 < n_x, other=0.0).to(tl.float32)[None, :, None, :]
        acc += (wv << 16).to(tl.float32, bitcast=True) * x0 + (wv & -65536).to(tl.float32, bitcast=True) * x1
    return tl.sum(tl.sum(acc, 3), 1)


@triton.jit
def _dot_int8(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, NG, GROUP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    NH: tl.constexpr = BK // 32  # half pieces (32 columns of a row, 8 words) per step: a scale group is >= 32
    hp = tl.arange(0, NH)
    r = tl.arange(0, 4)
    m = tl.arange(0, 8)
    wi = w.to(tl.pointer_type(tl.int32))
    ws = w.to(tl.pointer_type(tl.float32))  # header: fp32 scales [4 rows][NG]
    off = t[:, None, None, None] * tbw + hbw + (hp // 2 * 64 + hp % 2 * 8)[None, :, None, None]
    off = off + r[None, None, :, None] * 16 + m[None, None, None, :]
    acc = tl.zeros([BT, NH, 4], tl.float32)
    for it in range(n_iter):
        hg = it * NH + hp
        ok = tmask[:, None, None] & (hg < K // 32)[None, :, None]
        wv = tl.load(wi + off + it * (NH * 32), mask=ok[:, :, :, None], other=0)
        col = hg[:, None] * 32 + 4 * m[None, :]
        part = tl.zeros([BT, NH, 4, 8], tl.float32)
        for b in tl.static_range(4):  # byte b of word m is column 4m + b; (u ^ 0x80) | 2^23's bits = 2^23 + 128 + q
            xb = tl.load(xr + col + b, mask=col + b < n_x, other=0.0).to(tl.float32)
            q = (((wv >> (8 * b)) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            part += q * xb[None, :, None, :]
        g = hg * 32 // GROUP if GROUP else hg * 0
        sc = tl.load(ws + t[:, None, None] * tbw + r[None, None, :] * NG + g[None, :, None], mask=ok, other=0.0)
        acc += tl.sum(part, 3) * sc
    return tl.sum(acc, 1)


@triton.jit
def _dot_int4(w, tbw, hbw, t, tmask, xs, K, n_iter, NG, GROUP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """int4: xs is x staged by _stage_int4 (or kernel 1's h): per 128 columns, plane n (columns 32n .. 32n + 31,
    one scale group) as its 16 even then 16 odd columns, times 2^(89 - 4n). Int32 word m of a row's 64-byte
    piece holds, in nibble n of its low / high half, columns 32n + 2m / 2m + 1; the nibble masked in place, read
    as a float, is the denormal q 16^n 2^-149 (exact; nothing here flushes denormals), so one FMA with the staged
    value adds q x 2^-60, exactly rounded: a nibble costs a LOP3 and an FFMA. A thread holds 4 words (a quarter)
    of BT tiles' rows and the staged x they meet, in the layout the weights load in (no shuffles in the loop)."""
    NP: tl.constexpr = BK // 128  # pieces (128 columns) per row and step
    p = tl.arange(0, NP)[None, :, None, None]
    r = tl.arange(0, 4)[None, None, :, None]
    mi = tl.arange(0, 4)[None, None, None, :]
    wi = w.to(tl.pointer_type(tl.int32))
    ws = w.to(tl.pointer_type(tl.bfloat16))  # header: bf16 scales [4][NG], then uint8 zero points [4][NG]
    off = t[:, None, None, None] * tbw + hbw + p * 64 + r * 16 + mi  # quarter 0 of each row's piece
    xoff = p * 128 + r * 0 + mi  # the staged x, the same for every row, in the weights' layout
    # scales of tile 0 stand in for masked-off tiles' (always readable, finite; their results are dropped)
    tw = tl.where(tmask, t, 0)[:, None, None] * tbw
    rg = tl.arange(0, 4)[None, None, :] * NG
    p3 = tl.arange(0, NP)[None, :, None]
    acc = tl.zeros([BT, NP, 4], tl.float32)
    for it in range(n_iter):
        ok = tmask[:, None, None, None] & (it * NP + p < K // 128)
        wq = wi + off + it * (NP * 64)
        # no `other` (no zeroing): a masked-off word's nibbles are still finite denormals, met by a staged 0
        w0, w1, w2, w3 = tl.load(wq, ok), tl.load(wq + 4, ok), tl.load(wq + 8, ok), tl.load(wq + 12, ok)
        u0, u1, u2, u3 = w0 >> 16, w1 >> 16, w2 >> 16, w3 >> 16
        xq = xs + xoff + it * (NP * 128)  # no mask: the staged rows are zero-padded to whole steps
        for n in tl.static_range(4):
            mk = 15 << (4 * n)
            xn = xq + 32 * n
            a0, a1 = tl.load(xn), tl.load(xn + 16)
            sx = a0 + a1
            qx = (w0 & mk).to(tl.float32, bitcast=True) * a0
            qx += (u0 & mk).to(tl.float32, bitcast=True) * a1
            a0, a1 = tl.load(xn + 4), tl.load(xn + 20)
            sx += a0 + a1
            qx += (w1 & mk).to(tl.float32, bitcast=True) * a0
            qx += (u1 & mk).to(tl.float32, bitcast=True) * a1
            a0, a1 = tl.load(xn + 8), tl.load(xn + 24)
            sx += a0 + a1
            qx += (w2 & mk).to(tl.float32, bitcast=True) * a0
            qx += (u2 & mk).to(tl.float32, bitcast=True) * a1
            a0, a1 = tl.load(xn + 12), tl.load(xn + 28)
            sx += a0 + a1
            qx += (w3 & mk).to(tl.float32, bitcast=True) * a0
            qx += (u3 & mk).to(tl.float32, bitcast=True) * a1
            # plane n of a piece is one scale group: sum (q - z) x s = s (sum q x - z sum x)
            g = tl.minimum(((it * NP + p3) * 128 + 32 * n) // GROUP, NG - 1)
            sc = tl.load(ws + tw * 2 + rg + g).to(tl.float32)
            z = tl.load(w + tw * 4 + 8 * NG + rg + g).to(tl.int32)
            z = (z | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exact, without a slow I2F
            sxn = tl.sum(sx, 3) * (2.0 ** (4 * n - 89))
            acc += sc * (tl.sum(qx, 3) * 1152921504606846976.0 - z * sxn)  # 2^60
    return tl.sum(acc, 1)


@triton.jit
def _dot_int4_rows(w, tbw, hbw, t, tmask, xs, K, n_iter, NG, GROUP: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr):  # fmt: skip
    """_dot_int4's values with a tile's 4 rows held by the same threads: word m of each row's 64-byte piece meets
    the same two staged x values, so x (8 bytes a word, against the word's 4 bytes of weights) is loaded once for
    4 rows, and a scale group's products are summed before its scale and zero point apply (one FMA pair a group,
    not a plane). The sums over a piece's 16 words wait until the end."""
    NP: tl.constexpr = BK // 128
    GP: tl.constexpr = GROUP // 32  # planes per scale group (GROUP >= 32)
    p = tl.arange(0, NP)[None, :, None]
    m = tl.arange(0, 16)[None, None, :]
    wi = w.to(tl.pointer_type(tl.int32))
    ws = w.to(tl.pointer_type(tl.bfloat16))  # header: bf16 scales [4][NG], then uint8 zero points [4][NG]
    off = t[:, None, None] * tbw + hbw + p * 64 + m  # word m of row 0's piece p; row r is 16 words on
    xoff = p * 128 + m
    tw = tl.where(tmask, t, 0)[:, None, None] * tbw
    acc0 = tl.zeros([BT, NP, 16], tl.float32)
    acc1 = tl.zeros([BT, NP, 16], tl.float32)
    acc2 = tl.zeros([BT, NP, 16], tl.float32)
    acc3 = tl.zeros([BT, NP, 16], tl.float32)
    for it in range(n_iter):
        ok = tmask[:, None, None] & (it * NP + p < K // 128)
        wq = wi + off + it * (NP * 64)
        w0, w1, w2, w3 = tl.load(wq, ok), tl.load(wq + 16, ok), tl.load(wq + 32, ok), tl.load(wq + 48, ok)
        u0, u1, u2, u3 = w0 >> 16, w1 >> 16, w2 >> 16, w3 >> 16
        xq = xs + xoff + it * (NP * 128)
        for gi in tl.static_range(4 // GP):
            q0 = tl.zeros([BT, NP, 16], tl.float32)
            q1 = tl.zeros([BT, NP, 16], tl.float32)
            q2 = tl.zeros([BT, NP, 16], tl.float32)
            q3 = tl.zeros([BT, NP, 16], tl.float32)
            sx = tl.zeros([1, NP, 16], tl.float32)
            for j in tl.static_range(GP):
                n = gi * GP + j
                mk = 15 << (4 * n)
                a0, a1 = tl.load(xq + 32 * n), tl.load(xq + 32 * n + 16)
                sx += (a0 + a1) * ((38 + 4 * n) << 23).to(tl.float32, bitcast=True)  # 2^(4n - 89): unstaged
                q0 += (w0 & mk).to(tl.float32, bitcast=True) * a0 + (u0 & mk).to(tl.float32, bitcast=True) * a1
                q1 += (w1 & mk).to(tl.float32, bitcast=True) * a0 + (u1 & mk).to(tl.float32, bitcast=True) * a1
                q2 += (w2 & mk).to(tl.float32, bitcast=True) * a0 + (u2 & mk).to(tl.float32, bitcast=True) * a1
                q3 += (w3 & mk).to(tl.float32, bitcast=True) * a0 + (u3 & mk).to(tl.float32, bitcast=True) * a1
            g = tl.minimum(((it * NP + p) * 128 + 32 * GP * gi) // GROUP, NG - 1)
            sc = ws + tw * 2 + g
            zp = w + tw * 4 + 8 * NG + g
            z = (tl.load(zp).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            acc0 += tl.load(sc).to(tl.float32) * (q0 * 1152921504606846976.0 - z * sx)  # 2^60
            z = (tl.load(zp + NG).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            acc1 += tl.load(sc + NG).to(tl.float32) * (q1 * 1152921504606846976.0 - z * sx)
            z = (tl.load(zp + 2 * NG).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            acc2 += tl.load(sc + 2 * NG).to(tl.float32) * (q2 * 1152921504606846976.0 - z * sx)
            z = (tl.load(zp + 3 * NG).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            acc3 += tl.load(sc + 3 * NG).to(tl.float32) * (q3 * 1152921504606846976.0 - z * sx)
    r = tl.arange(0, 4)[None, :]
    s0, s1 = tl.sum(tl.sum(acc0, 2), 1)[:, None], tl.sum(tl.sum(acc1, 2), 1)[:, None]
    s2, s3 = tl.sum(tl.sum(acc2, 2), 1)[:, None], tl.sum(tl.sum(acc3, 2), 1)[:, None]
    return tl.where(r == 0, s0, tl.where(r == 1, s1, tl.where(r == 2, s2, s3)))


@triton.jit
def _plane_scale(n):
    """2^(89 - 4n), the staged scale of plane n, built from its exponent bits (exact)."""
    return ((216 - 4 * n) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _stage_int4_kernel(x, xs, H, Hp, BLOCK: tl.constexpr):
    """xs [T, Hp] fp32 = x [T, H] staged for _dot_int4 (Hp: a multiple of 128 and of its step; zero past H)."""
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(0).to(tl.int64)
    v = tl.load(x + row * H + c, mask=c < H, other=0.0).to(tl.float32)
    n = c % 128 // 32
    at = c // 128 * 128 + n * 32 + c % 2 * 16 + c % 32 // 2
    tl.store(xs + row * Hp + at, v * _plane_scale(n), mask=c < Hp)


@triton.jit
def _dot_tiles(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, NG, FMT: tl.constexpr, GROUP: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, ROWS4: tl.constexpr):  # fmt: skip
    if FMT == 1:
        acc = _dot_bf16(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, BT, BK)
    elif FMT == 2:
        acc = _dot_int8(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, NG, GROUP, BT, BK)
    elif ROWS4:
        acc = _dot_int4_rows(w, tbw, hbw, t, tmask, xr, K, n_iter, NG, GROUP, BT, BK)
    else:
        acc = _dot_int4(w, tbw, hbw, t, tmask, xr, K, n_iter, NG, GROUP, BT, BK)
    return acc


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:  # silu
        out = g * tl.sigmoid(g)
    elif ACT == 1:  # gelu, tanh approximation; tanh(a) = 1 - 2 / (exp(2a) + 1)
        a = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        out = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * a) + 1.0))
    elif ACT == 2:  # gelu (erf)
        out = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:  # relu
        out = tl.maximum(g, 0.0)
    return out


@triton.jit
def _pair_row(rows, pair):
    """(row as int64, clamped to 0; whether the pair is computed here)."""
    e = tl.load(rows + pair).to(tl.int64)
    return tl.maximum(e, 0), e >= 0


# --- Triton: the decode kernels ------------------------------------------------------------------------------------


@triton.jit
def _tiled_gate_up_kernel(x, xstride, rows, h, hstride, gu, gu_stride, tbw, hbw, NG, H, Hp, Ip, k, ACT: tl.constexpr,
                          FMT: tl.constexpr, GROUP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          ROWS4: tl.constexpr):  # fmt: skip
    pair = tl.program_id(0)
    e, live = _pair_row(rows, pair)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    tmask = t < Ip // 2
    n_iter = tl.where(live, tl.cdiv(Hp, BK), 0)
    xr = x + (pair // k).to(tl.int64) * xstride
    acc = _dot_tiles(gu + e * gu_stride, tbw, hbw, t, tmask, xr, H, Hp, n_iter, NG, FMT, GROUP, BT, BK, ROWS4)
    r = tl.arange(0, 4)[None, :]  # tile rows: gate 2j, gate 2j + 1, up 2j, up 2j + 1
    g0, g1 = tl.sum(tl.where(r == 0, acc, 0.0), 1), tl.sum(tl.where(r == 1, acc, 0.0), 1)
    u0, u1 = tl.sum(tl.where(r == 2, acc, 0.0), 1), tl.sum(tl.where(r == 3, acc, 0.0), 1)
    h0, h1 = _act(g0, ACT) * u0, _act(g1, ACT) * u1  # columns 2t, 2t + 1 of h
    hr = h + pair.to(tl.int64) * hstride
    if FMT == 3:  # staged for the int4 down kernel (_stage_int4_kernel), zero-padded to hstride
        n = t % 64 // 16
        at = t // 64 * 128 + n * 32 + t % 16
        pad = t < hstride // 2
        tl.store(hr + at, tl.where(tmask, h0 * _plane_scale(n), 0.0), mask=pad)
        tl.store(hr + at + 16, tl.where(tmask, h1 * _plane_scale(n), 0.0), mask=pad)
    else:
        tl.store(hr + 2 * t, h0, mask=tmask)
        tl.store(hr + 2 * t + 1, h1, mask=tmask)


@triton.jit
def _tiled_down_kernel(h, hstride, rows, wts, y, dn, dn_stride, tbw, hbw, NG, H, Hp, Ip, FMT: tl.constexpr,
                       GROUP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, ROWS4: tl.constexpr):  # fmt: skip
    pair = tl.program_id(0)
    e, live = _pair_row(rows, pair)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    tmask = t < Hp // 4
    n_iter = tl.where(live, tl.cdiv(Ip, BK), 0)
    hr = h + pair.to(tl.int64) * hstride
    acc = _dot_tiles(dn + e * dn_stride, tbw, hbw, t, tmask, hr, Ip, Ip, n_iter, NG, FMT, GROUP, BT, BK, ROWS4)
    wt = tl.where(live, tl.load(wts + pair).to(tl.float32), 0.0)
    o = 4 * t[:, None] + tl.arange(0, 4)[None, :]
    tl.store(y + pair.to(tl.int64) * H + o, acc * wt, mask=o < H)


@triton.jit
def _plain_gate_up_kernel(x, rows, h, gate, up, H, INTER, k, ACT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    pair = tl.program_id(0)
    e, live = _pair_row(rows, pair)
    i = tl.program_id(1) * BR + tl.arange(0, BR)
    c = tl.arange(0, BK)
    n_iter = tl.where(live, tl.cdiv(H, BK), 0)
    xr = x + (pair // k).to(tl.int64) * H
    gate, up = gate + e * INTER * H, up + e * INTER * H
    off = i[:, None] * H + c[None, :]
    acc_g = tl.zeros([BR, BK], tl.float32)
    acc_u = tl.zeros([BR, BK], tl.float32)
    for it in range(n_iter):
        cc = it * BK + c
        xv = tl.load(xr + cc, mask=cc < H, other=0.0).to(tl.float32)[None, :]
        ok = (i < INTER)[:, None] & (cc < H)[None, :]
        acc_g += tl.load(gate + off + it * BK, mask=ok, other=0.0).to(tl.float32) * xv
        acc_u += tl.load(up + off + it * BK, mask=ok, other=0.0).to(tl.float32) * xv
    hv = _act(tl.sum(acc_g, 1), ACT) * tl.sum(acc_u, 1)
    tl.store(h + pair.to(tl.int64) * INTER + i, hv, mask=i < INTER)


@triton.jit
def _plain_down_kernel(h, rows, wts, y, down, H, INTER, BR: tl.constexpr, BK: tl.constexpr):
    pair = tl.program_id(0)
    e, live = _pair_row(rows, pair)
    o = tl.program_id(1) * BR + tl.arange(0, BR)
    c = tl.arange(0, BK)
    n_iter = tl.where(live, tl.cdiv(INTER, BK), 0)
    hr = h + pair.to(tl.int64) * INTER
    down = down + e * H * INTER
    off = o[:, None] * INTER + c[None, :]
    acc = tl.zeros([BR, BK], tl.float32)
    for it in range(n_iter):
        cc = it * BK + c
        hv = tl.load(hr + cc, mask=cc < INTER, other=0.0)[None, :]
        ok = (o < H)[:, None] & (cc < INTER)[None, :]
        acc += tl.load(down + off + it * BK, mask=ok, other=0.0).to(tl.float32) * hv
    wt = tl.where(live, tl.load(wts + pair).to(tl.float32), 0.0)
    tl.store(y + pair.to(tl.int64) * H + o, tl.sum(acc, 1) * wt, mask=o < H)


# --- Triton: dequantize one expert ---------------------------------------------------------------------------------


@triton.jit
def _dequant_kernel(src, tb, hb, n_tiles, K, NG, out0, out1, ld, n_rows, n_cols, GU: tl.constexpr,
                    FMT: tl.constexpr, GROUP: tl.constexpr, EMU_RNE: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr):  # fmt: skip
    """Tiles t of a matrix with K padded columns -> rows of out0 (down: row 4t + r; gate_up: gate row 2t + r)
    and out1 (gate_up: up row 2t + r - 2), cropped to n_rows x n_cols; the values of dequantize_tiles, rounded
    once. Columns are [blocks of GS][GS], GS one scale's span, so scales load once per row and block."""
    GS: tl.constexpr = GROUP if GROUP else BK
    t = (tl.program_id(0) * BT + tl.arange(0, BT))[:, None, None, None]
    r = tl.arange(0, 4)[None, :, None, None]
    gb = tl.arange(0, BK // GS)[None, None, :, None]
    c = tl.program_id(1) * BK + gb * GS + tl.arange(0, GS)[None, None, None, :]
    ok = (t < n_tiles) & (c < K)
    tile = src + t.to(tl.int64) * tb
    g = (tl.program_id(1) * BK + gb * GS) // GS if GROUP else gb * 0  # [1, 1, blocks, 1]
    okg = (t < n_tiles) & (g < NG)
    if FMT == 1:  # bf16: 32 columns per 64-byte piece
        v = tl.load((tile + (c // 32) * 256 + r * 64).to(tl.pointer_type(tl.bfloat16)) + c % 32, mask=ok)
        v = v.to(tl.float32)
    elif FMT == 2:  # int8: 64 columns per piece, fp32 scale per row and group; (u ^ 0x80) | 2^23 = 2^23 + 128 + q
        q = tl.load((tile + hb + (c // 64) * 256 + r * 64 + c % 64).to(tl.pointer_type(tl.int8)), mask=ok)
        q = ((q.to(tl.int32) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        v = q * tl.load(tile.to(tl.pointer_type(tl.float32)) + r * NG + g, mask=okg)
    else:  # int4: 128 columns per piece; 16-bit word c % 32 holds column c in nibble (c % 128) / 32
        wd = tl.load((tile + hb + (c // 128) * 256 + r * 64).to(tl.pointer_type(tl.int16)) + c % 32, mask=ok)
        q = (((wd.to(tl.int32) >> (4 * (c % 128 // 32))) & 15) | 0x4B000000).to(tl.float32, bitcast=True)
        sc = tl.load(tile.to(tl.pointer_type(tl.bfloat16)) + r * NG + g, mask=okg).to(tl.float32)
        z = tl.load(tile + 8 * NG + r * NG + g, mask=okg).to(tl.int32)
        v = (q - (z | 0x4B000000).to(tl.float32, bitcast=True)) * sc  # 2^23 + q - (2^23 + z), exact
    if EMU_RNE:  # bf16 output under the interpreter, which truncates: round to nearest even here (GPUs do)
        b = v.to(tl.int32, bitcast=True)
        v = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    v = v.to(out0.dtype.element_ty)
    if GU:
        row = 2 * t + r % 2
        ok = ok & (row < n_rows) & (c < n_cols)
        tl.store(out0 + row * ld + c, v, mask=ok & (r < 2))
        tl.store(out1 + row * ld + c, v, mask=ok & (r >= 2))
    else:
        row = 4 * t + r
        tl.store(out0 + row * ld + c, v, mask=ok & (row < n_rows) & (c < n_cols))


# --- host side -----------------------------------------------------------------------------------------------------


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass(frozen=True)
class _Tiled:
    """A tiled layer's geometry, checked against the tensors: tile and header bytes, groups per row."""

    hp: int
    ip: int
    gu_tb: int
    gu_hb: int
    dn_tb: int
    dn_hb: int
    ng_h: int
    ng_i: int


def _tiled(gate_up: torch.Tensor, down: torch.Tensor, fmt: str, group: int, hidden, intermediate) -> _Tiled:
    if fmt not in FORMATS:
        raise ValueError(f"unknown expert format {fmt!r}: use one of {', '.join(FORMATS)} (or None: plain tensors)")
    if hidden is None or intermediate is None:
        raise ValueError("tiled experts need hidden= and intermediate= (the unpadded H and I)")
    if group not in {"bf16": (0,), "int8": INT8_GROUPS, "int4": INT4_GROUPS}[fmt]:
        raise ValueError(f"group {group} is not a {fmt} layout's group (see layout.pack_layer)")
    hp, ip = _round_up(hidden, PAD), _round_up(intermediate, PAD)
    want_gu = (ip // 2, _tile_bytes(fmt, group, hp))
    want_dn = (hp // ROWS, _tile_bytes(fmt, group, ip))
    if tuple(gate_up.shape[-2:]) != want_gu or tuple(down.shape[-2:]) != want_dn:
        raise ValueError(
            f"{fmt} (group {group}) tiles for H={hidden}, I={intermediate} are gate_up [.., {want_gu[0]}, "
            f"{want_gu[1]}] and down [.., {want_dn[0]}, {want_dn[1]}], got {tuple(gate_up.shape)} and "
            f"{tuple(down.shape)}"
        )
    for name, m in (("gate_up", gate_up), ("down", down)):
        if m.dtype != torch.uint8 or m.stride(-1) != 1 or m.stride(-2) != m.shape[-1]:
            raise ValueError(f"{name} must be uint8 tiles with contiguous rows, got {m.dtype} strides {m.stride()}")
    ng_h, ng_i = (hp // group, ip // group) if group else (1, 1)
    return _Tiled(
        hp, ip, want_gu[1], _header_bytes(fmt, group, hp), want_dn[1], _header_bytes(fmt, group, ip), ng_h, ng_i
    )


def moe_decode(
    x: torch.Tensor,
    rows: torch.Tensor,
    topk_weights: torch.Tensor,
    mats: tuple[torch.Tensor, ...],
    act: str,
    *,
    fmt: str | None = None,
    group: int = 0,
    hidden: int | None = None,
    intermediate: int | None = None,
    blocks: Blocks | None = None,
    route: str = "auto",
) -> torch.Tensor:
    """y [T, H] (x's dtype) = sum over slots j of topk_weights[t, j] * expert_{rows[t, j]}(x[t]), fp32 inside.

    x [T, H] bf16 / fp16 / fp32; rows [T, k] int32 / int64: the row of `mats` for each (token, slot) pair, or -1
    to skip it (computed elsewhere; it adds 0); topk_weights [T, k]; act: a `cadenza.models.common.ACTIVATIONS`
    name. mats: plain (gate [R, I, H], up [R, I, H], down [R, H, I]) with fmt None, or tiled (gate_up
    [R, Ip/2, gu_bytes], down [R, Hp/4, dn_bytes]) with fmt "bf16" / "int8" / "int4", its group, hidden=H and
    intermediate=I. Fixed launches, no host synchronisation: CUDA-graph capturable (after a first eager call has
    compiled the kernels for these shapes). blocks: work per program (default `default_blocks`). route: "auto"
    (Triton where `available`, else PyTorch), "triton", "torch" (the reference fallback, a loop over pairs).
    """
    act_fn(act)  # CadenzaError for an unknown activation
    if x.dim() != 2 or rows.dim() != 2 or topk_weights.shape != rows.shape or rows.shape[0] != x.shape[0]:
        raise ValueError(
            f"want x [T, H], rows and weights [T, k]: {tuple(x.shape)}, {tuple(rows.shape)}, "
            f"{tuple(topk_weights.shape)}"
        )
    if rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rows must be int32 or int64, got {rows.dtype}")
    if any(m.device != x.device for m in (rows, topk_weights, *mats)):
        raise ValueError(f"x, rows, topk_weights and the expert tensors must share a device (x is on {x.device})")
    (t, h), k = x.shape, rows.shape[1]
    if fmt is None:
        if len(mats) != 3:
            raise ValueError("plain experts are (gate [R, I, H], up [R, I, H], down [R, H, I])")
        gate, up, down = mats
        if gate.dim() != 3:
            raise ValueError(f"plain experts are stacked [R, I, H] tensors, gate has shape {tuple(gate.shape)}")
        r_, i, h_ = gate.shape
        if h_ != h or up.shape != gate.shape or down.shape != (r_, h, i):
            raise ValueError(
                f"plain expert shapes {tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)} do not fit x [T, {h}]"
            )
        geo = None
    else:
        if len(mats) != 2 or mats[0].dim() != 3 or mats[1].shape[:1] != mats[0].shape[:1]:
            raise ValueError("tiled experts are (gate_up [R, Ip/2, gu_bytes], down [R, Hp/4, dn_bytes])")
        if hidden != h:
            raise ValueError(f"hidden={hidden} but x has {h} columns")
        geo = _tiled(mats[0], mats[1], fmt, group, hidden, intermediate)
        i = intermediate
    if t * k == 0:
        return x.new_zeros(t, h)
    if not _use_triton(x.device, route):
        return _decode_torch(x, rows, topk_weights, mats, act, fmt, group, hidden, intermediate)

    p = t * k
    x, rows, wts = x.contiguous(), rows.contiguous(), topk_weights.contiguous()
    cfg = blocks or default_blocks(fmt, h, i, p, mats[0].element_size())
    y_pair = torch.empty(p, h, dtype=torch.float32, device=x.device)
    code = ACT_CODES[act]
    with torch.cuda.device(x.device) if x.device.type == "cuda" else nullcontext():
        if geo is None:
            gate, up, down = (m.contiguous() for m in mats)
            hbuf = torch.empty(p, i, dtype=torch.float32, device=x.device)
            br, bk1, bk2 = cfg.gu_rows // 2, _step_cols(h, cfg.gu_cols), _step_cols(i, cfg.dn_cols)
            _plain_gate_up_kernel[(p, triton.cdiv(i, br))](
                x, rows, hbuf, gate, up, h, i, k, ACT=code, BR=br, BK=bk1, num_warps=cfg.warps
            )
            _plain_down_kernel[(p, triton.cdiv(h, cfg.dn_rows))](
                hbuf, rows, wts, y_pair, down, h, i, BR=cfg.dn_rows, BK=bk2, num_warps=cfg.warps
            )
        else:
            _tiled_decode(x, rows, wts, mats, code, fmt, group, geo, cfg, y_pair)
    return y_pair.view(t, k, h).sum(1).to(x.dtype)


def _tiled_decode(x, rows, wts, mats, code, fmt, group, geo, cfg, y_pair) -> None:
    """The tiled launches. int4 reads x (and h) staged: _stage_int4_kernel for x, kernel 1 writes h so; both
    zero-padded to whole loop steps, so the int4 loop loads them unmasked."""
    (t, h), k, p = x.shape, rows.shape[1], y_pair.shape[0]
    gu, dn = mats
    f = _FMT_CODES[fmt]
    bk1, bk2 = _step_cols(geo.hp, cfg.gu_cols), _step_cols(geo.ip, cfg.dn_cols)
    bt1, bt2 = cfg.gu_rows // ROWS, cfg.dn_rows // ROWS
    rows4 = fmt == "int4" and cfg.int4_rows == 1
    xin, hlen = x, geo.ip
    if fmt == "int4":
        hlen = _round_up(geo.ip, bk2)
        xin = torch.empty(t, _round_up(geo.hp, bk1), dtype=torch.float32, device=x.device)
        _stage_int4_kernel[(t, triton.cdiv(xin.shape[1], 128))](x, xin, h, xin.shape[1], BLOCK=128)
    hbuf = torch.empty(p, hlen, dtype=torch.float32, device=x.device)
    _tiled_gate_up_kernel[(p, triton.cdiv(hlen // 2, bt1))](
        xin, xin.shape[1], rows, hbuf, hlen, gu, gu.stride(0), geo.gu_tb // 4, geo.gu_hb // 4, geo.ng_h, h, geo.hp,
        geo.ip, k, ACT=code, FMT=f, GROUP=group, BT=bt1, BK=bk1, ROWS4=rows4, num_warps=cfg.warps,
    )  # fmt: skip
    _tiled_down_kernel[(p, triton.cdiv(geo.hp // 4, bt2))](
        hbuf, hlen, rows, wts, y_pair, dn, dn.stride(0), geo.dn_tb // 4, geo.dn_hb // 4, geo.ng_i, h, geo.hp, geo.ip,
        FMT=f, GROUP=group, BT=bt2, BK=bk2, ROWS4=rows4, num_warps=cfg.warps,
    )  # fmt: skip


def _expert_fp32(mats, e, fmt, group, hidden, intermediate):
    """One expert row's fp32 gate, up [I, H] and down [H, I] (e: a 0-dim index tensor, no host sync)."""
    if fmt is None:
        return tuple(m.index_select(0, e.view(1))[0].float() for m in mats)
    return _dequant_torch(
        mats[0].index_select(0, e.view(1))[0], mats[1].index_select(0, e.view(1))[0], fmt, group, hidden, intermediate
    )


def _decode_torch(x, rows, topk_weights, mats, act, fmt, group, hidden, intermediate):
    """The reference: per pair, the expert in fp32 (dequantized as layout.dequantize_tiles), masked by row >= 0."""
    t, k = rows.shape
    fn = act_fn(act)
    flat = rows.reshape(-1).long()
    live = flat >= 0
    wts = torch.where(live, topk_weights.reshape(-1).float(), 0.0)
    y_pair = []
    for p in range(t * k):
        gate, up, down = _expert_fp32(mats, flat[p].clamp(min=0), fmt, group, hidden, intermediate)
        xp = x[p // k].float()
        yp = down @ (fn(gate @ xp) * (up @ xp))
        y_pair.append(torch.where(live[p], yp * wts[p], 0.0))
    return torch.stack(y_pair).view(t, k, -1).sum(1).to(x.dtype)


def _dequant_torch(gate_up, down, fmt, group, hidden, intermediate):
    hp, ip = _round_up(hidden, PAD), _round_up(intermediate, PAD)
    gu = dequantize_tiles(gate_up, fmt, group, hp).view(ip // 2, 2, 2, hp)
    gate = gu[:, 0].reshape(ip, hp)[:intermediate, :hidden]
    up = gu[:, 1].reshape(ip, hp)[:intermediate, :hidden]
    return gate, up, dequantize_tiles(down, fmt, group, ip)[:hidden, :intermediate]


def dequantize_into(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    fmt: str,
    group: int,
    hidden: int,
    intermediate: int,
    gate_out: torch.Tensor,
    up_out: torch.Tensor,
    down_out: torch.Tensor,
    *,
    route: str = "auto",
    block_tiles: int = 4,
    block_cols: int = 1024,
) -> None:
    """Unpacks ONE expert's tiles (gate_up [Ip/2, gu_bytes], down [Hp/4, dn_bytes]) into gate_out, up_out [I, H]
    and down_out [H, I] (any float dtype, rows contiguous): the values of layout.dequantize_tiles, cropped, rounded
    once to the output dtype. One Triton launch per matrix where `available`, else PyTorch."""
    geo = _tiled(gate_up, down, fmt, group, hidden, intermediate)
    h, i = hidden, intermediate
    for name, o, shape in (("gate_out", gate_out, (i, h)), ("up_out", up_out, (i, h)), ("down_out", down_out, (h, i))):
        if tuple(o.shape) != shape or o.stride(-1) != 1:
            raise ValueError(f"{name} must be {list(shape)} with contiguous rows, got {tuple(o.shape)} {o.stride()}")
    if gate_up.dim() != 2 or gate_out.stride(0) != up_out.stride(0) or gate_out.dtype != up_out.dtype:
        raise ValueError("dequantize_into takes one expert's tiles ([tiles, bytes]) and like gate / up outputs")
    if not _use_triton(gate_up.device, route):
        for o, v in zip((gate_out, up_out, down_out), _dequant_torch(gate_up, down, fmt, group, h, i), strict=True):
            o.copy_(v)
        return
    if block_cols < PAD or block_cols & (block_cols - 1) or block_tiles & (block_tiles - 1):
        raise ValueError(f"block_cols must be a power of two >= {PAD}, block_tiles a power of two")
    f = _FMT_CODES[fmt]
    block_cols = min(block_cols, _step_cols(max(geo.hp, geo.ip), block_cols))
    emu = lambda o: _INTERPRET and o.dtype == torch.bfloat16  # noqa: E731
    with torch.cuda.device(gate_up.device) if gate_up.device.type == "cuda" else nullcontext():
        grid = (triton.cdiv(geo.ip // 2, block_tiles), triton.cdiv(geo.hp, block_cols))
        _dequant_kernel[grid](
            gate_up, geo.gu_tb, geo.gu_hb, geo.ip // 2, geo.hp, geo.ng_h, gate_out, up_out, gate_out.stride(0), i, h,
            GU=True, FMT=f, GROUP=group, EMU_RNE=emu(gate_out), BT=block_tiles, BK=block_cols,
        )  # fmt: skip
        grid = (triton.cdiv(geo.hp // 4, block_tiles), triton.cdiv(geo.ip, block_cols))
        _dequant_kernel[grid](
            down, geo.dn_tb, geo.dn_hb, geo.hp // 4, geo.ip, geo.ng_i, down_out, down_out, down_out.stride(0), h, i,
            GU=False, FMT=f, GROUP=group, EMU_RNE=emu(down_out), BT=block_tiles, BK=block_cols,
        )  # fmt: skip


def dequantize_expert(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    fmt: str,
    group: int,
    hidden: int,
    intermediate: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    route: str = "auto",
    **blocks,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONE expert's tiles -> (gate [I, H], up [I, H], down [H, I]) in `dtype`, on the tiles' device
    (`blocks`: dequantize_into's block_tiles / block_cols)."""
    kw = {"dtype": dtype, "device": gate_up.device}
    out = (torch.empty(intermediate, hidden, **kw), torch.empty(intermediate, hidden, **kw))
    out += (torch.empty(hidden, intermediate, **kw),)
    dequantize_into(gate_up, down, fmt, group, hidden, intermediate, *out, route=route, **blocks)
    return out


def expert_forward(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    fmt: str,
    group: int,
    hidden: int,
    intermediate: int,
    act: str,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    *,
    route: str = "auto",
) -> torch.Tensor:
    """One tiled expert on many tokens (prefill): x [n, H] -> down(act(gate x) * up x) [n, H] in fp32.

    Dequantizes to x's dtype (into `workspace` = (gate [I, H], up [I, H], down [H, I]) when given, so a caller
    reuses one buffer), then three matmuls in x's dtype, as `cadenza.moe.experts.run_experts` computes."""
    if workspace is None:
        gate, up, dn = dequantize_expert(gate_up, down, fmt, group, hidden, intermediate, x.dtype, route=route)
    else:
        gate, up, dn = workspace
        dequantize_into(gate_up, down, fmt, group, hidden, intermediate, gate, up, dn, route=route)
    h = act_fn(act)(x @ gate.T) * (x @ up.T)
    return (h @ dn.T).float()
