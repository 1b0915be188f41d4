"""Dense linear layers whose weight stays in a GGUF file's blocks (Q4_0, Q4_K, Q5_K, Q6_K, Q8_0) on the GPU, as tiles
of the routed experts' layout (cadenza.kernels.layout): a Q4_K_M file's attention weights take ~0.6 bytes a weight
there instead of bf16's 2, which leaves the GPU budget to routed experts. Own Triton launch because PyTorch has no
product over these blocks; the dot products are the experts' (gpu_moe_triton._dot_tiles).

A few tokens (decode) multiply the tiles directly, one program per token, block of tiles and split of K: an
attention projection has few rows (Mixtral's k_proj: 64 programs of 16 rows), too few programs to keep HBM busy, so
K is split until a launch has PROGRAMS of them or every split is one loop step, and the splits' fp32 partial sums
are added after (a fixed order).
More tokens dequantize the weight into a bf16 scratch (the experts' dequantize kernel) and use a matmul. The
weights are the exact dequantized values of the file (the kernels compute code * scale - min in fp32), so a layer
equals the dequantize-then-matmul reference up to summation order.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from cadenza.kernels import blocks
from cadenza.kernels.gpu_fused import sum_middle
from cadenza.kernels.gpu_moe import _FMT_CODES, _step_cols, available
from cadenza.kernels.gpu_moe_triton import _INTERPRET, _dequant_kernel, _dot_tiles, _round_bf16
from cadenza.kernels.layout import PAD, ROWS, _header_bytes, _tile_bytes, _write_tiles, dequantize_tiles
from cadenza.kernels.triton_compat import tl, triton

# GGUF types kept as tiles for a dense weight (MXFP4 is an experts' type in the files cadenza reads)
KEPT = {"Q4_0": "q4_0", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k", "Q8_0": "q8_0"}
DECODE_MAX_TOKENS = 8  # up to this many rows of x, the tiles are multiplied directly
# programs a decode launch aims for (K split to reach it). On the H200 (benchmarks/results/2026-12-04-s20,
# linear-split.txt) a Mixtral layer's four projections took 96 us unsplit and 51-54 us from 512 programs up (8192 the
# fastest by 0.1 us: every split of one loop step); CADENZA_LINEAR_PROGRAMS=N tries another (1: never split)
PROGRAMS = int(os.environ.get("CADENZA_LINEAR_PROGRAMS", "8192"))
BLOCK_TILES = 4  # tiles (4 rows each) per decode program


def k_splits(tiles: int, steps: int, tokens: int, programs: int = PROGRAMS) -> tuple[int, int]:
    """(splits of K, loop steps each) for a decode launch over `tiles` tiles and `steps` loop steps of K: the
    fewest splits that give `programs` programs, each split at least one step, none empty."""
    blocks = -(-tiles // BLOCK_TILES) * tokens
    want = max(1, min(steps, -(-programs // blocks)))
    each = -(-steps // want)
    return -(-steps // each), each


@triton.jit
def _linear_part(
    xr, y, w, tbw, hbw, NG, N, K, Kp, T, NTOT, OFF, tok, pid, split, EACH,
    FMT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, EMU_RNE: tl.constexpr,
):  # fmt: skip
    """y[split, tok, OFF + o] = <row o of the tiles, x[tok]> over split's EACH loop steps of K, for the 4 BT rows of
    tile block `pid`, stored in y's dtype (the output itself where K is not split)."""
    t = pid * BT + tl.arange(0, BT)
    tmask = t < (N + 3) // 4
    it0 = split * EACH
    n_iter = tl.minimum(EACH, tl.cdiv(Kp, BK) - it0)
    acc = _dot_tiles(w, tbw, hbw, t, tmask, xr, K, Kp, n_iter, it0, NG, FMT, 0, BT, BK, False)
    if EMU_RNE:  # bf16 output under the interpreter, which truncates: round to nearest even here (GPUs do)
        acc = _round_bf16(acc)
    o = 4 * t[:, None] + tl.arange(0, 4)[None, :]
    tl.store(y + (split * T + tok).to(tl.int64) * NTOT + OFF + o, acc.to(y.dtype.element_ty), mask=o < N)


