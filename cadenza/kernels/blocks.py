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
| q6_k   | q - 32 (6-bit) | 16    | d f16 per 256; sc i8 per 16                   | d sc, 0                    | 0.820 |
| q8_0   | q (byte)       | 32    | d f16 per 32                                  | d, 0                       | 1.0625|
| q5_k   | q 0..31 (5-bit)| 32    | d, dmin f16 per 256; sc, m u8 per 32          | d sc, dmin m               | 0.703 |

(GGUF files: Q4_0 0.5625, Q4_K 0.5625, MXFP4 0.531, Q6_K 0.820, Q5_K 0.6875 bytes a weight.) "nib" codes sit in
int4's word layout (per 128 columns, 16-bit word j holds column 32 n + j in nibble n), "byte" codes in int8's (one
int8 per column); code_value is the code itself, or for mxfp4 the e2m1 value
of the nibble. "6-bit" codes (q6_k, q = 0..63, value q - 32) take 96 bytes per 128 columns of a row: the low 4
bits in int4's word layout (64 bytes), then the high 2 bits (32 bytes: byte j holds those of columns j, 32 + j,
64 + j, 96 + j in bits 2 n, 2 n + 1: exactly GGUF's qh bytes of that half super-block, so repacking moves them
unchanged). A kernel builds a column's 6-bit q from one shift of each part and one bit select (the nibble's 4
bits, the high part's 2 at bits 4, 5), then looks q - 32 up in a 64-entry table (vpermt2w) or takes
(2^23 + q) - (2^23 + 32) in fp32; nibble n of 32 words is columns 32 n .. 32 n + 31 in order, as in the nib
formats, so both read the same staged activations. Every product is exact in fp32 (d sc has at most 17
significant bits), so q4_0, q4_k and q5_k weights are the one rounding of q s - m, and q6_k, q8_0 and mxfp4 weights
are exact: what gguf-py's dequantizers compute. "5-bit" codes (q5_k, q = 0..31) take 80 bytes per 128 columns
of a row (0.6875 bytes a weight, as the file, plus the header's padding): the low 4 bits in int4's word layout (64
bytes), then the 5th bits as 4 little-endian 32-bit words (16 bytes): word n's bit j is column 32 n + j's, so a
kernel takes nibble n of the 32 words and word n as a 32-lane mask (bit j: lane j) and looks q up in a 32-entry
table (vpermw's 5-bit index), or selects bit j of the broadcast word. A tile's chunks hold the same piece of each
of its 4 rows one after another (cadenza.kernels.layout): 64 bytes each, or per 128 columns the 4 rows' 64 bytes
of nibbles, then their high bits: q6_k's 32 bytes each (384 bytes a chunk), q5_k's 16 (320 bytes a chunk). A
header holds each field for the tile's 4 rows in turn ([field][row][values]), padded to 64 bytes. Rows and columns
padded past the matrix hold zero codes and zero fields: weight 0.
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
    codes: str  # "nib" (4-bit codes, int4's word layout), "q6" (6-bit: nibbles, then 2-bit high parts), "q5"
    # (5-bit: nibbles, then the 5th bits as 32-bit words) or "byte" (int8 codes)
    group: int  # columns per (scale, min)
    fields: tuple[tuple[str, torch.dtype, int], ...]  # (name, dtype, columns per value), header order
    gguf: str  # the GGUF tensor type it keeps
    align: int  # columns the matrix must be a multiple of (its blocks)


# Q4_K's and Q5_K's header: d, dmin per super-block, 6-bit scale and min codes (a byte each) per 32
K_FIELDS = (
    ("d", torch.float16, SUPER),
    ("dmin", torch.float16, SUPER),
    ("sc", torch.uint8, 32),
    ("m", torch.uint8, 32),
)
BLOCK_FORMATS = {
    "q4_0": BlockFormat("q4_0", "nib", 32, (("d", torch.float16, 32),), "Q4_0", 32),
    "q4_k": BlockFormat("q4_k", "nib", 32, K_FIELDS, "Q4_K", SUPER),
    "mxfp4": BlockFormat("mxfp4", "nib", 32, (("e", torch.uint8, 32),), "MXFP4", 32),
    "q6_k": BlockFormat("q6_k", "q6", 16, (("d", torch.float16, SUPER), ("sc", torch.int8, 16)), "Q6_K", SUPER),
    "q8_0": BlockFormat("q8_0", "byte", 32, (("d", torch.float16, 32),), "Q8_0", 32),
    "q5_k": BlockFormat("q5_k", "q5", 32, K_FIELDS, "Q5_K", SUPER),
}
BY_GGUF = {f.gguf: f.name for f in BLOCK_FORMATS.values()}


def header_row_bytes(fmt: str, k: int) -> int:
    """Header bytes one row of k columns needs (before the tile's padding to 64)."""
    spec = BLOCK_FORMATS[fmt]
    return sum(k // cols * torch.empty((), dtype=dt).element_size() for _, dt, cols in spec.fields)


def code_row_bytes(fmt: str, k: int) -> int:
    codes = BLOCK_FORMATS[fmt].codes
    return {"nib": k // 2, "q6": 3 * k // 4, "q5": 5 * k // 8}.get(codes, k)


def chunk_pieces(fmt: str) -> tuple[int, ...]:
    """Bytes of each piece of a row that a tile's chunk holds for its 4 rows in turn: q6_k's 128 columns are a
    64-byte piece of nibbles and a 32-byte piece of high bits (a chunk: 4 x 64, then 4 x 32), q5_k's a 64-byte and
    a 16-byte piece (4 x 64, then 4 x 16); every other format's chunk is one 64-byte piece of each row."""
    codes = BLOCK_FORMATS[fmt].codes if fmt in BLOCK_FORMATS else ""
    return {"q6": (64, 32), "q5": (64, 16)}.get(codes, (64,))


# --- GGUF blocks -> (codes, fields) ------------------------------------------------------------------------------


def _f16(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)).clone()


def _nibbles_halves(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> values [..., 2 n]: the n low nibbles, then the n high ones (ggml's 32-value layout)."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def from_gguf(gguf_type: str, raw: np.ndarray, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One matrix's GGUF blocks, raw uint8 [R, bytes per row] of rows of k columns -> (row bytes [R, code bytes of
    k rounded up to 128 columns] in the kernels' order, the header fields [R, n] in the format's order, zero past
    k). The same bits, rearranged: mostly byte moves, so a 26 GB file repacks in seconds on a few cores."""
    fmt = BY_GGUF.get(gguf_type)
    if fmt is None:
        raise ValueError(f"no block format keeps GGUF {gguf_type}")
    r, kp = raw.shape[0], _round_up(k, 128)
    if gguf_type == "Q6_K":
        return _q6_k(raw, k)
    if gguf_type == "Q5_K":  # d, dmin, 12 bytes of scales and mins as Q4_K's, 32 bytes of high bits, 128 of nibbles
        b = raw.reshape(r, k // SUPER, 176)
        d, dmin = _f16(b[..., 0:2]).reshape(r, -1), _f16(b[..., 2:4]).reshape(r, -1)
        sc, m = _q4_k_scales(b[..., 4:16])
        ns = k // SUPER
        out = np.empty((r, ns, 2, 80), np.uint8)
        # nibbles as Q4_K's (per 128 columns two 32-byte runs: columns j, 32 + j; 64 + j, 96 + j)
        qs = b[..., 48:].reshape(r, ns, 2, 2, 32)
        out[..., :64] = _words(qs[..., 0, :], qs[..., 1, :])
        # bit s of qh byte i: column 32 s + i of the super-block -> 32-bit word s, bit i (little-endian bytes)
        bits = (b[..., 16:48][:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1
        out[..., 64:] = np.packbits(bits, axis=-1, bitorder="little").reshape(r, ns, 2, 16)
        return torch.from_numpy(out.reshape(r, 5 * k // 8)), [d, dmin, sc, m]
    if gguf_type == "Q8_0":
        b = raw.reshape(r, k // 32, 34)
        codes = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).reshape(r, k))
        return _padded_rows(fmt, codes.view(torch.int8), [_f16(b[..., :2]).reshape(r, -1)], kp)
    if gguf_type == "Q4_K":
        b = raw.reshape(r, k // SUPER, 144)
        d, dmin = _f16(b[..., 0:2]).reshape(r, -1), _f16(b[..., 2:4]).reshape(r, -1)
        sc, m = _q4_k_scales(b[..., 4:16])
        # per 128 columns, two 32-byte chunks (sub-blocks 4p, 4p + 1 in the first's low and high nibbles, 4p + 2,
        # 4p + 3 in the second's): 16-bit word j = first[j] | second[j] << 8 holds columns j, 32 + j, 64 + j, 96 + j
        qs = b[..., 16:].reshape(r, k // 128, 2, 32)
        return torch.from_numpy(_words(qs[:, :, 0], qs[:, :, 1]).reshape(r, k // 2)), [d, dmin, sc, m]
    per = 18 if gguf_type == "Q4_0" else 17  # Q4_0: fp16 d, 16 bytes; MXFP4: e8m0 byte, 16 bytes
    b = raw.reshape(r, k // 32, per)
    head, qs = (b[..., :2], b[..., 2:]) if gguf_type == "Q4_0" else (b[..., :1], b[..., 1:])
    field = _f16(head).reshape(r, -1) if gguf_type == "Q4_0" else torch.from_numpy(head.reshape(r, -1).copy())
    if k % 128:
        codes = torch.from_numpy(_nibbles_halves(qs).reshape(r, k))
        return _padded_rows(fmt, codes, [field], kp)
    # block n of 4 holds value j (< 16) in qs_n[j]'s low nibble, j + 16 in its high one; word j needs value j of
    # blocks 0, 1 in its low byte and of blocks 2, 3 in its high byte
    q = qs.reshape(r, k // 128, 2, 2, 16)  # [.., byte of the word, block of the byte, j]
    lo = (q[..., 0, :] & 0x0F) | (q[..., 1, :] << 4)  # values j < 16
    hi = (q[..., 0, :] >> 4) | (q[..., 1, :] & 0xF0)  # values j + 16
    return torch.from_numpy(_words(np.concatenate((lo, hi), axis=-1), None).reshape(r, k // 2)), [field]


def _words(low: np.ndarray, high: np.ndarray | None) -> np.ndarray:
    """Bytes [.., 2, 32] (high None) or low and high bytes [.., 32] -> uint8 [.., 64]: 16-bit word j = low byte j
    | high byte j << 8, little-endian (as uint16 arithmetic: numpy's byte transposes are several times slower)."""
    if high is None:
        low, high = low[..., 0, :], low[..., 1, :]
    w = low.astype(np.uint16) | (high.astype(np.uint16) << 8)
    return w.astype("<u2", copy=False).view(np.uint8)


def _q4_k_scales(s: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes of 6-bit scales and mins per super-block [R, ns, 12] -> sc, m uint8 [R, 8 ns]."""
    r = s.shape[0]
    s = s.reshape(r, -1, 3, 4)
    lo, hi, mix = s[:, :, 0], s[:, :, 1], s[:, :, 2]
    sc = np.concatenate((lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)), axis=-1)
    m = np.concatenate((hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)), axis=-1)
    return torch.from_numpy(sc.reshape(r, -1).copy()), torch.from_numpy(m.reshape(r, -1).copy())


def _q6_k(raw: np.ndarray, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Q6_K's blocks (ql 128, qh 64, sc 16, d 2 bytes per 256) -> q6_k rows: per half super-block (128 columns),
    ql's 64 bytes hold value i (< 64) in byte i's low nibble and 64 + i in its high one, qh's 32 bytes the high 2
    bits of values j, 32 + j, 64 + j, 96 + j in byte j's bits 2 n: the nibbles become int4's words, qh stays."""
    r, ns = raw.shape[0], k // SUPER
    b = raw.reshape(r, ns, 210)
    out = np.empty((r, ns, 2, 96), np.uint8)
    # 8 bytes at a time: word j's low byte holds values j, 32 + j (low nibbles of ql[j], ql[32 + j]), its high byte
    # 64 + j, 96 + j (their high nibbles)
    ql = np.ascontiguousarray(b[..., :128]).view(np.uint64).reshape(r, ns, 2, 2, 4)
    first, second, m = ql[..., 0, :], ql[..., 1, :], np.uint64(0x0F0F0F0F0F0F0F0F)
    out[..., 0:64:2] = ((first & m) | ((second & m) << np.uint64(4))).view(np.uint8).reshape(r, ns, 2, 32)
    out[..., 1:64:2] = (((first >> np.uint64(4)) & m) | (second & ~m)).view(np.uint8).reshape(r, ns, 2, 32)
    out[..., 64:] = b[..., 128:192].reshape(r, ns, 2, 32)
    sc = torch.from_numpy(b[..., 192:208].reshape(r, -1).copy().view(np.int8))
    return torch.from_numpy(out.reshape(r, 3 * k // 4)), [_f16(b[..., 208:210]).reshape(r, ns), sc]


def from_hf_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """gpt-oss's MXFP4 (blocks uint8 [R, G, 16], byte j: values 2 j (low nibble), 2 j + 1; scales uint8 [R, G]) ->
    mxfp4 row bytes and fields, as `from_gguf`."""
    r, g = scales.shape
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(r, g * 32)
    return _padded_rows("mxfp4", codes, [scales.contiguous()], _round_up(32 * g, 128))


def _padded_rows(fmt: str, codes: torch.Tensor, fields: list[torch.Tensor], kp: int):
    """Codes [R, k] and fields -> row bytes of kp columns and fields of kp columns (zeros past k)."""
    r, k = codes.shape
    if k < kp:
        codes = torch.cat((codes, torch.zeros(r, kp - k, dtype=codes.dtype)), dim=1)
        cols = [c for _, _, c in BLOCK_FORMATS[fmt].fields]
        fields = [
            torch.cat((f, torch.zeros(r, (kp - k) // c, dtype=f.dtype)), dim=1)
            for f, c in zip(fields, cols, strict=True)
        ]
    return row_data(fmt, codes), fields


def pad_rows(rows: torch.Tensor, fields: list[torch.Tensor], n: int, matrices: int = 1):
    """Row bytes and fields of `matrices` matrices stacked along the rows, each padded to n rows with zeros
    (weight 0)."""
    r = rows.shape[0] // matrices
    if r == n:
        return rows, fields

    def pad(t: torch.Tensor) -> torch.Tensor:
        t = t.view(matrices, r, *t.shape[1:])
        return torch.cat((t, torch.zeros(matrices, n - r, *t.shape[2:], dtype=t.dtype)), dim=1).flatten(0, 1)

    return pad(rows), [pad(f) for f in fields]


def row_data(fmt: str, codes: torch.Tensor) -> torch.Tensor:
    """Codes [R, K] -> row bytes [R, code_row_bytes] in the kernels' column order."""
    r, k = codes.shape
    kind = BLOCK_FORMATS[fmt].codes
    if kind not in ("nib", "q6", "q5"):
        return codes.contiguous().view(torch.uint8)
    q = codes.to(torch.int32) + (32 if kind == "q6" else 0)  # q6: codes q - 32 -> q
    n = q.view(r, k // 128, 4, 32)
    words = (n[:, :, 0] & 15) | ((n[:, :, 1] & 15) << 4) | ((n[:, :, 2] & 15) << 8) | ((n[:, :, 3] & 15) << 12)
    low = words.to(torch.int16).view(torch.uint8).reshape(r, k // 128, 64)
    if kind == "nib":
        return low.reshape(r, k // 2)
    if kind == "q5":  # word n's bit j: column 32 n + j's 5th bit, as 4 little-endian bytes of 8 bits
        h = (n >> 4).view(r, k // 128, 16, 8) << torch.arange(8, dtype=torch.int32, device=codes.device)
        return torch.cat((low, h.sum(-1).to(torch.uint8)), dim=2).reshape(r, 5 * k // 8)
    h = n >> 4
    high = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).to(torch.uint8)
    return torch.cat((low, high), dim=2).reshape(r, 3 * k // 4)


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
    if fmt == "q8_0":
        d = fields[0].float()
        return d, torch.zeros_like(d)
    if fmt == "mxfp4":
        e = fields[0].to(torch.int32)
        bits = torch.where(e > 0, e << 23, torch.full_like(e, 1 << 22))  # e8m0: 2^(e - 127), e = 0 a denormal
        s = bits.view(torch.float32)
        return s, torch.zeros_like(s)
    per = SUPER // spec.group  # groups per super-block
    d = fields[0].float().repeat_interleave(per, dim=1)
    if fmt in ("q4_k", "q5_k"):
        dmin = fields[1].float().repeat_interleave(per, dim=1)
        return d * fields[2].float(), dmin * fields[3].float()
    s = d * fields[1].float()
    return s, torch.zeros_like(s)


def code_values(fmt: str, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Row bytes [R, code_row_bytes] -> fp32 code values [R, k] (the nibble's e2m1 value for mxfp4)."""
    r, kind = rows.shape[0], BLOCK_FORMATS[fmt].codes
    if kind == "byte":
        return rows.contiguous().view(torch.int8).float()
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=rows.device).view(1, 1, 4, 1)
    if kind == "q6":  # per 128 columns: 64 bytes of nibbles (int4's words), 32 of high bit pairs
        parts = rows.contiguous().view(r, k // 128, 96)
        words = parts[:, :, :64].contiguous().view(torch.int16).reshape(r, k // 128, 1, 32).to(torch.int32)
        high = parts[:, :, 64:].to(torch.int32).reshape(r, k // 128, 1, 32)
        q = ((words >> shifts) & 15) | (((high >> (shifts // 2)) & 3) << 4)
        return (q - 32).reshape(r, k).float()
    if kind == "q5":  # per 128 columns: 64 bytes of nibbles, 16 of 5th bits (byte 4 n + m: columns 32 n + 8 m ..)
        parts = rows.contiguous().view(r, k // 128, 80)
        words = parts[:, :, :64].contiguous().view(torch.int16).reshape(r, k // 128, 1, 32).to(torch.int32)
        bit = torch.arange(8, dtype=torch.int32, device=rows.device)
        high = ((parts[:, :, 64:].to(torch.int32)[..., None] >> bit) & 1).reshape(r, k // 128, 4, 32)
        return (((words >> shifts) & 15) | (high << 4)).reshape(r, k).float()
    words = rows.contiguous().view(torch.int16).reshape(r, k // 128, 1, 32).to(torch.int32)
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
