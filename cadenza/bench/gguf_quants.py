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

import math
import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager

import numpy as np
import torch

BLOCK = 32  # weights per block, both formats
BLOCK_BYTES = {"Q8_0": 2 + BLOCK, "Q4_0": 2 + BLOCK // 2}
K_BLOCK = 256  # weights per K-quant super-block
K_BLOCK_BYTES = {"Q4_K": 2 + 2 + 12 + K_BLOCK // 2, "Q6_K": K_BLOCK // 2 + K_BLOCK // 4 + K_BLOCK // 16 + 2}
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
    if qtype in K_BLOCK_BYTES:
        if shape[-1] % K_BLOCK:
            raise ValueError(f"rows of {shape[-1]} weights do not split into {qtype} blocks of {K_BLOCK}")
        return (*shape[:-1], shape[-1] // K_BLOCK * K_BLOCK_BYTES[qtype])
    if shape[-1] % BLOCK:
        raise ValueError(f"rows of {shape[-1]} weights do not split into blocks of {BLOCK}")
    return (*shape[:-1], shape[-1] // BLOCK * (BLOCK_BYTES.get(qtype) or MXFP4_BYTES))


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


# --- K-quant blocks made up, not quantized --------------------------------------------------------------------------
#
# A Q4_K_M-like file of a full-size model (45 B weights) cannot be quantized in Python in minutes, and a benchmark of
# speed needs only blocks of the right layout and a sane scale. So the codes are random bytes and the scales are
# chosen so a block dequantizes to weights of mean ~0 and std `std` (the synthetic model's N(0, 1/fan_in)):
# - Q4_K (144 bytes per 256 weights): fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) pairs for the 8 sub-blocks
#   of 32, 128 bytes of nibbles; w = d * sc * q - dmin * m. With dmin = d, sc in {4, 6, 8} and m = 7.5 sc, a
#   uniform q in 0..15 gives w = d sc (q - 7.5): mean 0, std d * 4.61 * rms(sc) (6.22).
# - Q6_K (210 bytes per 256): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one per 16
#   weights), fp16 d; w = d * sc * (q - 32), q uniform in 0..63: std d * 18.48 * rms(sc); sc in +-{2..6} (rms 4.24).
_K_CHUNK_BLOCKS = 1 << 14  # super-blocks per task: 2.3 / 3.4 MB
_HEADERS = 4096  # distinct scale fields per tensor (a power of two)
_HEADER = {"Q4_K": slice(0, 16), "Q6_K": slice(192, 210)}  # d, dmin, scales / scales, d
_K_SPREAD = {"Q4_K": 4.61 * (116 / 3) ** 0.5, "Q6_K": 18.48 * 18**0.5}  # std of w / d


def kquant_d(qtype: str, std: float) -> float:
    """The fp16 super-block scale d whose blocks (as `random_kquant` makes them) have weights of std `std`."""
    return float(torch.tensor(std / _K_SPREAD[qtype], dtype=torch.float16))


def random_kquant(out: torch.Tensor, qtype: str, std: float, seed: int, pool: Executor | None = None) -> None:
    """Fills `out` (contiguous uint8, rows of whole `qtype` super-blocks) with random blocks of weights of std
    `std` (see above); the same seed gives the same bytes whatever the pool. With a pool, run it under
    `single_threaded_ops()`."""
    width = K_BLOCK_BYTES[qtype]
    if out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() % width:
        raise ValueError(f"out must be a contiguous uint8 tensor of whole {qtype} blocks ({width} bytes)")
    d = torch.tensor([kquant_d(qtype, std)], dtype=torch.float16).view(torch.uint8)
    blocks = out.view(-1, width)
    # the scale fields: _HEADERS of them made per call, each block taking one picked by two of its random bytes
    header = _HEADER[qtype]
    table = torch.empty(_HEADERS, width, dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed % (1 << 63))
    _random_bytes(table.view(-1), g)
    (_random_q4_k if qtype == "Q4_K" else _random_q6_k)(table, d)
    table = table[:, header].contiguous()
    tasks = [(i, blocks[i : i + _K_CHUNK_BLOCKS]) for i in range(0, blocks.shape[0], _K_CHUNK_BLOCKS)]

    def one(task) -> None:
        i, dst = task
        g = torch.Generator().manual_seed((seed * 1_000_003 + 1 + i // _K_CHUNK_BLOCKS) % (1 << 63))
        _random_bytes(dst.view(-1), g)  # the codes (and, until overwritten below, the scale fields)
        pick = dst[:, header.start : header.start + 2].contiguous().view(torch.int16).view(-1)
        dst[:, header] = table[(pick & (_HEADERS - 1)).long()]

    if pool is None:
        for task in tasks:
            one(task)
    else:
        list(pool.map(one, tasks))


MXFP4_BYTES = 17  # ggml's block_mxfp4: an e8m0 scale byte, then 16 bytes of 32 fp4 (e2m1) codes
# ggml's kvalues_mxfp4 (the e2m1 values doubled; the scale is 2^(e - 128), half of e8m0's 2^(e - 127)): the rms of
# a uniformly random code
_MXFP4_CODE_RMS = ((0 + 1 + 4 + 9 + 16 + 36 + 64 + 144) / 8) ** 0.5


def random_mxfp4(out: torch.Tensor, std: float, seed: int, pool: Executor | None = None) -> None:
    """Fills `out` (contiguous uint8, whole 17-byte MXFP4 blocks) with random blocks of weights of std `std`:
    uniform codes, and per block the e8m0 exponent below the wanted scale or the one above, picked by the block's
    first random byte so that the mean square is std^2 (scales vary as trained blocks' do, within a factor 2).
    Quantizing 115 G synthetic weights with gguf.quants (numpy) would take hours; speed does not depend on the values.
    The same seed gives the same bytes whatever the pool. With a pool, run it under `single_threaded_ops()`."""
    if out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() % MXFP4_BYTES:
        raise ValueError(f"out must be a contiguous uint8 tensor of whole MXFP4 blocks ({MXFP4_BYTES} bytes)")
    target = std / _MXFP4_CODE_RMS  # the scale's wanted rms
    low = math.floor(math.log2(target))
    share_high = ((target / 2.0**low) ** 2 - 1) / 3  # (1 - p) s^2 + p (2 s)^2 = target^2
    threshold = round(share_high * 256)
    if not 1 <= 128 + low <= 253:
        raise ValueError(f"std {std} is out of MXFP4's range")
    blocks = out.view(-1, MXFP4_BYTES)
    tasks = [(i, blocks[i : i + _CHUNK_BLOCKS]) for i in range(0, blocks.shape[0], _CHUNK_BLOCKS)]

    def one(task) -> None:
        i, dst = task
        g = torch.Generator().manual_seed((seed * 1_000_003 + 1 + i // _CHUNK_BLOCKS) % (1 << 63))
        _random_bytes(dst.view(-1), g)
        dst[:, 0] = (dst[:, 0] < threshold).to(torch.uint8) + (128 + low)

    if pool is None:
        for task in tasks:
            one(task)
    else:
        list(pool.map(one, tasks))


def _random_bytes(flat: torch.Tensor, g: torch.Generator) -> None:
    """Uniform random bytes into a contiguous uint8 tensor: 8 at a time as full-range int64 draws (six times the
    bytes per second of uint8 draws), the unaligned rest one at a time."""
    head = (-flat.storage_offset()) % 8
    n = (flat.numel() - head) // 8 * 8
    if n <= 0:
        flat.random_(generator=g)
        return
    flat[head : head + n].view(torch.int64).random_(-(1 << 63), None, generator=g)  # from int64's min: all 64 bits
    for rest in (flat[:head], flat[head + n :]):
        if rest.numel():
            rest.random_(generator=g)


def _random_q4_k(dst: torch.Tensor, d: torch.Tensor) -> None:
    """Scales of blocks whose bytes are random: each sub-block's scale picked by a random byte of the block's own
    scale field (no second draw), then the field written over."""
    pick = dst[:, 4:12] % 3  # a copy: dst is written below
    sc = pick * 2 + 4  # 4, 6, 8 (uint8)
    m = sc * 15 // 2  # 7.5 sc: the mean of q; at most 60
    dst[:, 0:2] = d
    dst[:, 2:4] = d  # dmin = d
    lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    # ggml's get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scale) and 4-7 (min); 4-7 split into
    # a low nibble in bytes 8-11 (scale low, min high nibble) and their top 2 bits in the top bits of bytes 0-7
    dst[:, 4:8] = lo_sc | ((hi_sc >> 4) << 6)
    dst[:, 8:12] = lo_m | ((hi_m >> 4) << 6)
    dst[:, 12:16] = (hi_sc & 0xF) | ((hi_m & 0xF) << 4)


def _random_q6_k(dst: torch.Tensor, d: torch.Tensor) -> None:
    """Scales in +-{2..6}, from the random bytes of the block's own scale field (magnitude and sign)."""
    r = dst[:, 192:208].view(torch.int8)
    magnitude = (r.view(torch.uint8) & 0x7F) % 5 + 2
    dst[:, 192:208] = torch.where(r < 0, -magnitude.view(torch.int8), magnitude.view(torch.int8)).view(torch.uint8)
    dst[:, 208:210] = d


# --- random blocks of every type cadenza keeps (tests, the CPU kernel bench) -----------------------------------

RANDOM_BLOCKS = {
    "Q5_K": (256, 176),
    "Q4_0": (32, 18),
    "MXFP4": (32, 17),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
    "Q8_0": (32, 34),
}


def _f16(rng: np.random.Generator, shape, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, shape).astype(np.float16).view(np.uint8).reshape(*shape, 2)


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """uint8 [rows, bytes per row]: random codes, scales near `scale` (so weights look like a model's)."""
    rng = np.random.default_rng(seed)
    per, size = RANDOM_BLOCKS[qtype]
    n = (rows, cols // per)
    if qtype in ("Q4_0", "Q8_0"):
        d = _f16(rng, n, -scale / 8, scale / 8)
        q = rng.integers(0, 256, (*n, size - 2), dtype=np.uint8)
        b = np.concatenate((d, q), axis=-1)
    elif qtype == "MXFP4":
        e = rng.integers(118, 124, (*n, 1), dtype=np.uint8)
        b = np.concatenate((e, rng.integers(0, 256, (*n, 16), dtype=np.uint8)), axis=-1)
    elif qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(rng, n, 0, scale / 64), _f16(rng, n, 0, scale / 64)
        b = np.concatenate((d, dmin, rng.integers(0, 256, (*n, size - 4), dtype=np.uint8)), axis=-1)
    else:  # Q6_K: ql, qh, int8 scales, d
        body = rng.integers(0, 256, (*n, 192), dtype=np.uint8)
        sc = rng.integers(-64, 64, (*n, 16)).astype(np.int8).view(np.uint8)
        b = np.concatenate((body, sc, _f16(rng, n, 0, scale / 256)), axis=-1)
    return np.ascontiguousarray(b.reshape(rows, -1))