@triton.jit
def _linear_kernel(
    x, xstride, y, T, NTOT, K, Kp, EACH,
    w0, tbw0, hbw0, ng0, n0, p0,
    w1, tbw1, hbw1, ng1, n1, p1,
    w2, tbw2, hbw2, ng2, n2,
    FMT0: tl.constexpr, FMT1: tl.constexpr, FMT2: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    EMU_RNE: tl.constexpr,
):  # fmt: skip
    """Up to three layers that read the same x (an attention's q, k and v) in one launch: tile blocks [0, p0) are
    layer 0's, the next p1 layer 1's, the rest layer 2's; their outputs side by side in y [splits, T, NTOT]."""
    tok = tl.program_id(0)
    pid = tl.program_id(1)
    split = tl.program_id(2)
    xr = x + tok.to(tl.int64) * xstride
    if pid < p0:
        _linear_part(xr, y, w0, tbw0, hbw0, ng0, n0, K, Kp, T, NTOT, 0, tok, pid, split, EACH, FMT0, BT, BK,
                     EMU_RNE)  # fmt: skip
    elif pid < p0 + p1:
        _linear_part(xr, y, w1, tbw1, hbw1, ng1, n1, K, Kp, T, NTOT, n0, tok, pid - p0, split, EACH, FMT1, BT, BK,
                     EMU_RNE)  # fmt: skip
    else:
        _linear_part(xr, y, w2, tbw2, hbw2, ng2, n2, K, Kp, T, NTOT, n0 + n1, tok, pid - p0 - p1, split, EACH, FMT2,
                     BT, BK, EMU_RNE)  # fmt: skip


