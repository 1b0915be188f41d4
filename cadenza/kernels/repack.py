"""A GGUF file's expert rows (the block types the kernels keep) moved into the kernels' tiles by repack.cpp, in one
pass over the bytes on every core (numpy's passes in cadenza.kernels.blocks.from_gguf do the same at a fraction of
the speed: they stay the reference, and the path for rows that need padding, or where the library cannot be
built)."""

from __future__ import annotations

import ctypes
import platform

import numpy as np
import torch

from cadenza.kernels import blocks, native

TYPES = {"Q4_K": 0, "Q6_K": 1, "Q5_K": 2, "Q8_0": 3, "Q4_0": 4, "MXFP4": 5}  # GGUF type -> repack.cpp's code


def _build() -> ctypes.CDLL:
    lib = native.build(
        "repack.cpp", ["-O3", "-fopenmp"], ["-fopenmp"], key=platform.machine(),
        notice="compiling cadenza's GGUF block mover (first use, ~15 s; cached for the next runs)...",
    )  # fmt: skip
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.cadenza_repack_rows.restype = i32
    lib.cadenza_repack_rows.argtypes = [i32, ptr, i64, i64, i64, ptr, i64, i64, i64, i32, i32, i32]
    lib.cadenza_dequant_rows.restype = i32
    lib.cadenza_dequant_rows.argtypes = [i32, ptr, i64, i64, i64, ptr, i32]
    return lib


_library = native.Library(_build)


def moves(gguf_type: str, k: int) -> bool:
    """Whether `repack_rows` moves rows of this type and length (else: blocks.from_gguf and the tile writers)."""
    align = 256 if gguf_type.endswith("_K") else 128  # whole super-blocks; rows needing no padding to 128 columns
    return gguf_type in TYPES and k % align == 0 and _library.get() is not None


DEQUANTIZED = ("Q4_K", "Q6_K", "Q5_K", "Q8_0", "Q4_0")  # what `dequantize` takes


def dequantize(gguf_type: str, raw: np.ndarray, k: int, threads: int | None = None) -> torch.Tensor | None:
    """raw uint8 [..., bytes per row] of rows of k columns -> fp32 [..., k], equal to gguf-py's dequantize bit
    for bit (repack.cpp's comment says why), on `threads` cores (default: all physical ones); None for a type or
    length it does not take, or where the library cannot be built (gguf-py's then)."""
    align = 256 if gguf_type.endswith("_K") else 32
    if gguf_type not in DEQUANTIZED or k % align or raw.strides[-1] != 1:
        return None
    lib = _library.get()
    if lib is None:
        return None
    from cadenza.moe.cpu import physical_cores

    rows = np.ascontiguousarray(raw).reshape(-1, raw.shape[-1])
    out = torch.empty(*raw.shape[:-1], k, dtype=torch.float32)
    rc = lib.cadenza_dequant_rows(
        TYPES[gguf_type], rows.ctypes.data, rows.strides[0], rows.shape[0], k, out.data_ptr(),
        threads or physical_cores(),
    )  # fmt: skip
    return out if rc == 0 else None


def repack_layer(out, matrices, threads: int) -> None:
    """A layer's stacked gate, up and down blocks into `out` (a layout.PackedExperts of their formats, no padding):
    matrices = [(GGUF type, raw uint8 [E * rows, bytes a row], columns)] in that order. Gate rows go to tile slots
    0, 1 of the gate/up tiles, up rows to 2, 3 (layout.py's pairing), down rows to slots 0-3 of the down tiles."""
    for m, (gguf_type, raw, k) in enumerate(matrices):
        tiles = (out.gate_up if m < 2 else out.down).flatten(0, 1)
        per, slot0 = (2, 2 * m) if m < 2 else (4, 0)
        repack_rows(gguf_type, raw, k, tiles, per, slot0, threads)


def repack_rows(
    gguf_type: str, raw: np.ndarray, k: int, tiles: torch.Tensor, rows_per_tile: int, slot0: int, threads: int
) -> None:
    """raw uint8 [R, bytes per row] (rows of k columns, rows contiguous) -> rows of `tiles` (uint8 [T, tile bytes],
    contiguous, the tiles of one matrix format): source row r into tile r // rows_per_tile, slot slot0 + r %
    rows_per_tile, header and body as layout.py writes them."""
    lib = _library.get()
    fmt = blocks.BY_GGUF[gguf_type]
    field = blocks.ROWS * blocks.header_row_bytes(fmt, k)
    hb = (field + 63) // 64 * 64
    r = raw.shape[0]
    if not tiles.is_contiguous() or tiles.shape[0] * rows_per_tile < r or raw.strides[1] != 1:
        raise ValueError("repack_rows wants contiguous tiles enough for the rows, and rows of contiguous bytes")
    rc = lib.cadenza_repack_rows(
        TYPES[gguf_type], raw.ctypes.data, raw.strides[0], r, k, tiles.data_ptr(), tiles.shape[1], hb, field,
        rows_per_tile, slot0, threads,
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"repack.cpp does not move {gguf_type} rows of {k} columns")
