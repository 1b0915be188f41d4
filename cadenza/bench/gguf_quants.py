"""ggml's Q8_0 and Q4_0 block formats, quantized with torch: the bytes llama.cpp reads, bit for bit.

A block is 32 consecutive weights of a row (rows run along the last dimension, the input features, as ggml stores
them) with one fp16 scale `d` in front:
- Q8_0 (34 bytes): d = max|x| / 127, q = round-half-away-from-zero(x / d) as int8; x ~ d * q.
- Q4_0 (18 bytes): d = m / -8 where m is the block's value of largest magnitude (sign kept, the first one on a
  tie), q = clamp(trunc(x / d + 8.5), 0, 15); byte j holds q[j] in its low nibble and q[j + 16] in its high one;
  x ~ d * (q - 8).
Both multiply by the float32 reciprocal of the float32 scale (not by the fp16-rounded one), as ggml's reference
quantizer and gguf-py's `gguf.quants` do; tests/bench/test_llama_cpp_peer.py checks the bytes against gguf-py's.

numpy (gguf.quants) takes minutes per GB; these run on all cores, a chunk of rows at a time, so the float32
temporaries stay near the cache and host memory holds the output, never a float32 copy of a whole tensor.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager

import torch

BLOCK = 32  # weights per block, both formats
BLOCK_BYTES = {"Q8_0": 2 + BLOCK, "Q4_0": 2 + BLOCK // 2}
_CHUNK_BLOCKS = 1 << 15  # 1 Mi weights (4 MB as float32) per task


def quantized_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    """Bytes of a tensor of `shape` in `qtype` (rows of the last dimension, a multiple of 32)."""
    n = 1
    for d in _byte_shape(shape, qtype):
        n *= d
    return n


def quantize(
    x: torch.Tensor, qtype: str, out: torch.Tensor | None = None, pool: Executor | None = None
) -> torch.Tensor:
    """`x` (..., K), K a multiple of 32, any float dtype -> uint8 (..., K // 32 * block bytes) in `qtype`.

    `out` (uint8, that shape, contiguous) receives the bytes when given, e.g. a slice of a larger tensor."""
    if out is None:
        out = torch.empty(_byte_shape(x.shape, qtype), dtype=torch.uint8)
    quantize_many([(x, out)], qtype, pool)
    return out


def quantize_many(pairs: list[tuple[torch.Tensor, torch.Tensor]], qtype: str, pool: Executor | None = None) -> None:
    """Quantizes each (source, out) pair as `quantize` does, all of them as one pool of chunks: a layer's small
    experts (Qwen3's are 1.5 M weights) still keep every thread busy.

    With a `pool`, each chunk runs on one of its threads; run it under `single_threaded_ops()` so every thread runs
    its torch ops on one core: no barrier per op, and a chunk's float32 temporaries stay in that core's cache.
    Without one, chunks run in turn on torch's own threads."""
    fn = {"Q8_0": _q8_0, "Q4_0": _q4_0}[qtype]
    width = BLOCK_BYTES[qtype]
    tasks = []
    for x, out in pairs:
        shape = _byte_shape(x.shape, qtype)
        if tuple(out.shape) != shape or out.dtype != torch.uint8 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous uint8 tensor of shape {shape}")
        blocks = x.reshape(-1, BLOCK)  # a view for contiguous sources (the synthetic pools' views are)
        dst = out.view(-1, width)
        tasks += [
            (blocks[i : i + _CHUNK_BLOCKS], dst[i : i + _CHUNK_BLOCKS])
            for i in range(0, blocks.shape[0], _CHUNK_BLOCKS)
        ]
    if pool is None:
        for src, dst in tasks:
            fn(src, dst)
    else:
        list(pool.map(lambda task: fn(*task), tasks))  # torch releases the GIL inside each op


def _byte_shape(shape: tuple[int, ...], qtype: str) -> tuple[int, ...]:
    if shape[-1] % BLOCK:
        raise ValueError(f"rows of {shape[-1]} weights do not split into blocks of {BLOCK}")
    return (*shape[:-1], shape[-1] // BLOCK * BLOCK_BYTES[qtype])


@contextmanager
def single_threaded_ops() -> Iterator[None]:
    """torch's intra-op threads off while a pool's threads each take a chunk (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Workspace(threading.local):
    """Each thread's float32 / integer scratch for one chunk, reused: a fresh 4 MB tensor per step would be
    returned to the OS and faulted in again page by page, which costs more than the arithmetic."""

    def __init__(self):
        self.buffers: tuple[torch.Tensor, ...] = ()

    def get(self, rows: int) -> tuple[torch.Tensor, ...]:
        n = rows * BLOCK
        if not self.buffers or self.buffers[0].numel() < n:
            f32 = lambda: torch.empty(n, dtype=torch.float32)  # noqa: E731
            self.buffers = (f32(), f32(), f32(), torch.empty(n, dtype=torch.int8))
        return tuple(t[:n].view(rows, BLOCK) for t in self.buffers)


_WS = _Workspace()


def _inverse(d: torch.Tensor) -> torch.Tensor:
    # 0 for an all-zero block: its weights quantize to q = 0 (Q8_0) or 8 (Q4_0), as ggml's do
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _scale_bytes(d: torch.Tensor) -> torch.Tensor:
    # (n, 1) float32 -> (n, 2) bytes of the fp16 scale (round to nearest even), little-endian as on x86 and ARM
    return d.to(torch.float16).view(torch.uint8)


def round_half_away(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """roundf(v) (halves away from zero, as C and numpy's reference do; torch.round rounds them to even) into `a`,
    which holds |v| and is overwritten. floor(|v| + 0.5) would be wrong for one input, the float below 0.5
    (0.49999997 + 0.5 rounds up to 1 in float32); adding the float below 0.5 instead is exact for all |v| < 2^22:
    a fraction >= 0.5 reaches the next integer (1 - 2^-25 rounds to 1.0, ties to even), a smaller one cannot."""
    return a.add_(_BELOW_HALF).floor_().copysign_(v)


_BELOW_HALF = 0.5 - 2**-25


def _q8_0(src: torch.Tensor, dst: torch.Tensor) -> None:
    v, a, _, q = _WS.get(src.shape[0])
    v.copy_(src)
    torch.abs(v, out=a)
    d = a.amax(dim=1, keepdim=True) / 127
    v.mul_(_inverse(d))
    round_half_away(torch.abs(v, out=a), v)
    q.copy_(a)
    dst[:, :2] = _scale_bytes(d)
    dst[:, 2:] = q.view(torch.uint8)


def _q4_0(src: torch.Tensor, dst: torch.Tensor) -> None:
    v, _, w, q = _WS.get(src.shape[0])
    v.copy_(src)
    # The weight of largest magnitude, sign kept: the max unless the min is larger in magnitude. Where both have
    # the same magnitude (all-zero blocks too) the first one in the block decides, as numpy's argmax does; argmax
    # over rows of 32 is slow in torch, so only those few rows take it.
    hi, lo = v.amax(dim=1, keepdim=True), v.amin(dim=1, keepdim=True)
    m = torch.where(hi > -lo, hi, lo)
    ties = (hi == -lo).view(-1).nonzero().view(-1)
    if ties.numel():
        rows = v.index_select(0, ties)
        m[ties] = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
    d = m / -8
    # two roundings (product, then sum), never fused into one: the reference's float32 steps
    # trunc == floor here (x / d + 8.5 > 0), and floor is the vectorised one
    v.mul_(_inverse(d)).add_(8.5).floor_().clamp_(0, 15)
    qu = q.view(torch.uint8)
    qu.copy_(v)
    half = BLOCK // 2
    lo_nibbles = qu[:, :half].bitwise_or_(qu[:, half:].bitwise_left_shift_(4))  # in place: no 4 MB temporaries
    dst[:, :2] = _scale_bytes(d)
    dst[:, 2:] = lo_nibbles
