"""Decode attention on the CPU over a KV cache in host memory (`cpu_attention.cpp`; the host cache of
`--kv-cache host`): `decode` computes one query per row from the cache's views as they are, or returns None where
it cannot (no kernel on this CPU, a mask that is not one run of positions per row), and the caller falls back to
torch's attention on the CPU."""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

from cadenza.kernels import cpu_moe, native

log = logging.getLogger("cadenza")


def _build() -> ctypes.CDLL:
    lib = native.build(
        "cpu_attention.cpp", ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"], ["-fopenmp"],
        notice="compiling cadenza's CPU attention kernel (first use, a few seconds; cached)...",
    )  # fmt: skip
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.cadenza_decode_attention.restype = i32
    lib.cadenza_decode_attention.argtypes = [i32] * 5 + [ptr] * 3 + [i32] + [i64] * 6 + [ptr] * 3
    lib.cadenza_decode_attention.argtypes += [ctypes.c_float, i32, ptr]
    return lib


NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma")


def _notice(reason: str) -> None:  # (speed only: the fallback computes the same)
    log.info("the CPU attention kernel is off (%s); decode attention on the CPU uses PyTorch.", reason)


_library = native.Library(_build, lambda: cpu_moe.unsupported(NEEDED_FLAGS), _notice)


def available() -> bool:
    return _library.get() is not None


def visible_ranges(mask: torch.Tensor | None, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's visible positions [lo, hi) of a one-token pass's mask ([B or 1, 1, 1, S], [1, S] or None: all S),
    as int32 tensors [B]; None where a row's visible positions are not one run (or none)."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.int32), torch.full((batch,), length, dtype=torch.int32)
    m = mask.reshape(-1, mask.shape[-1]).to("cpu")
    if m.shape[0] == 1:
        m = m.expand(batch, -1)
    if m.shape[0] != batch:
        return None
    count = m.sum(1)
    lo = m.int().argmax(1)
    hi = m.shape[1] - m.flip(1).int().argmax(1)
    if bool((count == 0).any()) or not bool((hi - lo == count).all()):
        return None
    return lo.int(), hi.int()


def decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, sinks: torch.Tensor | None = None
) -> torch.Tensor | None:
    """q [B, N, 1, D] (any device), k [B, K, S, D], v [B, K, S, Dv] CPU views (bf16 or fp32, last dimension
    contiguous) -> out [B, N, 1, Dv] fp32 on the CPU (page-locked when q is on a GPU); None where the kernel does
    not apply."""
    lib = _library.get()
    b, n, t, d = q.shape
    if lib is None or t != 1 or k.dtype not in (torch.bfloat16, torch.float32) or v.dtype != k.dtype:
        return None
    if k.device.type != "cpu" or k.stride(-1) != 1 or v.stride(-1) != 1 or n % k.shape[1]:
        return None
    ranges = visible_ranges(mask, b, k.shape[2])
    if ranges is None:
        return None
    lo, hi = ranges
    # (from a GPU through page-locked buffers, which the link fills and drains at full speed: torch's host allocator
    # keeps them, and the output's copy back may then run asynchronously)
    qf = torch.empty(b, n, d, dtype=torch.float32, pin_memory=q.is_cuda).copy_(q.reshape(b, n, d))
    sk = None if sinks is None else sinks.detach().to("cpu", torch.float32).contiguous()
    dv = v.shape[-1]
    out = torch.empty(b, n, dv, dtype=torch.float32, pin_memory=q.is_cuda)
    with _one_at_a_time:  # (micro-batches in threads: one team of threads on the cores, not two)
        rc = _call(lib, b, n, k, v, d, dv, qf, lo, hi, sk, scale, out)
    if rc != 0:
        return None
    return out.view(b, n, 1, dv)


_one_at_a_time = threading.Lock()


def _call(lib, b, n, k, v, d, dv, qf, lo, hi, sk, scale, out) -> int:
    return lib.cadenza_decode_attention(
        b, n, k.shape[1], d, dv, qf.data_ptr(), k.data_ptr(), v.data_ptr(), int(k.dtype == torch.bfloat16),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), lo.data_ptr(), hi.data_ptr(),
        0 if sk is None else sk.data_ptr(), float(scale), torch.get_num_threads(), out.data_ptr(),
    )  # fmt: skip
