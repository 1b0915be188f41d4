# Over 400 lines: one public entry point per use (decode, dequantize, prefill) with the checks and launches it owns.
"""Routed experts on the GPU: Triton kernels that read the CPU kernel's weight layouts as they are.

A GPU copy of an expert is the same bytes as its host copy (rows of `gate_up` / `down` copied over), so these
kernels read both layouts that cadenza.kernels.layout defines, with no conversion:

- plain: gate, up [R, I, H] and down [R, H, I], row-major, in the compute dtype (bf16, fp16, fp32);
- tiled ("bf16", "int8", "int4"; `pack_layer`, byte layout in cpu_moe.cpp's header comment; the block formats
  "q4_0", "q4_k", "mxfp4", "q6_k" of cadenza.kernels.blocks, a layer's gate/up and down possibly in two of them,
  "q4_k+q6_k": each launch reads its matrix's format): gate_up
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

`dequantize_expert` / `dequantize_into` unpack one expert's tiles into gate, up [I, H] and down [H, I] of any
dtype (the prefill path: then a tensor-core matmul); `expert_forward` does both for one expert and many tokens.

This module is the launch side (checks, block sizes, grids); the kernels are in cadenza.kernels.gpu_moe_triton
and the pure-torch reference in cadenza.kernels.gpu_moe_ref. Every function runs on CPU tensors too: through
Triton's interpreter when TRITON_INTERPRET=1 was set before the kernels were imported (the tests do that),
otherwise through the pure-torch fallback, which is the reference.

Shape legend: E experts of a layer, R stacked expert rows (any experts, e.g. a GPU cache's slots), T tokens,
k slots per token, P = T k pairs, H hidden, I intermediate, Hp / Ip: H / I padded to multiples of 128.
"""

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from cadenza.kernels.cpu_moe import kernel_act
from cadenza.kernels.gpu_fused import sum_middle
from cadenza.kernels.gpu_moe_ref import _decode_torch, _dequant_torch
from cadenza.kernels.gpu_moe_triton import (
    _INTERPRET,
    _dequant_kernel,
    _plain_down_kernel,
    _plain_gate_up_kernel,
    _stage_int4_kernel,
    _tiled_down_kernel,
    _tiled_gate_up_kernel,
)
from cadenza.kernels.layout import (
    INT4_GROUPS,
    INT8_GROUPS,
    KERNEL_FORMATS,
    PAD,
    ROWS,
    _header_bytes,
    _round_up,
    _tile_bytes,
    matrix_formats,
)
from cadenza.kernels.triton_compat import MISSING as _MISSING
from cadenza.kernels.triton_compat import triton
from cadenza.models.common import glu_fn

__all__ = [
    "Blocks",
    "available",
    "default_blocks",
    "dequantize_expert",
    "dequantize_into",
    "dequantize_rows",
    "expert_forward",
    "moe_decode",
]

_FMT_CODES = {None: 0, **{f: n + 1 for n, f in enumerate(KERNEL_FORMATS)}}  # the kernels' FMT
_BYTES_PER_COL = {
    "bf16": 2.0,
    "int8": 1.0,
    "int4": 0.5,
    "q4_0": 0.5,
    "q4_k": 0.5,
    "mxfp4": 0.5,
    "q6_k": 0.75,  # 6-bit codes: 96 bytes per 128 columns
    "q8_0": 1.0,
    "q5_k": 0.625,  # 5-bit codes: 80 bytes per 128 columns
}
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
        # a tile's rows in each thread, 8 tiles of gate/up and 4 of down per program, 512 columns a step, 4 warps:
        # the fastest of cadenza.bench.gpu_kernel's sweep at 1-8 tokens at Mixtral's and Qwen3's shapes (x is
        # loaded once per tile; benchmarks/README.md, 2026-12-02)
        return Blocks(32, _step_cols(hidden, 512), 16, _step_cols(intermediate, 512), 4, int4_rows=1)
    fmt = fmt.partition("+")[0] if fmt else fmt  # a "gate_up+down" layer: sized by its gate/up format
    bpc = _BYTES_PER_COL[fmt] if fmt else elem_bytes
    cols = 1 << (int(512 / bpc).bit_length() - 1)  # a power of two (q6_k: 512 columns, 384 bytes)
    warps = 4
    if fmt == "int8":
        # 256 columns and 2 warps per program: the fastest int8 reads in a sweep of rows x cols x warps at one
        # token, for both kernels (benchmarks/README.md, numbers formerly in code comments)
        cols, warps = 256, 2
    gu, dn = 16, 8
    while gu > 4 and pairs * 2 * intermediate / gu < 1024:
        gu //= 2
    while dn > 4 and pairs * hidden / dn < 1024:
        dn //= 2
    return Blocks(gu, _step_cols(hidden, cols), dn, _step_cols(intermediate, cols), warps)


