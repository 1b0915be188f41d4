"""The layouts of a layer's routed experts that the fused CPU kernel (cpu_moe.cpp) streams.

`pack_layer` quantizes (int8, int4) or rounds (bf16) a layer's stacked expert weights and tiles them (several
threads; `expert_nbytes` gives an expert's packed size without packing); `dequantize`
reads a packed layer back in pure torch, the reference for the kernel's reading of the same bytes. `plain_layer`
(`PlainExperts.of`) wraps a bf16 model's own stacked tensors as they are, with no copy: the kernel reads their rows
in place (no second copy of the experts in host memory, and the GPU path keeps using the same tensors).

Each matrix is tiles of 4 rows; a tile is a header (the rows' scales) then 64-byte pieces of its 4 rows
interleaved (q6_k, q5_k: per 128 columns the 4 rows' 64-byte pieces of nibbles, then their 32- or 16-byte pieces
of high bits), so a run of tiles is one sequential stream. Rows and columns are padded to multiples of 128. gate and
up share one matrix: tile j holds gate rows 2j, 2j+1 and up rows 2j, 2j+1. cpu_moe.cpp's header comment has the
byte-level description.

Shape legend: E experts, H hidden, I intermediate, Hp / Ip padded H / I.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from cadenza.kernels import blocks
from cadenza.kernels.blocks import BLOCK_FORMATS

FORMATS = ("bf16", "int8", "int4")  # what --experts quantizes to
# every layout the kernels read (their format codes are indexes here): FORMATS, then the file block formats kept as
# they are (cadenza.kernels.blocks); a layer whose down matrices differ from gate/up is named "gate_up+down"
KERNEL_FORMATS = FORMATS + tuple(BLOCK_FORMATS)
ROWS = 4  # rows per tile
PAD = 128  # rows and columns are padded to multiples of this
INT8_GROUPS = (0, 32, 64, 128)  # 0: one scale per output channel
INT4_GROUPS = (32, 64, 128)
DEFAULT_GROUP = {"bf16": 0, "int8": 0, "int4": 64}


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass
class PackedExperts:
    """A layer's routed experts in the kernel's streaming layout (host memory, one copy).

    gate_up: uint8 [E, Ip / 2, gu_tile_bytes]: tile j = gate rows 2j, 2j+1 and up rows 2j, 2j+1, Hp columns.
    down:    uint8 [E, Hp / 4, dn_tile_bytes]: tile j = down rows 4j .. 4j+3, Ip columns.
    """

    fmt: str  # a KERNEL_FORMATS name, or "gate_up+down" (block formats) where the two differ
    group: int  # scale group in columns (0: per output channel; bf16: 0; block formats: gate/up's)
    num_experts: int
    hidden: int
    intermediate: int
    gate_up: torch.Tensor
    down: torch.Tensor
    gu_header: int  # bytes of scales at the start of each gate/up tile
    dn_header: int

    @property
    def hidden_pad(self) -> int:
        return _round_up(self.hidden, PAD)

    @property
    def inter_pad(self) -> int:
        return _round_up(self.intermediate, PAD)

    @property
    def nbytes(self) -> int:
        return self.gate_up.numel() + self.down.numel()

    def matrix_format(self, which: str) -> tuple[str, int]:
        """(format, group) of the "gate_up" or "down" matrices."""
        gu, dn = matrix_formats(self.fmt, self.group)
        return gu if which == "gate_up" else dn

    @property
    def expert_bytes(self) -> int:
        """Bytes one expert streams per use (weights, scales and padding): what a token costs in DRAM reads."""
        return self.nbytes // self.num_experts


@dataclass(frozen=True)
class PlainExperts:
    """A layer's routed bf16 experts in the model's own layout, held by reference (no copy): gate, up [E, I, H] and
    down [E, H, I], row-major, contiguous, on the CPU. The kernel reads row r of expert e's gate at
    gate + (e I + r) H, in place; any H and I. Make it after the weights are loaded (it keeps these tensors)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    fmt = "bf16"
    group = 0

    @classmethod
    def of(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> PlainExperts:
        """Wraps the stacked tensors (ValueError unless bf16, contiguous, CPU, [E, I, H], [E, I, H], [E, H, I])."""
        out = cls(gate, up, down)
        out.check()
        return out

    def check(self) -> None:
        """ValueError unless the tensors are what the kernel can read in place."""
        mats = {"gate": self.gate, "up": self.up, "down": self.down}
        for name, m in mats.items():
            if not isinstance(m, torch.Tensor):
                raise ValueError(f"plain experts: {name} is a {type(m).__name__}, not a stacked tensor")
            if m.dim() != 3:
                raise ValueError(f"plain experts: {name} has shape {tuple(m.shape)}, want a stacked [E, rows, cols]")
            if m.dtype != torch.bfloat16:
                raise ValueError(f"plain experts must be bfloat16 (read in place), {name} is {m.dtype}: use pack_layer")
            if m.device.type != "cpu":
                raise ValueError(f"plain experts must be on the CPU, {name} is on {m.device}")
            if not m.is_contiguous():
                raise ValueError(f"plain experts must be contiguous row-major, {name} has strides {m.stride()}")
        e, i, h = self.gate.shape
        if e == 0 or i == 0 or h == 0 or self.up.shape != (e, i, h) or self.down.shape != (e, h, i):
            shapes = f"gate {tuple(self.gate.shape)}, up {tuple(self.up.shape)}, down {tuple(self.down.shape)}"
            raise ValueError(f"plain expert shapes disagree: {shapes}; want [E, I, H], [E, I, H], [E, H, I]")

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden(self) -> int:
        return self.gate.shape[2]

    @property
    def intermediate(self) -> int:
        return self.gate.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in (self.gate, self.up, self.down))

    @property
    def expert_bytes(self) -> int:
        """Bytes one expert streams per use: what a token costs in DRAM reads."""
        return self.nbytes // self.num_experts