class BlockLinear(nn.Module):
    """y = x W^T (+ bias) with W [out_features, in_features] kept as `fmt` tiles (uint8 [ceil(out / 4), tile
    bytes], a buffer: it moves with .to(device)). Built by `from_gguf`."""

    def __init__(self, fmt: str, in_features: int, out_features: int, tiles: torch.Tensor, bias=None):
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        self.kp = -(-in_features // PAD) * PAD
        self.group = blocks.BLOCK_FORMATS[fmt].group
        want = (-(-out_features // ROWS), _tile_bytes(fmt, self.group, self.kp))
        if tuple(tiles.shape) != want or tiles.dtype != torch.uint8:
            raise ValueError(f"{fmt} tiles of a [{out_features}, {in_features}] weight are uint8 {want}, got "
                             f"{tiles.dtype} {tuple(tiles.shape)}")  # fmt: skip
        self.register_buffer("tiles", tiles.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # the launches' geometry, fixed by the shape (computed once, not at every decode step)
        self.header = _header_bytes(fmt, self.group, self.kp)
        self.step_cols, self.dequant_cols = _step_cols(self.kp, 512), min(1024, _step_cols(self.kp, 1024))

    @classmethod
    def from_gguf(cls, gguf_type: str, raw, out_features: int, in_features: int, bias=None) -> BlockLinear:
        """A weight's GGUF blocks (numpy uint8 [out_features, bytes a row]) -> the layer, on the CPU (moved by
        repack.cpp where no row or column needs padding, else by numpy: the same bytes)."""
        from cadenza.kernels import repack
        from cadenza.moe.cpu import physical_cores

        fmt = KEPT[gguf_type]
        kp = -(-in_features // PAD) * PAD
        group = blocks.BLOCK_FORMATS[fmt].group
        tiles = torch.empty(-(-out_features // ROWS), _tile_bytes(fmt, group, kp), dtype=torch.uint8)
        if out_features % ROWS == 0 and repack.moves(gguf_type, in_features):
            repack.repack_rows(gguf_type, raw, in_features, tiles, ROWS, 0, physical_cores())
        else:
            rows, fields = blocks.from_gguf(gguf_type, raw, in_features)
            rows, fields = blocks.pad_rows(rows, fields, tiles.shape[0] * ROWS)
            _write_tiles(tiles, rows, fields, fmt, group, kp)
        return cls(fmt, in_features, out_features, tiles, bias)

    @staticmethod
    def nbytes_of(gguf_type: str, out_features: int, in_features: int) -> int:
        """Bytes the layer's tiles take (for planning, from the shape alone)."""
        fmt = KEPT[gguf_type]
        kp = -(-in_features // PAD) * PAD
        return -(-out_features // ROWS) * _tile_bytes(fmt, blocks.BLOCK_FORMATS[fmt].group, kp)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] in fp32 (the reference; computed on each access)."""
        w = dequantize_tiles(self.tiles, self.fmt, self.group, self.kp)
        return w[: self.out_features, : self.in_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not available(x.device):
            y = (x2.float() @ self.weight.to(x.device).T).to(x.dtype)
        elif x2.shape[0] <= DECODE_MAX_TOKENS:
            y = self._decode(x2, x.dtype)
        else:
            y = x2 @ self._dequantized(x.dtype).T
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _decode(self, x: torch.Tensor, dtype=torch.float32, programs: int = PROGRAMS) -> torch.Tensor:
        """x [T, in] (T <= DECODE_MAX_TOKENS) -> [T, out] in `dtype`: one launch, or two where K is split."""
        return decode_together((self,), x, dtype, programs)

    @staticmethod
    def project_together(layers: tuple, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The outputs ([..., out] each, x's dtype) of up to three layers that read the same x [..., in] (an
        attention's q, k and v), in one decode launch where all are bias-free BlockLinears of one in_features on a
        device the kernels run on and x has a few tokens; None otherwise (the caller runs them one by one)."""
        first = layers[0]
        if not (
            1 <= len(layers) <= 3
            and all(isinstance(layer, BlockLinear) and layer.bias is None for layer in layers)
            and all(layer.in_features == first.in_features and layer.tiles.device == x.device for layer in layers)
            and available(x.device)
            and x.shape[-1] == first.in_features
        ):
            return None
        x2 = x.reshape(-1, x.shape[-1])
        if not 0 < x2.shape[0] <= DECODE_MAX_TOKENS:
            return None
        out = decode_together(tuple(layers), x2, x.dtype).view(*x.shape[:-1], -1)
        return tuple(out.split([layer.out_features for layer in layers], dim=-1))

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype` on the tiles' device (the experts' dequantize kernel): a scratch the
        size of one bf16 matrix, only while a prefill chunk runs through this layer."""
        n, k, kp = self.out_features, self.in_features, self.kp
        out = torch.empty(n, k, dtype=dtype, device=self.tiles.device)
        bk = self.dequant_cols
        grid = (triton.cdiv(self.tiles.shape[0], 4), triton.cdiv(kp, bk))
        emu = _INTERPRET and dtype == torch.bfloat16  # the interpreter's bf16 stores truncate: rounded as a GPU does
        _dequant_kernel[grid](self.tiles, self.tiles.shape[1], self.header,
                              self.tiles.shape[0], kp, kp // self.group, out, out, out.stride(0), n, k, 0, 0, GU=False,
                              FMT=_FMT_CODES[self.fmt], GROUP=self.group, EMU_RNE=emu, BT=4, BK=bk)  # fmt: skip
        return out


def decode_together(
    layers: tuple[BlockLinear, ...], x: torch.Tensor, dtype=torch.float32, programs: int = PROGRAMS
) -> torch.Tensor:
    """x [T, in] (T <= DECODE_MAX_TOKENS) through one to three BlockLinears of the same in_features -> their
    outputs side by side, [T, sum of out_features] in `dtype`: one launch for all, and one more where K is split."""
    x = x.contiguous()
    (t, k), first = x.shape, layers[0]
    kp, bk = first.kp, first.step_cols
    tiles = [layer.tiles.shape[0] for layer in layers]
    blocks_ = [triton.cdiv(n, BLOCK_TILES) for n in tiles]
    splits, each = k_splits(sum(blocks_) * BLOCK_TILES, triton.cdiv(kp, bk), t, programs)
    ntot = sum(layer.out_features for layer in layers)
    if splits == 1:  # the products straight into the output
        y = torch.empty(1, t, ntot, dtype=dtype, device=x.device)
    else:
        y = torch.empty(splits, t, ntot, dtype=torch.float32, device=x.device)
    emu = _INTERPRET and dtype == torch.bfloat16
    parts = list(layers) + [first] * (3 - len(layers))  # unused slots: never reached (their blocks count 0)
    args = []
    for i, layer in enumerate(parts):
        args += [layer.tiles, layer.tiles.shape[1] // 4, layer.header // 4, kp // layer.group, layer.out_features]
        if i < 2:
            args.append(blocks_[i] if i < len(layers) else 0)
    grid = (t, sum(blocks_), splits)
    _linear_kernel[grid](x, x.stride(0), y, t, ntot, k, kp, each, *args, FMT0=_FMT_CODES[parts[0].fmt],
                         FMT1=_FMT_CODES[parts[1].fmt], FMT2=_FMT_CODES[parts[2].fmt], BT=BLOCK_TILES, BK=bk,
                         EMU_RNE=emu and splits == 1)  # fmt: skip
    if splits == 1:
        return y[0]
    return sum_middle(y.view(1, splits, t * ntot), dtype).view(t, ntot)  # the sum and the cast: one launch
