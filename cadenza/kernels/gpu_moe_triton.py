# Over 400 lines: the decode kernels and the per-format dot products they inline, which share one tile layout.
"""The Triton kernels of cadenza.kernels.gpu_moe, which launches them (its docstring: the layouts, the launches).

The pair is the fastest grid axis, so pairs that share an expert read its rows at about the same time (from L2).
A pair with row -1 runs its loops zero times and writes zeros. Decode is bound by reading weights, and quantized
weights must be unpacked at that rate, so the kernels read int32 words and spend about two instructions on a
weight: bf16 halves become floats by a shift or a mask; an int8 byte, flipped by 0x80 into a float's mantissa
next to 2^23's exponent, is 2^23 + 128 + q; an int4 nibble masked in place is the denormal q 16^n 2^-149, which
one FMA with x staged times 2^(89 - 4n) turns into q x 2^-60. x is met in the order the words hold the columns;
scales apply per (row, group) to partial sums (int4: sum (q - z) x = sum q x - z sum x).

Triton reads TRITON_INTERPRET when `triton.jit` defines a kernel: `_INTERPRET` records it, for the launch code
(CPU tensors under the interpreter; its bf16 stores truncate, so the dequantize kernel rounds first).

Shape legend: E experts of a layer, R stacked expert rows (any experts, e.g. a GPU cache's slots), T tokens,
k slots per token, P = T k pairs, H hidden, I intermediate, Hp / Ip: H / I padded to multiples of 128.
"""

import os

from cadenza.kernels.triton_compat import tl, triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as when triton.jit defined the kernels below


# --- Triton: dot products of tile rows with a vector ---------------------------------------------------------------
# Each returns [BT, 4] fp32: the 4 rows of tiles t [BT] (at w, uint8; tile stride tbw int32 words, body after hbw
# words) dotted with x (xr, n_x valid values, zero past them) over K (padded) columns, in n_iter steps of BK from
# step it0 (a split of K: gpu_linear's decode).


@triton.jit
def _word_offsets(t, tbw, hbw, p, r, m, PIECE: tl.constexpr):
    """[BT, NP, 4, 16] int32-word offsets, from tile t's body, of word m of row r in piece p of a loop step (a
    piece: PIECE words, its 4 rows' 16 words side by side first)."""
    off = t[:, None, None, None] * tbw + hbw + p[None, :, None, None] * PIECE + r[None, None, :, None] * 16
    return off + m[None, None, None, :]


