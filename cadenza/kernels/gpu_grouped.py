# Over 400 lines: the grouped kernel and the dequantize-first way share the call, its checks and its sums.
"""A layer's routed experts for many tokens at once on the GPU: one grouped tensor-core product per matrix that
reads the tiled layouts (cadenza.kernels.layout) as they are. Our own kernel because no library multiplies these
tiles, and the alternative (each expert dequantized to bf16, then cuBLAS: `gpu_moe.expert_forward`) costs a
dequantization per expert, which a step of a few tokens an expert pays on every layer (many tokens an expert: the
second way below).

`moe_grouped` takes what `gpu_moe.moe_decode` takes (x [T, H], rows [T, k] of a stack, -1 skipping a pair, the
routing weights, the stacked tiles) and computes the same y, with nothing read back to the host (a CUDA graph can
capture it):

  1. the T k pairs sorted by row (torch: argsort, counts by scatter_add, cumsum); blocks of BM pairs of one row,
     each row's pairs padded to whole blocks, the block table [MAXB] (row, first sorted pair, pairs) from a
     searchsorted over the rows' block counts; MAXB = ceil(P / BM) + min(R, P) bounds it from the shapes alone;
  2. gate/up, grid (block, BT tiles): x rows of the block's pairs [BM, BK] times the tiles' values [4 BT, BK]
     (`_tile_values`: the dequantize kernel's, in x's dtype; int4's layout, shared by q4_0 / q4_k / mxfp4, loads
     each 16-bit word once for its four nibble planes, one tl.dot of 32 columns each) by tl.dot, fp32 accumulators
     over H; the raw gate and up rows of each pair, [P, 2 Ip] fp32 in tile-row order (gate 2j, gate 2j + 1, up 2j,
     up 2j + 1);
  3. torch: biases, the activation (`models.common.glu_fn`, in x's dtype: as `expert_forward` rounds), h [P, Ip];
  4. down, the same kernel over h's rows [P, Hp] fp32; then the routing weight, the pairs back in token order and
     y = sum over the k slots in fp32 (deterministic, no atomics), cast to x's dtype.

A step whose pairs per expert the host knows (`row_counts`: the offloaded layer read its routing back) and that
has many of them (DEQUANT_PAIRS on average an expert) goes another way: its experts dequantized to x's dtype a
chunk at a time (`gpu_moe.dequantize_rows`, one launch a matrix for the chunk), then tensor-core products of each
expert's pairs (cuBLAS; torch._grouped_mm for a chunk of several experts). The grouped kernel dequantizes a weight
once per block of 16-32 pairs and so ran T1's ~2150-token passes at ~52 TFLOPS; dequantizing once and multiplying
in cuBLAS takes a ~2150-token pass of a Mixtral int4 layer from 26.8 to 5.4 ms (283 TFLOPS; benchmarks/box/big_step.py,
results/2026-12-04-s24).

On by default where the Triton kernels run (`enabled`; CADENZA_GROUPED_EXPERTS=0 turns it off): measured on the
H200 (benchmarks/box/host_step.py, a full-width Mixtral layer, int4 experts all resident, 512 rows, graphs) at 11.0 ms
a layer against 36.4 for the experts one at a time.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from cadenza.kernels.gpu_moe import _FMT_CODES, _tiled, available, dequantize_rows
from cadenza.kernels.gpu_moe_triton import _INTERPRET, _block_scale_min, _nib_value, _round_bf16, _tile_values
from cadenza.kernels.triton_compat import tl, triton
from cadenza.models.common import glu_fn

ENV = "CADENZA_GROUPED_EXPERTS"
# Blocks: tiles (4 weight rows each) and columns a step, warps; pairs 16 or 32 (`block_m`). Compiled for sm_90 here
# without a GPU (cuobjdump's register use and SASS size, 11 formats x 16 / 32 pairs): 16 x 128 x 8 warps takes ~1.3
# warp-instructions a weight (int4's layout: ~1.1, a word load serving four columns) and spills only at q5_k (40
# bytes); 8 x 64 x 8 spills nothing with ~2.3x the instructions. Timed on the H200 (host_step.py, 128 / 512 rows):
# 8 x 128 x 4 was faster at 512 rows with the cache on the GPU (8.9 against 11.0 ms a layer) and slower with it on
# the host (19.6 against 11.5); the runs' spread is large, so the defaults stay. CADENZA_GROUPED_BLOCKS=T,C,W
# overrides them.
BLOCKS_ENV = "CADENZA_GROUPED_BLOCKS"
BLOCK_TILES, BLOCK_K, WARPS = 16, 128, 8
MID_ROWS = 1024  # pairs a slice of the gated unit between the two products (bounds its gate / up copies)
# Known counts: from this many pairs an active expert on average, dequantize then multiply (CADENZA_DEQUANT_PAIRS,
# 0: never). Measured on the H200 (benchmarks/box/big_step.py, one int4 layer, bf16): against the grouped kernel
# Mixtral 1.48x at 128 pairs an expert and 5.0x at 537; Qwen3-30B-A3B's small experts 0.52x at 11, 1.09x at 64 and
# 1.51x at 125.
DEQUANT_ENV = "CADENZA_DEQUANT_PAIRS"
DEQUANT_PAIRS = 64
DEQUANT_BYTES = 256 << 20  # the dequantized experts of one chunk (at least one expert): the planner reserves it


def blocks() -> tuple[int, int, int]:
    """(tiles, columns, warps): CADENZA_GROUPED_BLOCKS where set (checked), else the defaults above."""
    text = os.environ.get(BLOCKS_ENV)
    if not text:
        return BLOCK_TILES, BLOCK_K, WARPS
    try:
        bt, bk, nw = (int(v) for v in text.split(","))
    except ValueError:
        bt = bk = nw = 0
    pow2 = lambda n, lo: n >= lo and n & (n - 1) == 0  # noqa: E731
    if not (pow2(bt, 4) and pow2(bk, 32) and pow2(nw, 1)):
        raise ValueError(
            f"{BLOCKS_ENV}={text!r}: give TILES,COLUMNS,WARPS, powers of two with tiles >= 4 and columns >= 32 "
            f"(e.g. {BLOCK_TILES},{BLOCK_K},{WARPS}), or unset it."
        )
    return bt, bk, nw


# The matrix formats whose grouped products a GPU has checked (tests/kernels/test_gpu_grouped.py -m gpu, bf16 x
# against the per-expert path, at Mixtral's shapes and a tiny model's; H200, 2026-12-03): every gate/up format but
# q6_k (q4_0 and mxfp4 differ from int4 / q4_k only in the nibble's value), and every down format. q6_k gate/up
# (a Q6_K file's) keeps the experts one at a time until `pytest -m gpu` passes it. (int8's 13% end to end on a
# 3-layer random Mixtral was that model's chaos, not the kernel: each grouped call there equals the per-expert
# products to 0.24%, and other seeds or fewer layers put both paths equally near the fp32 logits.)
CHECKED_GATE_UP = frozenset({"int4", "q4_0", "q4_k", "mxfp4", "int8", "bf16", "q8_0", "q5_k"})
CHECKED_DOWN = CHECKED_GATE_UP | {"q6_k"}


def dequant_pairs() -> int:
    """CADENZA_DEQUANT_PAIRS where set (checked), else DEQUANT_PAIRS."""
    text = os.environ.get(DEQUANT_ENV)
    if not text:
        return DEQUANT_PAIRS
    if not text.isdigit():
        raise ValueError(
            f"{DEQUANT_ENV}={text!r}: give a whole number of pairs an expert (e.g. {DEQUANT_PAIRS}; 0: never "
            "dequantize first), or unset it."
        )
    return int(text)


def dequant_workspace(hidden: int, intermediate: int, elem: int, experts: int) -> int:
    """Bytes of the dequantized experts one call holds at most: a chunk (`_chunk_rows`) of a layer's `experts`."""
    one = 3 * hidden * intermediate * elem
    return min(max(1, DEQUANT_BYTES // one), experts) * one


def _chunk_rows(row_counts: list[int], one: int) -> int:
    """Stack rows a chunk spans at most: DEQUANT_BYTES of experts of `one` bytes (at least one), and no more than
    the rows with pairs (a wave's are one layer's experts), so `dequant_workspace` bounds the chunk."""
    return min(max(1, DEQUANT_BYTES // one), sum(1 for c in row_counts if c))


def dequantizes(row_counts, x: torch.Tensor) -> bool:
    """Whether a call with these host-known pairs per stack row dequantizes its experts first (module doc): many
    pairs an active expert, and no CUDA graph being captured (its products are sized on the host)."""
    if row_counts is None:
        return False
    least = dequant_pairs()
    active = [c for c in row_counts if c]
    if least <= 0 or not active or sum(active) < least * len(active):
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def checked(fmt: str) -> bool:
    """Whether a layout ("int4", "q4_k+q6_k", ...) is one whose grouped products were checked on a GPU."""
    gu, _, dn = fmt.partition("+")
    return gu in CHECKED_GATE_UP and (dn or gu) in CHECKED_DOWN


def enabled(device: torch.device, fmt: str | None = None) -> bool:
    """Whether steps of more than a few tokens use `moe_grouped` on `device` (the Triton kernels run there,
    CADENZA_GROUPED_EXPERTS is not 0, and `fmt`, where given, is `checked`; CADENZA_GROUPED_EXPERTS=all takes
    every format, to check the rest)."""
    flag = os.environ.get(ENV, "1")
    if flag == "0" or not available(device):
        return False
    return fmt is None or flag == "all" or checked(fmt)


@triton.jit
def _grouped_kernel(
    x,
    ldx,
    src,
    blk_row,
    blk_first,
    blk_n,
    w,
    w_stride,
    tb,
    hb,
    n_tiles,
    K,
    n_x,
    NG,
    out,
    ldo,
    n_s,
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    EMU_RNE: tl.constexpr,
    F32: tl.constexpr,
    BM: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    """out[s, 4 t + r] = row r of tile t of stack row blk_row[b] . x[src[s]] for the block's sorted pairs s (those
    below n_s, out's rows)."""
    b = tl.program_id(0)
    n = tl.load(blk_n + b)
    if n > 0:
        row = tl.load(blk_row + b).to(tl.int64)
        m = tl.arange(0, BM)
        s = tl.load(blk_first + b) + m
        okm = (m < n) & (s < n_s)
        xr = tl.load(src + s, mask=okm, other=0).to(tl.int64)
        GS: tl.constexpr = min(GROUP, BK) if GROUP else BK  # columns sharing a scale within a step
        t = (tl.program_id(1) * BT + tl.arange(0, BT))[:, None, None, None]
        r = tl.arange(0, 4)[None, :, None, None]
        gb = tl.arange(0, BK // GS)[None, None, :, None]
        tile = w + row * w_stride + t.to(tl.int64) * tb
        acc = tl.zeros([BM, 4 * BT], tl.float32)
        if FMT >= 3 and FMT <= 6:  # int4's layout (int4, q4_0, q4_k, mxfp4): one word load serves four columns
            t3 = (tl.program_id(1) * BT + tl.arange(0, BT))[:, None, None]
            r3 = tl.arange(0, 4)[None, :, None]
            tile3 = w + row * w_stride + t3.to(tl.int64) * tb
            okt = t3 < n_tiles
            j = tl.arange(0, 32)[None, None, :]
            for k0 in range(0, K, 128):  # a piece: word j of a row's 64 bytes holds column 32 n + j in nibble n
                at = (tile3 + hb + (k0 // 128) * 256 + r3 * 64).to(tl.pointer_type(tl.int16))
                wd = tl.load(at + j, mask=okt, other=0).to(tl.int32)  # [BT, 4, 32]
                for pn in tl.static_range(4):
                    q = (wd >> (4 * pn)) & 15
                    c0 = k0 + 32 * pn
                    if FMT == 3:  # (q - z) s, the group's bf16 scale and u8 zero point
                        sc = tl.load(tile3.to(tl.pointer_type(tl.bfloat16)) + r3 * NG + c0 // GROUP, mask=okt)
                        z = tl.load(tile3 + 8 * NG + r3 * NG + c0 // GROUP, mask=okt, other=0).to(tl.int32)
                        v = (q - z).to(tl.float32) * sc.to(tl.float32)
                    else:
                        sb, mn = _block_scale_min(tile3, r3, c0 // 32, K, okt, FMT)
                        v = _nib_value(q, FMT) * sb - mn
                    v = tl.where(okt, v, 0.0)
                    acc = _dot_step(acc, x, ldx, xr, okm, n_x, c0 + tl.arange(0, 32), v, 4 * BT, 32, EMU_RNE, F32)
        else:
            for k0 in range(0, K, BK):
                c = k0 + gb * GS + tl.arange(0, GS)[None, None, None, :]
                ok = (t < n_tiles) & (c < K)
                g = (k0 + gb * GS) // GROUP if GROUP else gb * 0
                okg = (t < n_tiles) & (g < NG)
                v = tl.where(ok, _tile_values(tile, hb, r, c, g, ok, okg, K, NG, FMT), 0.0)
                acc = _dot_step(acc, x, ldx, xr, okm, n_x, k0 + tl.arange(0, BK), v, 4 * BT, BK, EMU_RNE, F32)
        o = tl.program_id(1) * 4 * BT + tl.arange(0, 4 * BT)
        mask = okm[:, None] & (o[None, :] < 4 * n_tiles)
        tl.store(out + s[:, None].to(tl.int64) * ldo + o[None, :], acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _dot_step(acc, x, ldx, xr, okm, n_x, cc, v, ROWS: tl.constexpr, COLS: tl.constexpr, EMU_RNE: tl.constexpr,
              F32: tl.constexpr):  # fmt: skip
    """acc [BM, ROWS] + x's rows xr at columns cc [COLS] times the weight values v (ROWS x COLS in any shape)."""
    if EMU_RNE:  # the interpreter's bf16 casts truncate; a GPU's round to nearest even
        v = _round_bf16(v)
    wv = tl.reshape(v, [ROWS, COLS])
    xv = tl.load(x + xr[:, None] * ldx + cc[None, :], mask=okm[:, None] & (cc[None, :] < n_x), other=0.0)
    if F32:  # fp32 x; or bf16 x under the interpreter, whose bf16 products are not a GPU's (values rounded)
        return acc + tl.dot(xv.to(tl.float32), tl.trans(wv), input_precision="ieee")
    return acc + tl.dot(xv, tl.trans(wv.to(x.dtype.element_ty)))


def block_table(rows: torch.Tensor, stack_rows: int, bm: int):
    """(order, key, blk_row, blk_first, blk_n) for the pairs' rows [T, k]: `order` the pairs sorted by row (the
    skipped ones, key `stack_rows`, last), and per block of at most `bm` pairs of one row its row, first sorted
    position and pair count (0: an unused block). Torch ops only, nothing read back."""
    r = stack_rows
    key = rows.reshape(-1).long()
    key = torch.where(key >= 0, key, r)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(r + 1, dtype=torch.long, device=key.device).scatter_add_(0, key, torch.ones_like(key))
    counts.narrow(0, r, 1).zero_()  # skipped pairs: no blocks (a fill, no host scalar: graph-capturable)
    first_pos = torch.cumsum(counts, 0) - counts
    nblk = (counts + bm - 1) // bm
    cum = torch.cumsum(nblk, 0)
    p = key.numel()
    maxb = -(-p // bm) + min(r, p)
    b = torch.arange(maxb, device=key.device)
    brow = torch.searchsorted(cum, b, right=True).clamp_(max=r)
    j = b - (cum - nblk)[brow]
    n = (counts[brow] - j * bm).clamp_(0, bm)
    first = first_pos[brow] + j * bm
    i32 = torch.int32
    return order, key, brow.to(i32), first.to(i32), n.to(i32)


def _launch(x, src, table, mat, tb, hb, n_tiles, k_cols, n_x, ng, fmt, group, out, bm, bt, bk, nw):
    _, _, brow, first, n = table
    emu = _INTERPRET and x.dtype == torch.bfloat16
    grid = (brow.numel(), triton.cdiv(n_tiles, bt))
    _grouped_kernel[grid](
        x, x.stride(0), src, brow, first, n, mat, mat.stride(0), tb, hb, n_tiles, k_cols, n_x, ng, out, out.stride(0),
        out.shape[0], FMT=_FMT_CODES[fmt], GROUP=group, EMU_RNE=emu, F32=x.dtype == torch.float32 or emu, BM=bm,
        BT=bt, BK=bk, num_warps=nw,
    )  # fmt: skip


def block_m(pairs: int, stack_rows: int) -> int:
    """Pairs per block: about a row's share of the pairs, 16 or 32 (tl.dot's smallest side is 16; 64 spills)."""
    share = pairs / max(1, min(stack_rows, pairs))
    return 16 if share <= 16 else 32


def moe_grouped(
    x: torch.Tensor,
    rows: torch.Tensor,
    topk_weights: torch.Tensor,
    mats: tuple[torch.Tensor, torch.Tensor],
    act: str,
    *,
    fmt: str,
    group: int,
    hidden: int,
    intermediate: int,
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None,
    block_tiles: int | None = None,
    pairs: int | None = None,
    row_counts: Sequence[int] | None = None,
) -> torch.Tensor:
    """y [T, H] (x's dtype) = sum over slots j of topk_weights[t, j] * expert_{rows[t, j]}(x[t]) (module doc);
    mats: tiled (gate_up [R, Ip/2, gu_bytes], down [R, Hp/4, dn_bytes]); biases: (gate [R, I], up [R, I],
    down [R, H]), any None. pairs: the number of pairs that name a row (not -1), where the caller knows it without
    a sync (a fetch wave of a few of the layer's experts): the activations between the two products are then
    sized by it instead of by all T k pairs (the sorted order puts those pairs first). Too small a number is a
    wrong answer, so it must be exact or None. row_counts: the pairs of each stack row, where the host knows them
    (exact too; they give `pairs`): many an expert, and the experts are dequantized first (module doc)."""
    gate_up, down = mats
    geo = _tiled(gate_up, down, fmt, group, hidden, intermediate)
    t, k = rows.shape
    if x.dim() != 2 or x.shape != (t, hidden) or topk_weights.shape != rows.shape:
        raise ValueError(f"want x [T, H], rows and weights [T, k]: {tuple(x.shape)}, {tuple(rows.shape)}")
    if not available(x.device):
        raise RuntimeError(f"the grouped expert kernel runs where the Triton kernels do, not on {x.device}")
    r, p, h, i = gate_up.shape[0], t * k, hidden, intermediate
    if row_counts is not None:
        row_counts = [int(c) for c in row_counts]
        if len(row_counts) != r or min(row_counts, default=0) < 0 or pairs not in (None, sum(row_counts)):
            raise ValueError(f"row_counts: one count of pairs (>= 0) for each of the {r} stack rows, summing to pairs")
        pairs = sum(row_counts)
    if pairs is not None and not 0 <= pairs <= p:
        raise ValueError(f"pairs={pairs}: between 0 and the {p} (token, slot) pairs")
    n = p if pairs is None else pairs  # the sorted pairs that name a row: the first n
    x = x.contiguous()
    bm = block_m(p, r)
    bt, bk, nw = blocks()
    bt = block_tiles or bt
    table = block_table(rows, r, bm)
    order, key = table[0], table[1]
    sorted_key = key[order[:n]]
    valid = sorted_key < r
    srow = sorted_key.clamp(max=r - 1)
    dev = x.device
    gb, ub, db = biases if biases is not None else (None, None, None)
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        if dequantizes(row_counts, x):
            ys = _dequantized(x, order[:n] // k, srow, row_counts, mats, act, fmt, group, h, i, (gb, ub))
        else:
            ys = _kernel_products(x, k, table, srow, n, mats, geo, act, i, (gb, ub), (bm, bt, bk, nw))
    if db is not None:
        ys = ys + db[srow].float()
    ys = torch.where(valid[:, None], ys * topk_weights.reshape(-1)[order[:n]].float()[:, None], 0.0)
    y_pair = (torch.zeros if n < p else torch.empty)(p, h, dtype=torch.float32, device=dev)  # (pairs left out: 0)
    y_pair.index_copy_(0, order[:n], ys)
    return y_pair.view(t, k, h).sum(1).to(x.dtype)


def _kernel_products(x, k, table, srow, n, mats, geo, act, i, gate_up_biases, launch) -> torch.Tensor:
    """The first n sorted pairs' expert outputs [n, H] fp32 (before the down bias) by the grouped kernel."""
    (gate_up, down), (bm, bt, bk, nw), order = mats, launch, table[0]
    dev, h = x.device, x.shape[1]
    # the raw gate / up rows in x's dtype, rounded from the fp32 sums as expert_forward rounds them (fp32 under the
    # interpreter, whose bf16 casts truncate): half the memory of fp32 rows, the largest of the call
    raw = torch.empty(n, 2 * geo.ip, dtype=torch.float32 if _INTERPRET else x.dtype, device=dev)
    src = (order // k).to(torch.int32)
    _launch(x, src, table, gate_up, geo.gu_tb, geo.gu_hb, geo.ip // 2, geo.hp, h, geo.ng_h, geo.gu_fmt, geo.gu_group,
            raw, bm, bt, bk, nw)  # fmt: skip
    quad = raw.view(n, geo.ip // 2, 4)
    gb, ub = gate_up_biases
    glu = glu_fn(act)
    hid = torch.zeros(n, geo.ip, dtype=x.dtype, device=dev)
    for s0 in range(0, n, MID_ROWS):  # the gated unit in slices of pairs: its gate / up copies stay small
        q, rows_s = quad[s0 : s0 + MID_ROWS], srow[s0 : s0 + MID_ROWS]
        m = q.shape[0]
        gate = q[:, :, :2].reshape(m, geo.ip)[:, :i].to(x.dtype)
        up = q[:, :, 2:].reshape(m, geo.ip)[:, :i].to(x.dtype)
        if gb is not None:
            gate = gate + gb[rows_s].to(x.dtype)
        if ub is not None:
            up = up + ub[rows_s].to(x.dtype)
        hid[s0 : s0 + m, :i] = glu(gate, up)
    del raw, quad  # (freed before the down product's buffers)
    out = torch.empty(n, geo.hp, dtype=torch.float32, device=dev)
    ident = torch.arange(n, dtype=torch.int32, device=dev)
    _launch(hid, ident, table, down, geo.dn_tb, geo.dn_hb, geo.hp // 4, geo.ip, i, geo.ng_i, geo.dn_fmt,
            geo.dn_group, out, bm, bt, bk, nw)  # fmt: skip
    return out[:, :h]


def _chunks(row_counts: list[int], per: int) -> list[tuple[int, int]]:
    """Runs [r0, r1) of at most `per` consecutive stack rows, each starting and ending at a row with pairs."""
    out, r = [], 0
    while r < len(row_counts):
        if not row_counts[r]:
            r += 1
            continue
        end = min(r + per, len(row_counts))
        while not row_counts[end - 1]:
            end -= 1
        out.append((r, end))
        r = end
    return out


def _dequantized(x, src, srow, row_counts, mats, act, fmt, group, h, i, gate_up_biases) -> torch.Tensor:
    """The sorted pairs' expert outputs [n, H] fp32 (before the down bias): each chunk of experts dequantized to x's
    dtype, then each expert's pairs through matrix products in x's dtype, as `gpu_moe.expert_forward` computes."""
    gate_up, down = mats
    gb, ub = gate_up_biases
    dev, dt, n = x.device, x.dtype, src.numel()
    chunks = _chunks(row_counts, _chunk_rows(row_counts, 3 * h * i * x.element_size()))
    width = max(r1 - r0 for r0, r1 in chunks)
    gw, uw, dw = (torch.empty(width, *shape, dtype=dt, device=dev) for shape in ((i, h), (i, h), (h, i)))
    counts = torch.zeros(len(row_counts), dtype=torch.int32, device=dev)
    counts.scatter_add_(0, srow, torch.ones_like(srow, dtype=torch.int32))  # row_counts, where the products are
    starts = list(itertools.accumulate(row_counts, initial=0))
    xs, ys, glu = x[src], torch.empty(n, h, dtype=torch.float32, device=dev), glu_fn(act)
    for r0, r1 in chunks:
        c, a, b = r1 - r0, starts[r0], starts[r1]
        dequantize_rows(gate_up[r0:r1], down[r0:r1], fmt, group, h, i, gw[:c], uw[:c], dw[:c])
        offs = torch.cumsum(counts[r0:r1], 0, dtype=torch.int32) if c > 1 else None
        each = row_counts[r0:r1]
        gate, up = _by_expert(xs[a:b], gw[:c], each, offs), _by_expert(xs[a:b], uw[:c], each, offs)
        if gb is not None:
            gate = gate + gb[srow[a:b]].to(dt)
        if ub is not None:
            up = up + ub[srow[a:b]].to(dt)
        ys[a:b] = _by_expert(glu(gate, up), dw[:c], each, offs)
    return ys


def _by_expert(a: torch.Tensor, w: torch.Tensor, counts: list[int], offs: torch.Tensor | None) -> torch.Tensor:
    """a's rows, consecutive by expert (`counts` of them for expert j, `offs` their running ends on a's device)
    times w[j]^T (w [c, N, K]): [rows, N] in a's dtype. torch._grouped_mm where it multiplies a's dtype there, else
    one product an expert."""
    if w.shape[0] == 1:
        return a @ w[0].T
    if offs is not None and _grouped_mm_takes(a, w):
        return torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
    out, s = a.new_empty(a.shape[0], w.shape[1]), 0
    for j, m in enumerate(counts):
        if m:
            torch.mm(a[s : s + m], w[j].T, out=out[s : s + m])
            s += m
    return out


def _grouped_mm_takes(a: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm's reach: bf16, sizes in whole 16-byte pieces, and a Hopper (or newer) GPU or the CPU."""
    if not hasattr(torch, "_grouped_mm") or a.dtype != torch.bfloat16 or a.shape[1] % 8 or w.shape[1] % 8:
        return False
    return a.device.type == "cpu" or torch.cuda.get_device_capability(a.device)[0] >= 9