@dataclass(frozen=True)
class _Tiled:
    """A tiled layer's geometry, checked against the tensors: each matrix's format and group (a "gate_up+down"
    layer's differ), tile and header bytes, groups per row."""

    gu_fmt: str
    gu_group: int
    dn_fmt: str
    dn_group: int
    hp: int
    ip: int
    gu_tb: int
    gu_hb: int
    dn_tb: int
    dn_hb: int
    ng_h: int
    ng_i: int


def _tiled(gate_up: torch.Tensor, down: torch.Tensor, fmt: str, group: int, hidden, intermediate) -> _Tiled:
    gu, plus, dn = fmt.partition("+") if isinstance(fmt, str) else (fmt, "", "")
    quantized = {"bf16": (0,), "int8": INT8_GROUPS, "int4": INT4_GROUPS}
    if gu not in KERNEL_FORMATS or (plus and (dn not in KERNEL_FORMATS or gu in quantized or dn in quantized)):
        raise ValueError(
            f"unknown expert format {fmt!r}: use one of {', '.join(KERNEL_FORMATS)}, a pair of block formats "
            f'such as "q4_k+q6_k", or None: plain tensors'
        )
    if hidden is None or intermediate is None:
        raise ValueError("tiled experts need hidden= and intermediate= (the unpadded H and I)")
    if gu in quantized and group not in quantized[gu]:
        raise ValueError(f"group {group} is not a {fmt} layout's group (see layout.pack_layer)")
    (gf, gg), (df, dg) = matrix_formats(fmt, group)  # block formats: their own groups
    hp, ip = _round_up(hidden, PAD), _round_up(intermediate, PAD)
    want_gu = (ip // 2, _tile_bytes(gf, gg, hp))
    want_dn = (hp // ROWS, _tile_bytes(df, dg, ip))
    if tuple(gate_up.shape[-2:]) != want_gu or tuple(down.shape[-2:]) != want_dn:
        raise ValueError(
            f"{fmt} (group {group}) tiles for H={hidden}, I={intermediate} are gate_up [.., {want_gu[0]}, "
            f"{want_gu[1]}] and down [.., {want_dn[0]}, {want_dn[1]}], got {tuple(gate_up.shape)} and "
            f"{tuple(down.shape)}"
        )
    for name, m in (("gate_up", gate_up), ("down", down)):
        if m.dtype != torch.uint8 or m.stride(-1) != 1 or m.stride(-2) != m.shape[-1]:
            raise ValueError(f"{name} must be uint8 tiles with contiguous rows, got {m.dtype} strides {m.stride()}")
    ng_h, ng_i = hp // gg if gg else 1, ip // dg if dg else 1
    hb_gu, hb_dn = _header_bytes(gf, gg, hp), _header_bytes(df, dg, ip)
    return _Tiled(gf, gg, df, dg, hp, ip, want_gu[1], hb_gu, want_dn[1], hb_dn, ng_h, ng_i)


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
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """y [T, H] (x's dtype) = sum over slots j of topk_weights[t, j] * expert_{rows[t, j]}(x[t]), fp32 inside.

    x [T, H] bf16 / fp16 / fp32; rows [T, k] int32 / int64: the row of `mats` for each (token, slot) pair, or -1
    to skip it (computed elsewhere; it adds 0); topk_weights [T, k]; act: a `cadenza.models.common.ACTIVATIONS`
    name or gpt-oss's "clamped_swiglu:ALPHA:LIMIT" (`models.common.glu_fn`). mats: plain (gate [R, I, H], up
    [R, I, H], down [R, H, I]) with fmt None, or tiled (gate_up [R, Ip/2, gu_bytes], down [R, Hp/4, dn_bytes]) with
    fmt a `layout.KERNEL_FORMATS` name ("bf16", "int8", "int4", block formats "q4_0", "q4_k", "mxfp4", "q6_k") or a
    pair of block formats "gate_up+down" ("q4_k+q6_k"), its group (block formats: their own, the argument is
    ignored), hidden=H and intermediate=I. biases: None, or (gate_bias [R, I], up_bias [R, I], down_bias [R, H])
    by the same rows as `mats` (any of them None), in x's dtype or fp32: an expert is then down(glu(gate x +
    gate_bias, up x + up_bias)) + down_bias, weighted as a whole (fp32 inside). Fixed launches, no host
    synchronisation: CUDA-graph capturable (after a first eager call has compiled the kernels for these shapes).
    blocks: work per program (default `default_blocks`). route: "auto" (Triton where `available`, else PyTorch),
    "triton", "torch" (the reference fallback, a loop over pairs).
    """
    glu_fn(act)  # CadenzaError for an unknown activation
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
    r = mats[0].shape[0]
    biases = _check_biases(biases, r, h, i, x)
    if t * k == 0:
        return x.new_zeros(t, h)
    if not _use_triton(x.device, route):
        return _decode_torch(x, rows, topk_weights, mats, act, fmt, group, hidden, intermediate, biases)

    p = t * k
    x, rows, wts = x.contiguous(), rows.contiguous(), topk_weights.contiguous()
    cfg = blocks or default_blocks(fmt, h, i, p, mats[0].element_size())
    y_pair = torch.empty(p, h, dtype=torch.float32, device=x.device)
    act3 = kernel_act(act)  # (code, alpha, limit)
    gb, ub, db = (y_pair if b is None else b for b in biases)  # an absent bias: never read (HAS_* False)
    has = {"HAS_GB": biases[0] is not None, "HAS_UB": biases[1] is not None}
    with torch.cuda.device(x.device) if x.device.type == "cuda" else nullcontext():
        if geo is None:
            gate, up, down = (m.contiguous() for m in mats)
            hbuf = torch.empty(p, i, dtype=torch.float32, device=x.device)
            br, bk1, bk2 = cfg.gu_rows // 2, _step_cols(h, cfg.gu_cols), _step_cols(i, cfg.dn_cols)
            _plain_gate_up_kernel[(p, triton.cdiv(i, br))](
                x, rows, hbuf, gate, up, h, i, k, gb, ub, act3[1], act3[2], ACT=act3[0], BR=br, BK=bk1, **has,
                num_warps=cfg.warps,
            )  # fmt: skip
            _plain_down_kernel[(p, triton.cdiv(h, cfg.dn_rows))](
                hbuf, rows, wts, y_pair, down, h, i, db, BR=cfg.dn_rows, BK=bk2, HAS_DB=biases[2] is not None,
                num_warps=cfg.warps,
            )  # fmt: skip
        else:
            _tiled_decode(x, rows, wts, mats, act3, geo, cfg, y_pair, (gb, ub, db), has, biases[2] is not None, i)
    return sum_middle(y_pair.view(t, k, h), x.dtype)  # the slots' sum and the cast in one launch


def _check_biases(biases, r: int, h: int, i: int, x: torch.Tensor) -> tuple:
    """(gate_bias, up_bias, down_bias), each None or a contiguous [r, I] / [r, I] / [r, H] float tensor on x's
    device."""
    if biases is None:
        return (None, None, None)
    if len(biases) != 3:
        raise ValueError("biases are (gate_bias [R, I], up_bias [R, I], down_bias [R, H]), each possibly None")
    out = []
    for name, b, n in zip(("gate_bias", "up_bias", "down_bias"), biases, (i, i, h), strict=True):
        if b is not None:
            if tuple(b.shape) != (r, n) or not b.is_floating_point() or b.device != x.device:
                raise ValueError(
                    f"{name} must be a float [{r}, {n}] tensor on {x.device}, got {b.dtype} {tuple(b.shape)} on "
                    f"{b.device}"
                )
            b = b.contiguous()
        out.append(b)
    return tuple(out)


def _tiled_decode(x, rows, wts, mats, act3, geo, cfg, y_pair, bias_ptrs, has, has_db, inter) -> None:
    """The tiled launches, each with its matrix's format. int4 reads x (and h) staged: _stage_int4_kernel for x,
    kernel 1 writes h so; both zero-padded to whole loop steps, so the int4 loop loads them unmasked."""
    (t, h), k, p = x.shape, rows.shape[1], y_pair.shape[0]
    gu, dn = mats
    f1, f2 = _FMT_CODES[geo.gu_fmt], _FMT_CODES[geo.dn_fmt]
    bk1, bk2 = _step_cols(geo.hp, cfg.gu_cols), _step_cols(geo.ip, cfg.dn_cols)
    bt1, bt2 = cfg.gu_rows // ROWS, cfg.dn_rows // ROWS
    rows4_1 = geo.gu_fmt == "int4" and cfg.int4_rows == 1
    rows4_2 = geo.dn_fmt == "int4" and cfg.int4_rows == 1
    xin, hlen = x, geo.ip
    if geo.dn_fmt == "int4":
        hlen = _round_up(geo.ip, bk2)
    if geo.gu_fmt == "int4":
        xin = torch.empty(t, _round_up(geo.hp, bk1), dtype=torch.float32, device=x.device)
        _stage_int4_kernel[(t, triton.cdiv(xin.shape[1], 128))](x, xin, h, xin.shape[1], BLOCK=128)
    hbuf = torch.empty(p, hlen, dtype=torch.float32, device=x.device)
    _tiled_gate_up_kernel[(p, triton.cdiv(hlen // 2, bt1))](
        xin,
        xin.shape[1],
        rows,
        hbuf,
        hlen,
        gu,
        gu.stride(0),
        geo.gu_tb // 4,
        geo.gu_hb // 4,
        geo.ng_h,
        h,
        geo.hp,
        geo.ip,
        k,
        bias_ptrs[0],
        bias_ptrs[1],
        inter,
        act3[1],
        act3[2],
        ACT=act3[0],
        FMT=f1,
        GROUP=geo.gu_group,
        BT=bt1,
        BK=bk1,
        ROWS4=rows4_1,
        STAGE_H=geo.dn_fmt == "int4",
        **has,
        num_warps=cfg.warps,
    )
    _tiled_down_kernel[(p, triton.cdiv(geo.hp // 4, bt2))](
        hbuf,
        hlen,
        rows,
        wts,
        y_pair,
        dn,
        dn.stride(0),
        geo.dn_tb // 4,
        geo.dn_hb // 4,
        geo.ng_i,
        h,
        geo.hp,
        geo.ip,
        bias_ptrs[2],
        FMT=f2,
        GROUP=geo.dn_group,
        BT=bt2,
        BK=bk2,
        ROWS4=rows4_2,
        HAS_DB=has_db,
        num_warps=cfg.warps,
    )


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
    if gate_up.dim() != 2:
        raise ValueError("dequantize_into takes one expert's tiles ([tiles, bytes]); dequantize_rows takes stacks")
    outs = (o.unsqueeze(0) for o in (gate_out, up_out, down_out))
    dequantize_rows(
        gate_up.unsqueeze(0), down.unsqueeze(0), fmt, group, hidden, intermediate, *outs, route=route,
        block_tiles=block_tiles, block_cols=block_cols,
    )  # fmt: skip


def dequantize_rows(
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
    """`dequantize_into` for n experts at once: stacked tiles gate_up [n, Ip/2, gu_bytes], down [n, Hp/4, dn_bytes]
    (rows of a stack, any stride between them) into gate_out, up_out [n, I, H] and down_out [n, H, I] (rows
    contiguous). One Triton launch per matrix for all n (a small expert's launch alone leaves the
    GPU mostly idle), else PyTorch expert by expert."""
    geo = _tiled(gate_up, down, fmt, group, hidden, intermediate)
    h, i, n = hidden, intermediate, gate_up.shape[0]
    for name, o, shape in (("gate_out", gate_out, (i, h)), ("up_out", up_out, (i, h)), ("down_out", down_out, (h, i))):
        if tuple(o.shape) != (n, *shape) or o.stride(-1) != 1:
            want = f"[{n}, {shape[0]}, {shape[1]}] with contiguous rows"
            raise ValueError(f"{name} must be {want}, got {tuple(o.shape)} {o.stride()}")
    if gate_up.dim() != 3 or down.shape[0] != n or gate_out.stride() != up_out.stride():
        raise ValueError(
            "dequantize_rows takes n experts' stacked tiles ([n, tiles, bytes]) and like gate / up outputs"
        )
    if gate_out.dtype != up_out.dtype:
        raise ValueError(f"gate_out and up_out differ in dtype: {gate_out.dtype}, {up_out.dtype}")
    if not _use_triton(gate_up.device, route):
        for j in range(n):
            vals = _dequant_torch(gate_up[j], down[j], fmt, group, h, i)
            for o, v in zip((gate_out[j], up_out[j], down_out[j]), vals, strict=True):
                o.copy_(v)
        return
    if n == 0:
        return
    if block_cols < PAD or block_cols & (block_cols - 1) or block_tiles & (block_tiles - 1):
        raise ValueError(f"block_cols must be a power of two >= {PAD}, block_tiles a power of two")
    block_cols = min(block_cols, _step_cols(max(geo.hp, geo.ip), block_cols))
    emu = lambda o: _INTERPRET and o.dtype == torch.bfloat16  # noqa: E731
    with torch.cuda.device(gate_up.device) if gate_up.device.type == "cuda" else nullcontext():
        for mat, tiles, cols, k_cols, ng, tb, hb, mfmt, mgroup, out0, out1, n_rows, n_cols, gu in (
            (gate_up, geo.ip // 2, geo.hp, geo.hp, geo.ng_h, geo.gu_tb, geo.gu_hb, geo.gu_fmt, geo.gu_group,
             gate_out, up_out, i, h, True),
            (down, geo.hp // 4, geo.ip, geo.ip, geo.ng_i, geo.dn_tb, geo.dn_hb, geo.dn_fmt, geo.dn_group,
             down_out, down_out, h, i, False),
        ):  # fmt: skip
            grid = (triton.cdiv(tiles, block_tiles), triton.cdiv(cols, block_cols), n)
            _dequant_kernel[grid](
                mat, tb, hb, tiles, k_cols, ng, out0, out1, out0.stride(1), n_rows, n_cols, mat.stride(0),
                out0.stride(0), GU=gu, FMT=_FMT_CODES[mfmt], GROUP=mgroup, EMU_RNE=emu(out0), BT=block_tiles,
                BK=block_cols,
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
    biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """One tiled expert on many tokens (prefill): x [n, H] -> down(act(gate x) * up x) [n, H] in fp32; with
    biases = (gate_bias [I], up_bias [I], down_bias [H]) of this expert (any None), down(glu(gate x + gate_bias,
    up x + up_bias)) + down_bias, glu of `act` as `models.common.glu_fn` (gpt-oss's "clamped_swiglu:A:L" too).

    Dequantizes to x's dtype (into `workspace` = (gate [I, H], up [I, H], down [H, I]) when given, so a caller
    reuses one buffer), then three matmuls in x's dtype (biases cast to it), as `cadenza.moe.experts.expert_ffn`
    computes."""
    glu = glu_fn(act)
    gb, ub, db = (None, None, None) if biases is None else biases
    for name, b, n in (("gate_bias", gb, intermediate), ("up_bias", ub, intermediate), ("down_bias", db, hidden)):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{name} of one expert must be [{n}], got {tuple(b.shape)}")
    if workspace is None:
        gate, up, dn = dequantize_expert(gate_up, down, fmt, group, hidden, intermediate, x.dtype, route=route)
    else:
        gate, up, dn = workspace
        dequantize_into(gate_up, down, fmt, group, hidden, intermediate, gate, up, dn, route=route)
    g, u = x @ gate.T, x @ up.T
    if gb is not None:
        g = g + gb.to(x.dtype)
    if ub is not None:
        u = u + ub.to(x.dtype)
    out = glu(g, u) @ dn.T
    if db is not None:
        out = out + db.to(x.dtype)
    return out.float()