@triton.jit
def _dot_bf16(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, BT: tl.constexpr, BK: tl.constexpr):
    NP: tl.constexpr = BK // 32  # 64-byte pieces per row and step; word m holds columns 2m (low half), 2m + 1
    p = tl.arange(0, NP)
    r = tl.arange(0, 4)
    m = tl.arange(0, 16)
    wi = w.to(tl.pointer_type(tl.int32))
    off = _word_offsets(t, tbw, hbw, p, r, m, 64)
    acc = tl.zeros([BT, NP, 4, 16], tl.float32)
    for it in range(it0, it0 + n_iter):
        pg = it * NP + p
        ok = tmask[:, None, None, None] & (pg < K // 32)[None, :, None, None]
        wv = tl.load(wi + off + it * (NP * 64), mask=ok, other=0)
        col = pg[:, None] * 32 + 2 * m[None, :]
        x0 = tl.load(xr + col, mask=col < n_x, other=0.0).to(tl.float32)[None, :, None, :]
        x1 = tl.load(xr + col + 1, mask=col + 1 < n_x, other=0.0).to(tl.float32)[None, :, None, :]
        acc += (wv << 16).to(tl.float32, bitcast=True) * x0 + (wv & -65536).to(tl.float32, bitcast=True) * x1
    return tl.sum(tl.sum(acc, 3), 1)


@triton.jit
def _dot_int8(
    w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, NG, GROUP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr
):
    NH: tl.constexpr = BK // 32  # half pieces (32 columns of a row, 8 words) per step: a scale group is >= 32
    hp = tl.arange(0, NH)
    r = tl.arange(0, 4)
    m = tl.arange(0, 8)
    wi = w.to(tl.pointer_type(tl.int32))
    ws = w.to(tl.pointer_type(tl.float32))  # header: fp32 scales [4 rows][NG]
    off = t[:, None, None, None] * tbw + hbw + (hp // 2 * 64 + hp % 2 * 8)[None, :, None, None]
    off = off + r[None, None, :, None] * 16 + m[None, None, None, :]
    acc = tl.zeros([BT, NH, 4], tl.float32)
    for it in range(it0, it0 + n_iter):
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
def _dot_int4(w, tbw, hbw, t, tmask, xs, K, n_iter, it0, NG, GROUP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
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
    for it in range(it0, it0 + n_iter):
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
def _dot_int4_rows(
    w, tbw, hbw, t, tmask, xs, K, n_iter, it0, NG, GROUP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr
):
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
    for it in range(it0, it0 + n_iter):
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


# Block formats (cadenza.kernels.blocks): FMT 4 q4_0, 5 q4_k, 6 mxfp4 (4-bit codes in int4's word layout, group 32),
# 7 q6_k (6-bit codes: per 128 columns the 4 rows' nibbles in int4's word layout, then their high bit pairs;
# group 16), 8 q8_0 (int8 codes in int8's layout, group 32), 9 q5_k (5-bit codes 0..31: per 128 columns the 4 rows'
# nibbles in int4's word layout, then their 5th bits as 4 int32 words each; group 32, q4_k's fields).
# A weight is code_value * scale - min per (row, group), the pair computed here from the tile's header fields
# ([field][row][values]) as exact fp32 products, applied per (row, group) to partial sums: sum (v s - m) x =
# s sum v x - m sum x. x is read as it is (not staged).


@triton.jit
def _block_scale_min(tile, r, g, K, mask, FMT: tl.constexpr):
    """fp32 (scale, min) of row r, group g of the tiles at `tile` (uint8 pointers, broadcastable against r and g),
    from the header fields, as blocks.scales_and_mins computes them; K: the matrix's (padded) columns."""
    NS = K // 256  # K-quant super-blocks per row
    if FMT == 4:  # q4_0: d f16 per 32 -> (d, 8 d)
        d = tl.load(tile.to(tl.pointer_type(tl.float16)) + r * (K // 32) + g, mask=mask, other=0.0).to(tl.float32)
        s, mn = d, 8.0 * d
    elif FMT == 6:  # mxfp4: e u8 per 32 -> 2^(e - 127) (e = 0: the denormal 2^-127), 0
        e = tl.load(tile + r * (K // 32) + g, mask=mask, other=0).to(tl.int32)
        s = tl.where(e > 0, e << 23, 1 << 22).to(tl.float32, bitcast=True)
        mn = s * 0.0
    elif FMT == 8:  # q8_0: d f16 per 32 -> (d, 0)
        s = tl.load(tile.to(tl.pointer_type(tl.float16)) + r * (K // 32) + g, mask=mask, other=0.0).to(tl.float32)
        mn = s * 0.0
    elif FMT == 7:  # q6_k: d f16 per 256, sc i8 per 16 -> (d sc, 0)
        d = tl.load(tile.to(tl.pointer_type(tl.float16)) + r * NS + g // 16, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(tile.to(tl.pointer_type(tl.int8)) + 8 * NS + r * (K // 16) + g, mask=mask, other=0)
        s = d * sc.to(tl.float32)
        mn = s * 0.0
    else:  # q4_k (5), q5_k (9): d, dmin f16 per 256, then sc, m u8 per 32 -> (d sc, dmin m)
        NG = K // 32
        hf = tile.to(tl.pointer_type(tl.float16))
        d = tl.load(hf + r * NS + g // 8, mask=mask, other=0.0).to(tl.float32)
        dmin = tl.load(hf + 4 * NS + r * NS + g // 8, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(tile + 16 * NS + r * NG + g, mask=mask, other=0).to(tl.float32)
        m = tl.load(tile + 16 * NS + 4 * NG + r * NG + g, mask=mask, other=0).to(tl.float32)
        s, mn = d * sc, dmin * m
    return s, mn


@triton.jit
def _nib_value(q, FMT: tl.constexpr):
    """Nibbles q (int32, 0..15) -> their fp32 code values: q itself, or for mxfp4 (FMT 6) its e2m1 value, built
    from the bits: a = q & 7 >= 2 is 2^(a // 2 - 1) (1 + (a & 1) / 2), a < 2 is a / 2; bit 3 the sign."""
    if FMT == 6:
        a = q & 7
        v = tl.where(a >= 2, (a << 22) + (126 << 23), (a & 1) * 0x3F000000).to(tl.float32, bitcast=True)
        v = tl.where(q >= 8, -v, v)
    else:
        v = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # 2^23 + q - 2^23, exact
    return v


@triton.jit
def _dot_nib_blocks(
    w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, FMT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr
):
    """q4_0, q4_k, mxfp4: int32 word m of a row's 64-byte piece (128 columns) holds, in nibble n of its low / high
    half, columns 32 n + 2 m / 2 m + 1; plane n of a piece is one group (32 columns)."""
    NP: tl.constexpr = BK // 128
    p = tl.arange(0, NP)
    r = tl.arange(0, 4)
    m = tl.arange(0, 16)
    wi = w.to(tl.pointer_type(tl.int32))
    off = _word_offsets(t, tbw, hbw, p, r, m, 64)
    tile = w + (t * tbw * 4)[:, None, None]  # [BT, 1, 1] tile starts (bytes)
    r3 = r[None, None, :]
    acc = tl.zeros([BT, NP, 4], tl.float32)
    for it in range(it0, it0 + n_iter):
        pg = it * NP + p
        ok = tmask[:, None, None] & (pg < K // 128)[None, :, None]
        wv = tl.load(wi + off + it * (NP * 64), mask=ok[:, :, :, None], other=0)
        for n in tl.static_range(4):
            col = pg[:, None] * 128 + 32 * n + 2 * m[None, :]  # [NP, 16]
            x0 = tl.load(xr + col, mask=col < n_x, other=0.0).to(tl.float32)
            x1 = tl.load(xr + col + 1, mask=col + 1 < n_x, other=0.0).to(tl.float32)
            v0 = _nib_value((wv >> (4 * n)) & 15, FMT)
            v1 = _nib_value((wv >> (16 + 4 * n)) & 15, FMT)
            qx = tl.sum(v0 * x0[None, :, None, :] + v1 * x1[None, :, None, :], 3)  # [BT, NP, 4]
            s, mn = _block_scale_min(tile, r3, (pg * 4 + n)[None, :, None], K, ok, FMT)
            if FMT == 6:
                acc += s * qx
            else:
                sx = tl.sum(x0 + x1, 1)[None, :, None]
                acc += s * qx - mn * sx
    return tl.sum(acc, 1)


@triton.jit
def _q6_value(wd, hb, n, hs):
    """6-bit codes -> fp32 q - 32: the nibble of int32 words wd at bit 4 n (n may carry 16 for a word's high half)
    with the high pair of hb at bit hs; 2^23 + q - (2^23 + 32), exact."""
    q = ((wd >> (4 * n)) & 15) | (((hb >> hs) & 3) << 4)
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388640.0


@triton.jit
def _q6_k_offsets(t, tbw, hbw, p, r, m):
    """[BT, NP, 4, 16] offsets of q6_k's nibble words (int32) and high-pair words (int16) in a loop step's chunks."""
    lo_off = _word_offsets(t, tbw, hbw, p, r, m, 96)
    hi_off = (t * tbw * 2 + hbw * 2)[:, None, None, None] + p[None, :, None, None] * 192 + 128
    hi_off = hi_off + r[None, None, :, None] * 16 + m[None, None, None, :]
    return lo_off, hi_off


@triton.jit
def _dot_q6_k(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, BT: tl.constexpr, BK: tl.constexpr):
    """q6_k (FMT 7): a 128-column chunk is 384 bytes, the 4 rows' 64 bytes of nibbles (int32 word m: columns
    32 n + 2 m, 32 n + 2 m + 1 in nibble n of its low, high half) then their 32 bytes of high pairs (16-bit word m:
    the same columns' pairs at bits 2 n of its low, high byte). Plane n of a chunk is two groups of 16 columns:
    m < 8 and m >= 8."""
    NP: tl.constexpr = BK // 128
    p = tl.arange(0, NP)
    r = tl.arange(0, 4)
    m = tl.arange(0, 16)
    wi = w.to(tl.pointer_type(tl.int32))
    wh = w.to(tl.pointer_type(tl.int16))
    lo_off, hi_off = _q6_k_offsets(t, tbw, hbw, p, r, m)
    tile = w + (t * tbw * 4)[:, None, None]  # [BT, 1, 1] tile starts (bytes)
    r3 = r[None, None, :]
    first = (m < 8)[None, None, None, :]
    acc = tl.zeros([BT, NP, 4], tl.float32)
    for it in range(it0, it0 + n_iter):
        pg = it * NP + p
        ok = tmask[:, None, None] & (pg < K // 128)[None, :, None]
        wv = tl.load(wi + lo_off + it * (NP * 96), mask=ok[:, :, :, None], other=0)
        hv = tl.load(wh + hi_off + it * (NP * 192), mask=ok[:, :, :, None], other=0).to(tl.int32)
        for n in tl.static_range(4):
            col = pg[:, None] * 128 + 32 * n + 2 * m[None, :]  # [NP, 16]
            x0 = tl.load(xr + col, mask=col < n_x, other=0.0).to(tl.float32)
            x1 = tl.load(xr + col + 1, mask=col + 1 < n_x, other=0.0).to(tl.float32)
            v0 = _q6_value(wv, hv, n, 2 * n)
            v1 = _q6_value(wv, hv, n + 4, 8 + 2 * n)
            prod = v0 * x0[None, :, None, :] + v1 * x1[None, :, None, :]  # [BT, NP, 4, 16]
            q_a = tl.sum(tl.where(first, prod, 0.0), 3)  # group 8 pg + 2 n
            q_b = tl.sum(tl.where(first, 0.0, prod), 3)  # group 8 pg + 2 n + 1
            s_a, _ = _block_scale_min(tile, r3, (pg * 8 + 2 * n)[None, :, None], K, ok, 7)
            s_b, _ = _block_scale_min(tile, r3, (pg * 8 + 2 * n + 1)[None, :, None], K, ok, 7)
            acc += s_a * q_a + s_b * q_b
    return tl.sum(acc, 1)


@triton.jit
def _q5_value(wd, hw, n, hs):
    """5-bit codes -> fp32 q: the nibble of int32 words wd at bit 4 n (n may carry 16 for a word's high half) with
    the 5th bit of hw at bit hs; 2^23 + q - 2^23, exact."""
    q = ((wd >> (4 * n)) & 15) | (((hw >> hs) & 1) << 4)
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _dot_q5_k(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, BT: tl.constexpr, BK: tl.constexpr):
    """q5_k (FMT 9): a 128-column chunk is 320 bytes, the 4 rows' 64 bytes of nibbles (int32 word m: columns
    32 n + 2 m, 32 n + 2 m + 1 in nibble n of its low, high half) then their 16 bytes of 5th bits (int32 word n:
    column 32 n + j's at bit j). Plane n of a chunk is one group (32 columns), as in _dot_nib_blocks."""
    NP: tl.constexpr = BK // 128
    p = tl.arange(0, NP)
    r = tl.arange(0, 4)
    m = tl.arange(0, 16)
    wi = w.to(tl.pointer_type(tl.int32))
    lo_off = t[:, None, None, None] * tbw + hbw + p[None, :, None, None] * 80 + r[None, None, :, None] * 16
    lo_off = lo_off + m[None, None, None, :]
    hi_off = t[:, None, None] * tbw + hbw + p[None, :, None] * 80 + 64 + r[None, None, :] * 4  # [BT, NP, 4]
    tile = w + (t * tbw * 4)[:, None, None]  # [BT, 1, 1] tile starts (bytes)
    r3 = r[None, None, :]
    bit = 2 * m[None, None, None, :]
    acc = tl.zeros([BT, NP, 4], tl.float32)
    for it in range(it0, it0 + n_iter):
        pg = it * NP + p
        ok = tmask[:, None, None] & (pg < K // 128)[None, :, None]
        wv = tl.load(wi + lo_off + it * (NP * 80), mask=ok[:, :, :, None], other=0)
        for n in tl.static_range(4):
            hv = tl.load(wi + hi_off + it * (NP * 80) + n, mask=ok, other=0)[:, :, :, None]
            col = pg[:, None] * 128 + 32 * n + 2 * m[None, :]  # [NP, 16]
            x0 = tl.load(xr + col, mask=col < n_x, other=0.0).to(tl.float32)
            x1 = tl.load(xr + col + 1, mask=col + 1 < n_x, other=0.0).to(tl.float32)
            v0 = _q5_value(wv, hv, n, bit)
            v1 = _q5_value(wv, hv, n + 4, bit + 1)
            qx = tl.sum(v0 * x0[None, :, None, :] + v1 * x1[None, :, None, :], 3)  # [BT, NP, 4]
            s, mn = _block_scale_min(tile, r3, (pg * 4 + n)[None, :, None], K, ok, 9)
            sx = tl.sum(x0 + x1, 1)[None, :, None]
            acc += s * qx - mn * sx
    return tl.sum(acc, 1)


@triton.jit
def _dot_byte_blocks(
    w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, FMT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr
):
    """q8_0 (FMT 8): byte codes in int8's layout (byte b of word m of a row's 64-byte piece is column 4 m + b), in
    quarter pieces of 4 words (16 columns, half a group); scale d."""
    NQ: tl.constexpr = BK // 16  # quarter pieces (16 columns of a row, 4 words, one group) per step
    qp = tl.arange(0, NQ)
    r = tl.arange(0, 4)
    m = tl.arange(0, 4)
    wi = w.to(tl.pointer_type(tl.int32))
    off = t[:, None, None, None] * tbw + hbw + (qp // 4 * 64 + qp % 4 * 4)[None, :, None, None]
    off = off + r[None, None, :, None] * 16 + m[None, None, None, :]
    tile = w + (t * tbw * 4)[:, None, None]
    acc = tl.zeros([BT, NQ, 4], tl.float32)
    for it in range(it0, it0 + n_iter):
        qg = it * NQ + qp
        ok = tmask[:, None, None] & (qg < K // 16)[None, :, None]
        wv = tl.load(wi + off + it * (NQ * 16), mask=ok[:, :, :, None], other=0)
        col = qg[:, None] * 16 + 4 * m[None, :]
        part = tl.zeros([BT, NQ, 4, 4], tl.float32)
        for b in tl.static_range(4):  # (u ^ 0x80) | 2^23's bits = 2^23 + 128 + q
            xb = tl.load(xr + col + b, mask=col + b < n_x, other=0.0).to(tl.float32)
            q = (((wv >> (8 * b)) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            part += q * xb[None, :, None, :]
        g = qg // 2
        s, _ = _block_scale_min(tile, r[None, None, :], g[None, :, None], K, ok, FMT)
        acc += tl.sum(part, 3) * s
    return tl.sum(acc, 1)


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
def _dot_tiles(
    w,
    tbw,
    hbw,
    t,
    tmask,
    xr,
    n_x,
    K,
    n_iter,
    it0,
    NG,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    ROWS4: tl.constexpr,
):
    if FMT == 1:
        acc = _dot_bf16(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, BT, BK)
    elif FMT == 2:
        acc = _dot_int8(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, NG, GROUP, BT, BK)
    elif FMT == 7:
        acc = _dot_q6_k(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, BT, BK)
    elif FMT == 8:
        acc = _dot_byte_blocks(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, 8, BT, BK)
    elif FMT == 9:
        acc = _dot_q5_k(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, BT, BK)
    elif FMT >= 4:
        acc = _dot_nib_blocks(w, tbw, hbw, t, tmask, xr, n_x, K, n_iter, it0, FMT, BT, BK)
    elif ROWS4:
        acc = _dot_int4_rows(w, tbw, hbw, t, tmask, xr, K, n_iter, it0, NG, GROUP, BT, BK)
    else:
        acc = _dot_int4(w, tbw, hbw, t, tmask, xr, K, n_iter, it0, NG, GROUP, BT, BK)
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
def _glu(g, u, alpha, limit, ACT: tl.constexpr):
    """The gated unit h = act(g) u; ACT 4 is gpt-oss's clamped SwiGLU (cpu_moe.CLAMPED_SWIGLU_CODE, models.common
    .glu_fn): g' = min(g, limit), h = (clamp(u, -limit, limit) + 1) g' sigmoid(alpha g')."""
    if ACT == 4:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        out = (uc + 1.0) * (gc * tl.sigmoid(alpha * gc))
    else:
        out = _act(g, ACT) * u
    return out


@triton.jit
def _bias(b, e, n, idx, HAS: tl.constexpr):
    """Row e's fp32 bias values at idx (zero at idx >= n), or 0 without a bias (HAS False). A skipped pair reads
    row 0 (e clamped), which its zero weight drops."""
    if HAS:  # noqa: SIM108 (a constexpr branch: the load is not compiled without a bias)
        v = tl.load(b + e * n + idx, mask=idx < n, other=0.0).to(tl.float32)
    else:
        v = 0.0
    return v


@triton.jit
def _pair_row(rows, pair):
    """(row as int64, clamped to 0; whether the pair is computed here)."""
    e = tl.load(rows + pair).to(tl.int64)
    return tl.maximum(e, 0), e >= 0


# --- Triton: the decode kernels ------------------------------------------------------------------------------------


@triton.jit
def _tiled_gate_up_kernel(
    x,
    xstride,
    rows,
    h,
    hstride,
    gu,
    gu_stride,
    tbw,
    hbw,
    NG,
    H,
    Hp,
    Ip,
    k,
    gb,
    ub,
    INTER,
    alpha,
    limit,
    ACT: tl.constexpr,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    ROWS4: tl.constexpr,
    STAGE_H: tl.constexpr,
    HAS_GB: tl.constexpr,
    HAS_UB: tl.constexpr,
):
    """h[pair] = glu(gate x + gate_bias, up x + up_bias) of the pair's row (biases [R, INTER], each optional)."""
    pair = tl.program_id(0)
    e, live = _pair_row(rows, pair)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    tmask = t < Ip // 2
    n_iter = tl.where(live, tl.cdiv(Hp, BK), 0)
    xr = x + (pair // k).to(tl.int64) * xstride
    acc = _dot_tiles(gu + e * gu_stride, tbw, hbw, t, tmask, xr, H, Hp, n_iter, 0, NG, FMT, GROUP, BT, BK, ROWS4)
    r = tl.arange(0, 4)[None, :]  # tile rows: gate 2j, gate 2j + 1, up 2j, up 2j + 1
    g0, g1 = tl.sum(tl.where(r == 0, acc, 0.0), 1), tl.sum(tl.where(r == 1, acc, 0.0), 1)
    u0, u1 = tl.sum(tl.where(r == 2, acc, 0.0), 1), tl.sum(tl.where(r == 3, acc, 0.0), 1)
    if HAS_GB:
        g0 += _bias(gb, e, INTER, 2 * t, True)
        g1 += _bias(gb, e, INTER, 2 * t + 1, True)
    if HAS_UB:
        u0 += _bias(ub, e, INTER, 2 * t, True)
        u1 += _bias(ub, e, INTER, 2 * t + 1, True)
    h0, h1 = _glu(g0, u0, alpha, limit, ACT), _glu(g1, u1, alpha, limit, ACT)  # columns 2t, 2t + 1 of h
    hr = h + pair.to(tl.int64) * hstride
    if STAGE_H:  # staged for the int4 down kernel (_stage_int4_kernel), zero-padded to hstride
        n = t % 64 // 16
        at = t // 64 * 128 + n * 32 + t % 16
        pad = t < hstride // 2
        tl.store(hr + at, tl.where(tmask, h0 * _plane_scale(n), 0.0), mask=pad)
        tl.store(hr + at + 16, tl.where(tmask, h1 * _plane_scale(n), 0.0), mask=pad)
    else:
        tl.store(hr + 2 * t, h0, mask=tmask)
        tl.store(hr + 2 * t + 1, h1, mask=tmask)


@triton.jit
def _tiled_down_kernel(
    h,
    hstride,
    rows,
    wts,
    y,
    dn,
    dn_stride,
    tbw,
    hbw,
    NG,
    H,
    Hp,
    Ip,
    db,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    ROWS4: tl.constexpr,
    HAS_DB: tl.constexpr,
):
    """y[pair] = (down h[pair] + down_bias) w[pair] (down_bias [R, H], optional)."""
    pair = tl.program_id(0)
    e, live = _pair_row(rows, pair)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    tmask = t < Hp // 4
    n_iter = tl.where(live, tl.cdiv(Ip, BK), 0)
    hr = h + pair.to(tl.int64) * hstride
    acc = _dot_tiles(dn + e * dn_stride, tbw, hbw, t, tmask, hr, Ip, Ip, n_iter, 0, NG, FMT, GROUP, BT, BK, ROWS4)
    wt = tl.where(live, tl.load(wts + pair).to(tl.float32), 0.0)
    o = 4 * t[:, None] + tl.arange(0, 4)[None, :]
    if HAS_DB:
        acc += _bias(db, e, H, o, True)
    tl.store(y + pair.to(tl.int64) * H + o, acc * wt, mask=o < H)


@triton.jit
def _plain_gate_up_kernel(
    x,
    rows,
    h,
    gate,
    up,
    H,
    INTER,
    k,
    gb,
    ub,
    alpha,
    limit,
    ACT: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    HAS_GB: tl.constexpr,
    HAS_UB: tl.constexpr,
):
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
    g = tl.sum(acc_g, 1) + _bias(gb, e, INTER, i, HAS_GB)
    u = tl.sum(acc_u, 1) + _bias(ub, e, INTER, i, HAS_UB)
    hv = _glu(g, u, alpha, limit, ACT)
    tl.store(h + pair.to(tl.int64) * INTER + i, hv, mask=i < INTER)


@triton.jit
def _plain_down_kernel(h, rows, wts, y, down, H, INTER, db, BR: tl.constexpr, BK: tl.constexpr, HAS_DB: tl.constexpr):
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
    out = tl.sum(acc, 1) + _bias(db, e, H, o, HAS_DB)
    tl.store(y + pair.to(tl.int64) * H + o, out * wt, mask=o < H)


# --- Triton: dequantize one expert ---------------------------------------------------------------------------------


@triton.jit
def _dequant_kernel(
    src,
    tb,
    hb,
    n_tiles,
    K,
    NG,
    out0,
    out1,
    ld,
    n_rows,
    n_cols,
    src_rs,
    out_rs,
    GU: tl.constexpr,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    EMU_RNE: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    """Tiles t of a matrix with K padded columns -> rows of out0 (down: row 4t + r; gate_up: gate row 2t + r)
    and out1 (gate_up: up row 2t + r - 2), cropped to n_rows x n_cols; the values of dequantize_tiles, rounded
    once. Columns are [blocks of GS][GS], GS one scale's span, so scales load once per row and block. Grid axis 2:
    the expert, src_rs bytes apart in the stack and out_rs elements apart in the outputs."""
    e = tl.program_id(2).to(tl.int64)
    src += e * src_rs
    out0 += e * out_rs
    out1 += e * out_rs
    GS: tl.constexpr = GROUP if GROUP else BK
    t = (tl.program_id(0) * BT + tl.arange(0, BT))[:, None, None, None]
    r = tl.arange(0, 4)[None, :, None, None]
    gb = tl.arange(0, BK // GS)[None, None, :, None]
    c = tl.program_id(1) * BK + gb * GS + tl.arange(0, GS)[None, None, None, :]
    ok = (t < n_tiles) & (c < K)
    tile = src + t.to(tl.int64) * tb
    g = (tl.program_id(1) * BK + gb * GS) // GS if GROUP else gb * 0  # [1, 1, blocks, 1]
    okg = (t < n_tiles) & (g < NG)
    v = _tile_values(tile, hb, r, c, g, ok, okg, K, NG, FMT)
    if EMU_RNE:  # bf16 output under the interpreter, which truncates: round to nearest even here (GPUs do)
        v = _round_bf16(v)
    v = v.to(out0.dtype.element_ty)
    if GU:
        row = 2 * t + r % 2
        ok = ok & (row < n_rows) & (c < n_cols)
        tl.store(out0 + row * ld + c, v, mask=ok & (r < 2))
        tl.store(out1 + row * ld + c, v, mask=ok & (r >= 2))
    else:
        row = 4 * t + r
        tl.store(out0 + row * ld + c, v, mask=ok & (row < n_rows) & (c < n_cols))


@triton.jit
def _round_bf16(v):
    """fp32 values rounded to bf16's precision, to nearest even (still fp32)."""
    b = v.to(tl.int32, bitcast=True)
    return ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _tile_values(tile, hb, r, c, g, ok, okg, K, NG, FMT: tl.constexpr):
    """The fp32 values of rows r, columns c (scale group g) of the tiles at `tile` (header hb bytes), as
    layout.dequantize_tiles gives them; ok / okg mask the values / the scales (shapes broadcast together)."""
    if FMT == 1:  # bf16: 32 columns per 64-byte piece
        v = tl.load((tile + (c // 32) * 256 + r * 64).to(tl.pointer_type(tl.bfloat16)) + c % 32, mask=ok)
        v = v.to(tl.float32)
    elif FMT == 2:  # int8: 64 columns per piece, fp32 scale per row and group; (u ^ 0x80) | 2^23 = 2^23 + 128 + q
        q = tl.load((tile + hb + (c // 64) * 256 + r * 64 + c % 64).to(tl.pointer_type(tl.int8)), mask=ok)
        q = ((q.to(tl.int32) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        v = q * tl.load(tile.to(tl.pointer_type(tl.float32)) + r * NG + g, mask=okg)
    elif FMT == 3:  # int4: 128 columns per piece; 16-bit word c % 32 holds column c in nibble (c % 128) / 32
        wd = tl.load((tile + hb + (c // 128) * 256 + r * 64).to(tl.pointer_type(tl.int16)) + c % 32, mask=ok)
        q = (((wd.to(tl.int32) >> (4 * (c % 128 // 32))) & 15) | 0x4B000000).to(tl.float32, bitcast=True)
        sc = tl.load(tile.to(tl.pointer_type(tl.bfloat16)) + r * NG + g, mask=okg).to(tl.float32)
        z = tl.load(tile + 8 * NG + r * NG + g, mask=okg).to(tl.int32)
        v = (q - (z | 0x4B000000).to(tl.float32, bitcast=True)) * sc  # 2^23 + q - (2^23 + z), exact
    elif FMT == 7:  # q6_k: per 128 columns 384 bytes, row r's nibble words at 64 r, its high pairs at 256 + 32 r
        at = tile + hb + (c // 128) * 384 + r * 64
        wd = tl.load(at.to(tl.pointer_type(tl.int16)) + c % 32, mask=ok).to(tl.int32)
        hi = tl.load(at + 256 - r * 32 + c % 32, mask=ok).to(tl.int32)
        v = _q6_value(wd, hi, c % 128 // 32, 2 * (c % 128 // 32))
        s, _ = _block_scale_min(tile, r, g, K, okg, FMT)
        v = v * s
    elif FMT == 9:  # q5_k: per 128 columns 320 bytes, row r's nibble words at 64 r, its 5th-bit words at 256 + 16 r
        at = tile + hb + (c // 128) * 320
        wd = tl.load((at + r * 64).to(tl.pointer_type(tl.int16)) + c % 32, mask=ok).to(tl.int32)
        hw = tl.load((at + 256 + r * 16).to(tl.pointer_type(tl.int32)) + c % 128 // 32, mask=ok)
        v = _q5_value(wd, hw, c % 128 // 32, c % 32)
        s, mn = _block_scale_min(tile, r, g, K, okg, FMT)
        v = v * s - mn
    elif FMT == 8:  # q8_0: int8's layout, scale d per 32 columns
        q = tl.load((tile + hb + (c // 64) * 256 + r * 64 + c % 64).to(tl.pointer_type(tl.int8)), mask=ok)
        q = ((q.to(tl.int32) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        s, _ = _block_scale_min(tile, r, g, K, okg, FMT)
        v = q * s
    else:  # q4_0, q4_k, mxfp4: int4's layout, code value * scale - min per 32 columns
        wd = tl.load((tile + hb + (c // 128) * 256 + r * 64).to(tl.pointer_type(tl.int16)) + c % 32, mask=ok)
        q = _nib_value((wd.to(tl.int32) >> (4 * (c % 128 // 32))) & 15, FMT)
        s, mn = _block_scale_min(tile, r, g, K, okg, FMT)
        v = q * s - mn
    return v
