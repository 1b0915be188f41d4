"""Float experts quantized into the kernels' tiles (bf16, int8, int4) by pack.cpp, in one pass over each matrix on
every core: layout.pack_layer's torch ops stay the reference (the same bytes, tested) and the path for source dtypes
pack.cpp does not read or where the library cannot be built."""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Sequence

import torch

from cadenza.kernels import native

FORMATS = {"bf16": 0, "int8": 1, "int4": 2}  # layout format -> pack.cpp's code
SOURCES = {torch.float32: 0, torch.bfloat16: 1}  # source dtypes it reads


def _build() -> ctypes.CDLL:
    from cadenza.kernels.cpu_moe import _cpu_model, cpu_flags

    # this machine's vector instructions (a build is cached per CPU model and flags); no contraction into FMAs,
    # which would change roundings
    lib = native.build(
        "pack.cpp", ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"], ["-fopenmp"],
        key=f"{platform.machine()} {_cpu_model()} {' '.join(sorted(cpu_flags()))}",
        notice="compiling cadenza's expert quantizer (first use, ~10 s; cached for the next runs)...",
    )  # fmt: skip
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.cadenza_pack_rows.restype = i32
    lib.cadenza_pack_rows.argtypes = [i32, i32, i32, ptr, i64, i64, i64, i64, i64, ptr, i64, i64, i32, i32, i32]
    return lib


_library = native.Library(_build)


def takes(fmt: str, matrices: Sequence[torch.Tensor]) -> bool:
    """Whether `pack_into` packs these per-expert matrices (CPU tensors of a dtype it reads, rows of contiguous
    columns) in this format, the library built."""
    return (
        fmt in FORMATS
        and all(m.device.type == "cpu" and m.dtype in SOURCES and m.dim() == 2 and m.stride(1) == 1 for m in matrices)
        and _library.get() is not None
    )


def pack_into(out, gate: Sequence[torch.Tensor], up: Sequence[torch.Tensor], down: Sequence[torch.Tensor], threads):
    """Expert x's gate, up [I, H] and down [H, I] (`takes` said yes) into out (a layout.PackedExperts of a format
    in FORMATS, its tiles allocated): layout.pack_layer's bytes."""
    lib = _library.get()
    fmt, group = FORMATS[out.fmt], out.group
    hp, ip = out.hidden_pad, out.inter_pad
    for x in range(out.num_experts):
        jobs = (
            (gate[x], out.gate_up[x], out.gu_header, ip, hp, 2, 0),
            (up[x], out.gate_up[x], out.gu_header, ip, hp, 2, 2),
            (down[x], out.down[x], out.dn_header, hp, ip, 4, 0),
        )
        for w, tiles, hb, padded_rows, kp, per, slot0 in jobs:
            rc = lib.cadenza_pack_rows(
                fmt, group, SOURCES[w.dtype], w.data_ptr(), w.stride(0), w.shape[0], w.shape[1], padded_rows, kp,
                tiles.data_ptr(), tiles.shape[1], hb, per, slot0, max(1, threads),
            )  # fmt: skip
            if rc != 0:
                raise ValueError(f"pack.cpp does not take a {tuple(w.shape)} {w.dtype} matrix into {out.fmt} tiles")
