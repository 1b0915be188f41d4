"""Routed experts kept in their file's block formats (GGUF's Q4_0, Q4_K, Q6_K, MXFP4; gpt-oss's MXFP4), repacked
exactly into the kernels' tile layout (cadenza.kernels.layout): the same codes and the same scale fields, moved
into tiles, never rounded. Both kernels (cpu_moe.cpp, gpu_moe_triton.py) read these tiles; `dequantize_rows` is
the reference for their reading.

Every format computes a weight as  code_value * scale[g] - min[g]  per group g of its row:

| format | codes (layout) | group | header fields per row (in order)              | scale, min                 | B/w   |
| ------ | -------------- | ----- | --------------------------------------------- | -------------------------- | ----- |
| q4_0   | q 0..15 (nib)  | 32    | d f16 per 32                                  | d, 8 d                     | 0.5625|
| q4_k   | q 0..15 (nib)  | 32    | d, dmin f16 per 256; sc, m u8 per 32          | d sc, dmin m               | 0.578 |
| mxfp4  | e2m1 (nib)     | 32    | e u8 per 32                                   | 2^(e - 127), 0             | 0.531 |
| q6_k   | q - 32 (byte)  | 16    | d f16 per 256; sc i8 per 16                   | d sc, 0                    | 1.070 |

(GGUF files: Q4_0 0.5625, Q4_K 0.5625, MXFP4 0.531, Q6_K 0.820 bytes a weight.) "nib" codes sit in int4's word
layout (per 128 columns, 16-bit word j holds column 32 n + j in nibble n), "byte" codes in int8's (one int8 per
column); code_value is the code itself, or for mxfp4 the e2m1 value of the nibble. Every product is exact in fp32
(d sc has at most 17 significant bits), so q4_0 and q4_k weights are the one rounding of q s - m, and q6_k and
mxfp4 weights are exact: what gguf-py's dequantizers compute. A header holds each field for the tile's 4 rows in
turn ([field][row][values]), padded to 64 bytes. Rows and columns padded past the matrix hold zero codes and zero
fields: weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cadenza.models.mxfp4 import e2m1_table

ROWS = 4
SUPER = 256  # columns of a K-quant super-block


@dataclass(frozen=True)
class BlockFormat:
    name: str
    codes: str  # "nib" (4-bit codes, int4's word layout) or "byte" (int8 codes)
    group: int  # columns per (scale, min)
    fields: tuple[tuple[str, torch.dtype, int], ...]  # (name, dtype, columns per value), header order
    gguf: str  # the GGUF tensor type it keeps
    align: int  # columns the matrix must be a multiple of (its blocks)


BLOCK_FORMATS = {
    "q4_0": BlockFormat("q4_0", "nib", 32, (("d", torch.float16, 32),), "Q4_0", 32),
    "q4_k": BlockFormat(
        "q4_k",
        "nib",
        32,
        (("d", torch.float16, SUPER), ("dmin", torch.float16, SUPER), ("sc", torch.uint8, 32), ("m", torch.uint8, 32)),
        "Q4_K",
        SUPER,
    ),
    "mxfp4": BlockFormat("mxfp4", "nib", 32, (("e", torch.uint8, 32),), "MXFP4", 32),
    "q6_k": BlockFormat("q6_k", "byte", 16, (("d", torch.float16, SUPER), ("sc", torch.int8, 16)), "Q6_K", SUPER),
}
BY_GGUF = {f.gguf: f.name for f in BLOCK_FORMATS.values()}


def header_row_bytes(fmt: str, k: int) -> int:
    """Header bytes one row of k columns needs (before the tile's padding to 64)."""
    spec = BLOCK_FORMATS[fmt]
    return sum(k // cols * torch.empty((), dtype=dt).element_size() for _, dt, cols in spec.fields)


def code_row_bytes(fmt: str, k: int) -> int:
    return k // 2 if BLOCK_FORMATS[fmt].codes == "nib" else k


# --- GGUF blocks -> (codes, fields) ------------------------------------------------------------------------------


def _f16(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)).clone()


def _nibbles_halves(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> values [..., 2 n]: the n low nibbles, then the n high ones (ggml's 32-value layout)."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def from_gguf(gguf_type: str, raw: np.ndarray, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One matrix's GGUF blocks, raw uint8 [R, bytes per row] of rows of k columns -> (codes [R, k]: uint8 for nib
    formats, int8 for byte ones; the header fields [R, n] in the format's order). The same bits, rearranged."""
    r = raw.shape[0]
    if gguf_type in ("Q4_0", "MXFP4"):
        per = 18 if gguf_type == "Q4_0" else 17
        b = raw.reshape(r, k // 32, per)
        head, qs = (b[..., :2], b[..., 2:]) if gguf_type == "Q4_0" else (b[..., :1], b[..., 1:])
        codes = torch.from_numpy(_nibbles_halves(qs).reshape(r, k))
        field = (
            _f16(head).reshape(r, k // 32) if gguf_type == "Q4_0" else torch.from_numpy(head.reshape(r, k // 32).copy())
        )
        return codes, [field]
    ns = k // SUPER
    if gguf_type == "Q4_K":
        b = raw.reshape(r, ns, 144)
        d, dmin = _f16(b[..., 0:2]).reshape(r, ns), _f16(b[..., 2:4]).reshape(r, ns)
        s = b[..., 4:16].reshape(r, ns, 3, 4)
        lo, hi, mix = s[:, :, 0], s[:, :, 1], s[:, :, 2]
        sc = np.concatenate((lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)), axis=-1)
        m = np.concatenate((hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)), axis=-1)
        qs = b[..., 16:].reshape(r, ns, 4, 32)  # chunk j: sub-blocks 2j (low nibbles), 2j + 1 (high)
        codes = torch.from_numpy(_nibbles_halves(qs).reshape(r, k))
        return codes, [d, dmin, torch.from_numpy(sc.reshape(r, -1).copy()), torch.from_numpy(m.reshape(r, -1).copy())]
    if gguf_type == "Q6_K":
        b = raw.reshape(r, ns, 210)
        ql = b[..., :128].reshape(r, ns, 2, 64)  # half h: values 128 h + 64 s + i from nibble s of byte i
        qh = b[..., 128:192].reshape(r, ns, 2, 32)  # half h: values 128 h + 32 s + i from bits 2 s of byte i
        low = np.concatenate((ql & 0x0F, ql >> 4), axis=-1)  # [r, ns, 2, 128]
        high = np.concatenate([(qh >> (2 * s)) & 3 for s in range(4)], axis=-1)  # [r, ns, 2, 128]
        q = (low | (high << 4)).astype(np.int16) - 32
        sc = torch.from_numpy(b[..., 192:208].reshape(r, -1).copy().view(np.int8))
        d = _f16(b[..., 208:210]).reshape(r, ns)
        return torch.from_numpy(q.astype(np.int8).reshape(r, k)), [d, sc]
    raise ValueError(f"no block format keeps GGUF {gguf_type}")


def from_hf_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """gpt-oss's MXFP4 (blocks uint8 [R, G, 16], byte j: values 2 j (low nibble), 2 j + 1; scales uint8 [R, G]) ->
    mxfp4 codes [R, 32 G] and fields."""
    r, g = scales.shape
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(r, g * 32)
    return codes, [scales.contiguous()]


def pad_fields(fmt: str, codes: torch.Tensor, fields: list[torch.Tensor], rows: int, k: int):
    """Codes and fields of a matrix padded to `rows` x `k` columns with zeros (weight 0)."""
    r, c = codes.shape
    if (r, c) == (rows, k):
        return codes, fields
    out = torch.zeros(rows, k, dtype=codes.dtype)
    out[:r, :c] = codes
    padded = []
    for f, (_, dt, cols) in zip(fields, BLOCK_FORMATS[fmt].fields, strict=True):
        p = torch.zeros(rows, k // cols, dtype=dt)
        p[:r, : f.shape[1]] = f
        padded.append(p)
    return out, padded


def row_data(fmt: str, codes: torch.Tensor) -> torch.Tensor:
    """Codes [R, K] -> row bytes [R, code_row_bytes] in the kernels' column order."""
    r, k = codes.shape
    if BLOCK_FORMATS[fmt].codes == "byte":
        return codes.contiguous().view(torch.uint8)
    q = codes.to(torch.int32).view(r, k // 128, 4, 32)
    words = q[:, :, 0] | (q[:, :, 1] << 4) | (q[:, :, 2] << 8) | (q[:, :, 3] << 12)
    return words.to(torch.int16).reshape(r, k // 4).view(torch.uint8)


# --- reading tiles back (the reference) -----------------------------------------------------------------------------


def split_header(fmt: str, header: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Tile headers uint8 [n, >= header bytes] -> the fields, each [4 n, values per row]."""
    n, at, out = header.shape[0], 0, []
    for _, dt, cols in BLOCK_FORMATS[fmt].fields:
        size = torch.empty((), dtype=dt).element_size()
        nb = ROWS * (k // cols) * size
        out.append(header[:, at : at + nb].contiguous().view(dt).reshape(n * ROWS, k // cols))
        at += nb
    return out


def scales_and_mins(fmt: str, fields: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Header fields -> fp32 (scale, min) [R, groups]: what the kernels compute from them."""
    spec = BLOCK_FORMATS[fmt]
    if fmt == "q4_0":
        d = fields[0].float()
        return d, 8.0 * d
    if fmt == "mxfp4":
        e = fields[0].to(torch.int32)
        bits = torch.where(e > 0, e << 23, torch.full_like(e, 1 << 22))  # e8m0: 2^(e - 127), e = 0 a denormal
        s = bits.view(torch.float32)
        return s, torch.zeros_like(s)
    per = SUPER // spec.group  # groups per super-block
    d = fields[0].float().repeat_interleave(per, dim=1)
    if fmt == "q4_k":
        dmin = fields[1].float().repeat_interleave(per, dim=1)
        return d * fields[2].float(), dmin * fields[3].float()
    s = d * fields[1].float()
    return s, torch.zeros_like(s)


def code_values(fmt: str, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Row bytes [R, code_row_bytes] -> fp32 code values [R, k] (the nibble's e2m1 value for mxfp4)."""
    r = rows.shape[0]
    if BLOCK_FORMATS[fmt].codes == "byte":
        return rows.contiguous().view(torch.int8).float()
    words = rows.contiguous().view(torch.int16).reshape(r, k // 128, 1, 32).to(torch.int32)
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=rows.device).view(1, 1, 4, 1)
    q = ((words >> shifts) & 15).reshape(r, k)
    if fmt == "mxfp4":
        return e2m1_table(torch.float32, rows.device)[q.long()]
    return q.float()


def dequantize_rows(fmt: str, header: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """The tiles' weights [4 n, k] fp32 from their headers [n, header bytes] and rows [4 n, row bytes]."""
    spec = BLOCK_FORMATS[fmt]
    scale, mins = scales_and_mins(fmt, split_header(fmt, header, k))
    v = code_values(fmt, rows, k).view(rows.shape[0], k // spec.group, spec.group)
    return (v * scale[:, :, None] - mins[:, :, None]).reshape(rows.shape[0], k)