def plain_layer(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> PlainExperts:
    """A bf16 layer's stacked experts for the kernel, in place (no copy): `PlainExperts.of`."""
    return PlainExperts.of(gate, up, down)


# --- layout: quantize and tile (the kernel reads exactly this) ----------------------------------------------------


def matrix_formats(fmt: str, group: int) -> tuple[tuple[str, int], tuple[str, int]]:
    """A layer format -> ((format, group) of gate/up, of down): "q4_k+q6_k" names the two; block formats carry
    their own group."""
    gu, _, dn = fmt.partition("+")
    dn = dn or gu
    return (gu, BLOCK_FORMATS[gu].group if gu in BLOCK_FORMATS else group), (
        dn,
        BLOCK_FORMATS[dn].group if dn in BLOCK_FORMATS else group,
    )


def _header_bytes(fmt: str, group: int, k: int) -> int:
    if fmt == "bf16":
        return 0
    if fmt in BLOCK_FORMATS:
        return _round_up(ROWS * blocks.header_row_bytes(fmt, k), 64)
    ng = k // group if group else 1
    per_row = 4 * ng if fmt == "int8" else 3 * ng  # int8: fp32 scale; int4: bf16 scale + uint8 zero point
    return _round_up(ROWS * per_row, 64)


def _tile_bytes(fmt: str, group: int, k: int) -> int:
    per_row = blocks.code_row_bytes(fmt, k) if fmt in BLOCK_FORMATS else {"bf16": 2 * k, "int8": k, "int4": k // 2}[fmt]
    return _header_bytes(fmt, group, k) + ROWS * per_row


def _quantize_rows(w: torch.Tensor, fmt: str, group: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """w [R, K] (K a multiple of 128) -> (row bytes [R, bytes per row] in the kernel's column order, scale tensors
    [R, groups] for the header, in header order).

    With `_tile_into`, the layout's arithmetic spelled out: the reference. `pack_layer` computes the same bytes
    chunk by chunk in reused buffers (`_ChunkPacker`); tests/test_quantized_experts.py checks that they agree."""
    r, k = w.shape
    if fmt == "bf16":
        return w.to(torch.bfloat16).view(torch.uint8), []
    g = group or k
    wg = w.float().view(r, k // g, g)
    if fmt == "int8":
        scale = wg.abs().amax(dim=2) / 127.0  # [R, groups] fp32
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.round(wg * inv[:, :, None]).clamp_(-127, 127).to(torch.int8)
        return q.view(r, k).view(torch.uint8), [scale]
    # int4: value = (q - z) * scale, q and the zero point z in 0..15, the range widened to hold 0 (so z is exact);
    # the scale is rounded to bf16 before quantizing
    lo, hi = wg.amin(dim=2).clamp(max=0), wg.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / 15.0).to(torch.bfloat16)
    s32 = scale.float()
    inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
    z = torch.round(-lo * inv).clamp_(0, 15)
    q = (torch.round(wg * inv[:, :, None]) + z[:, :, None]).clamp_(0, 15).to(torch.int16).view(r, k // 128, 4, 32)
    # per 128 columns: 16-bit word j holds column 32n + j in nibble n
    words = q[:, :, 0] | (q[:, :, 1] << 4) | (q[:, :, 2] << 8) | (q[:, :, 3] << 12)
    return words.view(r, k // 4).view(torch.uint8), [scale, z.to(torch.uint8)]


def _tile_into(out: torch.Tensor, w: torch.Tensor, fmt: str, group: int) -> None:
    """w [R, K] (R, K multiples of 4 and 128) -> its tiles, written into out uint8 [R / 4, tile bytes]."""
    k = w.shape[1]
    data, scales = _quantize_rows(w, fmt, group)
    if data.data_ptr() % 8 or not data.is_contiguous():
        data = data.contiguous().clone()  # an unaligned view cannot be read as 8-byte words
    _write_tiles(out, data, scales, fmt, group, k)


def _write_tiles(out: torch.Tensor, data: torch.Tensor, scales: list[torch.Tensor], fmt: str, group: int, k: int):
    """Quantized rows data uint8 [R, row bytes] (contiguous, 8-byte aligned) and their scales -> out uint8 [R / 4,
    tile bytes]: each tile's header (its rows' scales, zero-padded), then the 4 rows' pieces interleaved per chunk
    (64 bytes each; q6_k, q5_k: a 64-byte and a 32- or 16-byte piece per 128 columns, blocks.chunk_pieces)."""
    r, nbytes = data.shape
    hb = _header_bytes(fmt, group, k)
    pieces = blocks.chunk_pieces(fmt)
    per = sum(pieces)  # bytes of a row per chunk
    # moved as 8-byte words (a uint8 permute copy is slow)
    body = out[:, hb:].view(torch.int64).view(r // ROWS, nbytes // per, ROWS * per // 8)
    src = data.view(torch.int64).view(r // ROWS, ROWS, nbytes // per, per // 8)
    at = 0
    for size in pieces:
        part = body[:, :, ROWS * at // 8 : ROWS * (at + size) // 8].unflatten(2, (ROWS, size // 8))
        part.copy_(src[:, :, :, at // 8 : (at + size) // 8].transpose(1, 2))
        at += size
    if hb:
        out[:, :hb] = 0
        at = 0
        for sc in scales:
            part = sc.reshape(r // ROWS, -1).contiguous().view(torch.uint8)
            out[:, at : at + part.shape[1]] = part
            at += part.shape[1]


def tile_rows(fmt: str, body: torch.Tensor) -> torch.Tensor:
    """Tiles' bodies uint8 [n, body bytes] (after their headers) -> their rows' bytes [4 n, row bytes]."""
    n = body.shape[0]
    pieces = blocks.chunk_pieces(fmt)
    per = sum(pieces)
    chunks = body.reshape(n, -1, ROWS * per)
    parts, at = [], 0
    for size in pieces:
        parts.append(chunks[:, :, ROWS * at : ROWS * (at + size)].unflatten(2, (ROWS, size)))
        at += size
    rows = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)
    return rows.transpose(1, 2).reshape(n * ROWS, -1)


def _padded(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if tuple(w.shape) == (rows, cols):
        return w
    out = torch.zeros(rows, cols, dtype=w.dtype)
    out[: w.shape[0], : w.shape[1]] = w
    return out


def resolve_group(fmt: str, group: int | None) -> int:
    """The scale group of a format (None: its default), or ValueError naming the allowed ones. Block formats (and
    "gate_up+down" pairs of them) have their own: gate/up's."""
    gu, _, dn = fmt.partition("+")
    if gu in BLOCK_FORMATS and (dn or gu) in BLOCK_FORMATS:
        return BLOCK_FORMATS[gu].group
    if fmt not in FORMATS:
        raise ValueError(f"unknown expert format {fmt!r}: use one of {', '.join(FORMATS)}")
    group = DEFAULT_GROUP[fmt] if group is None else group
    allowed = {"bf16": (0,), "int8": INT8_GROUPS, "int4": INT4_GROUPS}[fmt]
    if group not in allowed:
        raise ValueError(f"group {group} is not supported for {fmt}: use one of {allowed}")
    return group


def expert_nbytes(fmt: str, group: int | None, hidden: int, intermediate: int) -> int:
    """Bytes one packed expert takes (`PackedExperts.expert_bytes`), from the shapes alone: nothing is packed."""
    group = resolve_group(fmt, group)
    hp, ip = _round_up(hidden, PAD), _round_up(intermediate, PAD)
    (gf, gg), (df, dg) = matrix_formats(fmt, group)
    return ip // 2 * _tile_bytes(gf, gg, hp) + hp // ROWS * _tile_bytes(df, dg, ip)


def empty_packed(fmt: str, group: int | None, num_experts: int, hidden: int, intermediate: int) -> PackedExperts:
    """An uninitialised packed layer of these shapes (what `pack_layer` fills, or a cache file is read into)."""
    group = resolve_group(fmt, group)
    e, hp, ip = num_experts, _round_up(hidden, PAD), _round_up(intermediate, PAD)
    (gf, gg), (df, dg) = matrix_formats(fmt, group)
    gu = torch.empty(e, ip // 2, _tile_bytes(gf, gg, hp), dtype=torch.uint8)
    dn = torch.empty(e, hp // ROWS, _tile_bytes(df, dg, ip), dtype=torch.uint8)
    return PackedExperts(
        fmt, group, e, hidden, intermediate, gu, dn, _header_bytes(gf, gg, hp), _header_bytes(df, dg, ip)
    )


def pack_layer(
    gate: torch.Tensor | Sequence[torch.Tensor],
    up: torch.Tensor | Sequence[torch.Tensor],
    down: torch.Tensor | Sequence[torch.Tensor],
    fmt: str = "bf16",
    group: int | None = None,
    threads: int = 1,
) -> PackedExperts:
    """Lays out a layer's experts for the kernel. gate, up [E, I, H]; down [E, H, I]: stacked tensors or sequences
    of E per-expert tensors (any float dtype, CPU).

    fmt: "bf16"; "int8" (symmetric, fp32 scale per output channel, or per `group` columns: 32, 64, 128); "int4"
    (bf16 scale and 4-bit zero point per `group` columns: 32, 64 (default) or 128). Works in chunks of rows of
    about a million weights each, in reused buffers, so the temporary memory is a few tens of MB per thread; the
    caller drops the stacked tensors after. threads: the cores to use (pack.cpp's OpenMP threads for fp32 and bf16
    sources; else Python threads sharing the chunks, each running torch with one intra-op thread): the bytes are the
    same for any count and either path.
    """
    group = resolve_group(fmt, group)
    e, (i, h) = len(gate), tuple(gate[0].shape)
    if len(up) != e or len(down) != e or tuple(up[0].shape) != (i, h) or tuple(down[0].shape) != (h, i):
        shapes = f"gate {e} x {(i, h)}, up {len(up)} x {tuple(up[0].shape)}, down {len(down)} x {tuple(down[0].shape)}"
        raise ValueError(f"expert shapes disagree: {shapes}; want E x [I, H], E x [I, H], E x [H, I]")
    out = empty_packed(fmt, group, e, h, i)
    from cadenza.kernels import pack

    if pack.takes(fmt, [*gate, *up, *down]):  # pack.cpp: the same bytes in one pass a matrix on `threads` cores
        pack.pack_into(out, gate, up, down, threads)
        return out
    hp, ip = out.hidden_pad, out.inter_pad
    # work items: (expert, matrix, first row, last row) of the padded matrix; gate/up rows count gate rows
    gu_step = max(2, _CHUNK_ELEMENTS // (2 * hp) // 2 * 2)
    dn_step = max(ROWS, _CHUNK_ELEMENTS // ip // ROWS * ROWS)
    items = [(x, "gate_up", r0, min(ip, r0 + gu_step)) for x in range(e) for r0 in range(0, ip, gu_step)]
    items += [(x, "down", r0, min(hp, r0 + dn_step)) for x in range(e) for r0 in range(0, hp, dn_step)]

    def work(todo: list[tuple[int, str, int, int]]) -> None:
        # one intra-op thread: the ops are small, and OpenMP teams of several threads per op were several times
        # slower (a busy machine makes their barriers spin). This sets this thread's OpenMP team only.
        torch.set_num_threads(1)
        packer = _ChunkPacker(fmt, group, max(2 * gu_step * hp, dn_step * ip))
        for x, which, r0, r1 in todo:
            if which == "gate_up":
                packer.gate_up(out.gate_up[x, r0 // 2 : r1 // 2], gate[x], up[x], r0, r1, h, hp)
            else:
                packer.rows(out.down[x, r0 // ROWS : r1 // ROWS], down[x], r0, r1, i, ip)

    threads = max(1, min(threads, len(items)))
    with ThreadPoolExecutor(threads, thread_name_prefix="cadenza-pack") as pool:
        # interleaved shares: each thread gets chunks of every matrix, so the shares take about equal time
        for f in [pool.submit(work, items[t::threads]) for t in range(threads)]:
            f.result()
    return out


# Weights per chunk: 2 MB of fp32 scratch, in a core's L2 on server CPUs, so the ~10 elementwise passes of a chunk
# stay out of DRAM; larger than that costs the same, much smaller lets torch's per-call overhead show.
_CHUNK_ELEMENTS = 1 << 19


class _ChunkPacker:
    """Packs chunks of rows with `_quantize_rows`' arithmetic (the same bytes), in preallocated buffers: every
    elementwise op writes in place or into a reused buffer (a fresh multi-MB output per op costs page faults that
    made packing 5x slower)."""

    def __init__(self, fmt: str, group: int, elements: int):
        self.fmt, self.group = fmt, group
        self.f = torch.empty(elements, dtype=torch.float32)  # the rows in fp32, then quantized in place
        if fmt != "int4":  # the quantized (int8) or rounded (bf16) rows
            self.q = torch.empty(elements, dtype=torch.int8 if fmt == "int8" else torch.bfloat16)
        else:  # 4 columns per 16-bit word, summed in fp32, then its low 16 bits
            self.words = torch.empty(elements // 4, dtype=torch.float32)
            self.words32 = torch.empty(elements // 4, dtype=torch.int32)
            self.words16 = torch.empty(elements // 4, dtype=torch.int16)

    def gate_up(self, out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, r0: int, r1: int, h: int, hp: int):
        """Gate and up rows [r0, r1) of the padded matrices (rows past I and columns past H are zero) -> tiles
        out [(r1 - r0) / 2, tile bytes]: tile j = gate rows r0 + 2j, r0 + 2j + 1, then the same up rows."""
        n = r1 - r0
        f = self.f[: 2 * n * hp].view(n // 2, 2, 2, hp)  # [tile, gate | up, 2 rows, Hp]
        real = max(0, min(r1, gate.shape[0]) - r0)
        if real < n or h < hp:
            f.zero_()
        pairs = real // 2
        for side, w in enumerate((gate, up)):
            if pairs:
                f[:pairs, side, :, :h].copy_(w[r0 : r0 + 2 * pairs].reshape(pairs, 2, h))
            if real % 2:
                f[pairs, side, 0, :h].copy_(w[r0 + real - 1])
        self._tile(out, f.view(2 * n, hp))

    def rows(self, out: torch.Tensor, w: torch.Tensor, r0: int, r1: int, k: int, kp: int):
        """Rows [r0, r1) of w [R, k], padded to kp columns (rows past R are zero) -> tiles out [(r1 - r0) / 4, ..]."""
        n = r1 - r0
        f = self.f[: n * kp].view(n, kp)
        real = max(0, min(r1, w.shape[0]) - r0)
        if real < n or k < kp:
            f.zero_()
        if real:
            f[:real, :k].copy_(w[r0 : r0 + real])
        self._tile(out, f)

    def _tile(self, out: torch.Tensor, f: torch.Tensor) -> None:
        """f [R, K] fp32 (overwritten) -> its tiles in out uint8 [R / 4, tile bytes]: `_tile_into`, in place."""
        r, k = f.shape
        fmt, g = self.fmt, self.group or k
        scales: list[torch.Tensor] = []
        if fmt == "bf16":
            data = self.q[: r * k].view(r, k)
            data.copy_(f)
        elif fmt == "int8":
            wg = f.view(r, k // g, g)
            # max |w| without an |w| temporary (the abs of the extremes also turns -0.0 into +0.0, as abs does)
            scale = torch.maximum(wg.amax(dim=2).abs(), wg.amin(dim=2).abs()) / 127.0
            inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
            wg.mul_(inv[:, :, None]).round_().clamp_(-127, 127)
            data = self.q[: r * k].view(r, k)
            data.copy_(f)
            scales = [scale]
        else:
            wg = f.view(r, k // g, g)
            lo, hi = wg.amin(dim=2).clamp(max=0), wg.amax(dim=2).clamp(min=0)
            scale = ((hi - lo) / 15.0).to(torch.bfloat16)
            s32 = scale.float()
            inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
            z = torch.round(-lo * inv).clamp_(0, 15)
            wg.mul_(inv[:, :, None]).round_().add_(z[:, :, None]).clamp_(0, 15)
            q = f.view(r, k // 128, 4, 32)
            # 16-bit word j of each 128 columns = q[32 * 0 + j] | q[32 + j] << 4 | ..., summed exactly in fp32
            words = self.words[: r * k // 4].view(r, k // 128, 32)
            torch.add(q[:, :, 2], q[:, :, 3], alpha=16, out=words)
            torch.add(q[:, :, 1], words, alpha=16, out=words)
            torch.add(q[:, :, 0], words, alpha=16, out=words)
            w32 = self.words32[: r * k // 4]
            w32.copy_(words.view(-1))
            data = self.words16[: r * k // 4].view(r, k // 4)
            data.view(-1).copy_(w32)  # int32 -> int16 keeps the low 16 bits: the word's bit pattern
            scales = [scale, z.to(torch.uint8)]
        _write_tiles(out, data.view(torch.uint8), scales, fmt, self.group, k)


def dequantize_tiles(tiles: torch.Tensor, fmt: str, group: int, k: int) -> torch.Tensor:
    """tiles uint8 [n, tile bytes] of a matrix with k (padded) columns -> float32 rows [4 n, k], tile row order.
    Pure torch on any device (a GPU can unpack fetched tiles with it): the reference for the kernel's reading."""
    n = tiles.shape[0]
    hb = _header_bytes(fmt, group, k)
    rows = tile_rows(fmt, tiles[:, hb:])
    if fmt in BLOCK_FORMATS:
        return blocks.dequantize_rows(fmt, tiles[:, :hb], rows, k)
    if fmt == "bf16":
        return rows.contiguous().view(torch.bfloat16).float()
    ng = k // group if group else 1
    g = group or k
    if fmt == "int8":
        scale = tiles[:, : ROWS * ng * 4].contiguous().view(torch.float32).reshape(n * ROWS, ng)
        q = rows.contiguous().view(torch.int8).float()
        return (q.view(-1, ng, g) * scale[:, :, None]).view(n * ROWS, k)
    scale = tiles[:, : ROWS * ng * 2].contiguous().view(torch.bfloat16).float().reshape(n * ROWS, ng)
    z = tiles[:, ROWS * ng * 2 : ROWS * ng * 3].float().reshape(n * ROWS, ng)
    words = rows.contiguous().view(torch.int16).reshape(n * ROWS, k // 128, 1, 32)
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int16, device=tiles.device).view(1, 1, 4, 1)
    q = (words >> shifts) & 15  # [.., nibble n, word j]
    q = q.reshape(n * ROWS, ng, g).float()
    return ((q - z[:, :, None]) * scale[:, :, None]).reshape(n * ROWS, k)


def dequantize(packed: PackedExperts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights the packed layer really holds, as float32 gate, up [E, I, H] and down [E, H, I]."""
    p = packed
    hp, ip, h, i = p.hidden_pad, p.inter_pad, p.hidden, p.intermediate
    gate, up, down = [], [], []
    (gf, gg), (df, dg) = matrix_formats(p.fmt, p.group)
    for e in range(p.num_experts):
        gu = dequantize_tiles(p.gate_up[e], gf, gg, hp).view(ip // 2, 2, 2, hp)
        gate.append(gu[:, 0].reshape(ip, hp)[:i, :h])
        up.append(gu[:, 1].reshape(ip, hp)[:i, :h])
        down.append(dequantize_tiles(p.down[e], df, dg, ip)[:h, :i])
    return torch.stack(gate), torch.stack(up), torch.stack(down)


def write_block_expert(out: PackedExperts, e: int, gate, up, down) -> None:
    """Expert e of a block-format layer from its matrices' (row bytes, fields) (cadenza.kernels.blocks.from_gguf /
    from_hf_mxfp4; columns already padded): gate, up of I rows, down of H rows; their bits moved into tiles.
    Experts e, e + 1, ... when the matrices hold several experts' rows one after another (whole large copies:
    a GGUF's 128 small experts a layer convert at memory speed, not at Python's per-call pace)."""
    (gf, _), (df, _) = matrix_formats(out.fmt, out.group)
    hp, ip = out.hidden_pad, out.inter_pad
    n = down[0].shape[0] // out.hidden
    g_rows, g_fields = blocks.pad_rows(*gate, ip, n)
    u_rows, u_fields = blocks.pad_rows(*up, ip, n)

    def pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # tile j: gate rows 2j, 2j + 1, up rows 2j, 2j + 1
        return torch.stack((a.view(n * ip // 2, 2, -1), b.view(n * ip // 2, 2, -1)), dim=1).reshape(2 * n * ip, -1)

    fields = [pairs(a, b) for a, b in zip(g_fields, u_fields, strict=True)]
    _write_tiles(out.gate_up[e : e + n].flatten(0, 1), pairs(g_rows, u_rows), fields, gf, 0, hp)
    d_rows, d_fields = blocks.pad_rows(*down, hp, n)
    _write_tiles(out.down[e : e + n].flatten(0, 1), d_rows.contiguous(), d_fields, df, 0, ip)
