"""The handoff worker: a CPU thread that runs a streamed layer's job when the CUDA stream asks for it.

A host function (cuLaunchHostFunc) costs a decode layer tens of microseconds: the driver's callback thread is
woken, runs the job, and signals back. Here the stream writes one word of mapped pinned memory
(cuStreamWriteValue32), a thread spinning on that word runs the job, and the stream waits for the answer in the same
word (cuStreamWaitValue32): both are stream memory operations, so a CUDA graph captures them like the host function.
handoff.cpp states the protocol and why it holds across layers and graph replays.

- `Worker`: the thread (handoff.cpp, a small extension of its own: it needs no AVX-512, so it builds and its tests
  run on any Linux CPU), its word, its jobs (`void fn(void*)`, what cuLaunchHostFunc calls: the same job either way).
- `MemOps` (`memops()`): the driver's stream memory operations through ctypes; `probe(device)` checks once per
  device that a request round-trips, eagerly and replayed from a graph, before anything relies on it.
- `Block`: pinned staging for a few tokens in one page-locked block: x, ids and w written by the GPU through the
  block's mapping (or one copy), the job's fp32 result read back with one copy (or through the mapping).
"""

from __future__ import annotations

import ctypes
import platform
import sys
import time
import weakref

import numpy as np
import torch

from cadenza.kernels import native

DONE = 0x80000000  # the answer's bit (handoff.cpp)
CU_STREAM_WAIT_VALUE_EQ = 1
# The idle policy (handoff.cpp): decode layers come every ~0.1-1 ms and steps within a few ms of each other, so
# spin through them; after SPIN_S without a job poll every NAP_S (the first layer after a pause waits at most that),
# and after DEEP_AFTER_S every DEEP_NAP_S (an idle server costs a fraction of a percent of a core).
SPIN_S, NAP_S, DEEP_AFTER_S, DEEP_NAP_S = 0.05, 50e-6, 2.0, 1e-3
PROBE_TIMEOUT_S = 5.0


def _build() -> ctypes.CDLL:
    lib = native.build("handoff.cpp", ["-O2", "-pthread"], ["-pthread"], key=platform.machine())
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.cadenza_handoff_start.restype = ptr
    lib.cadenza_handoff_start.argtypes = [ptr, i64, i64, i64, i64]
    lib.cadenza_handoff_add.restype = ctypes.c_int
    lib.cadenza_handoff_add.argtypes = [ptr, ptr, ptr]
    lib.cadenza_handoff_stop.argtypes = [ptr]
    lib.cadenza_handoff_counts.argtypes = [ptr, ptr]
    return lib


def _unsupported() -> str | None:
    return None if sys.platform == "linux" else f"needs Linux, this is {sys.platform}"


_library = native.Library(_build, _unsupported)  # without it the host function still works
_load = _library.get


def unavailable_reason() -> str | None:
    """Why the worker extension cannot run here (builds it at first call), or None."""
    return _library.reason


def noop_function() -> int:
    """The address of a job that does nothing (the protocol's own cost; the probe)."""
    return ctypes.cast(_load().cadenza_handoff_noop, ctypes.c_void_p).value


def _stop(lib: ctypes.CDLL, handle: int, state: torch.Tensor) -> None:
    lib.cadenza_handoff_stop(handle)  # (`state` rides along: the thread reads it until this returns)


class Worker:
    """A thread running registered jobs on request (handoff.cpp); `close()` stops it (also at garbage collection).

    The word it watches is `state[0]` (uint32), alone in its cache line: pinned where a GPU writes it
    (`pinned=True`), plain memory where the tests write it themselves (`request`, `wait`)."""

    def __init__(
        self,
        pinned: bool = False,
        spin_s: float = SPIN_S,
        nap_s: float = NAP_S,
        deep_after_s: float = DEEP_AFTER_S,
        deep_nap_s: float = DEEP_NAP_S,
    ):
        lib = _load()
        if lib is None:
            raise RuntimeError(f"the handoff worker is unavailable: {_library.reason}")
        self._lib = lib
        self.state = torch.zeros(16, dtype=torch.int32, pin_memory=pinned)
        self.word = self.state.numpy().view(np.uint32)  # (the same memory)
        ns = [int(s * 1e9) for s in (spin_s, nap_s, deep_after_s, deep_nap_s)]
        handle = lib.cadenza_handoff_start(self.state.data_ptr(), *ns)
        if not handle:
            raise RuntimeError("the handoff worker's thread could not be started")
        self._handle = handle
        self._finalizer = weakref.finalize(self, _stop, lib, handle, self.state)

    def add(self, fn: int, arg: int) -> int:
        """Registers `fn(arg)` (a C function's address and its argument); returns its slot."""
        if not self._finalizer.alive:
            raise RuntimeError("the handoff worker is closed")
        slot = self._lib.cadenza_handoff_add(self._handle, fn, arg)
        if slot < 0:
            raise RuntimeError("the handoff worker has no free slot")
        return slot

    def request(self, slot: int) -> None:
        """Asks for job `slot` from the host, as a stream's write does (tests)."""
        self.word[0] = slot + 1

    def wait(self, slot: int, timeout_s: float = 10.0) -> None:
        """Waits for the answer to `request(slot)`, as a stream's wait does (tests)."""
        want, deadline = (slot + 1) | DONE, time.perf_counter() + timeout_s
        while self.word[0] != want:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the handoff worker did not answer job {slot} in {timeout_s} s")
            time.sleep(0)

    def counts(self) -> dict[str, int]:
        """Jobs run, requests for unknown slots, naps taken (idle polls asleep), jobs that threw."""
        out = (ctypes.c_int64 * 4)()
        self._lib.cadenza_handoff_counts(self._handle, out)
        return dict(zip(("runs", "unknown", "naps", "errors"), out, strict=True))

    def close(self) -> None:
        """Stops the thread (idempotent); no stream may still ask it for anything (synchronise first)."""
        self._finalizer()


# --- the driver's stream memory operations --------------------------------------------------------------------


class MemOps:
    """cuStreamWriteValue32 / cuStreamWaitValue32 (the v2 entry points: always enabled, unlike the v1 ones that
    needed NVreg_EnableStreamMemOPs; their writes always carry the memory fence) and cuMemHostGetDevicePointer."""

    def __init__(self, lib: ctypes.CDLL):
        u32, ptr = ctypes.c_uint32, ctypes.c_void_p
        self._write = lib.cuStreamWriteValue32_v2
        self._wait = lib.cuStreamWaitValue32_v2
        self._devptr = lib.cuMemHostGetDevicePointer_v2
        for fn in (self._write, self._wait):
            fn.argtypes = [ptr, ctypes.c_uint64, u32, ctypes.c_uint]
            fn.restype = ctypes.c_int
        self._devptr.argtypes = [ctypes.POINTER(ctypes.c_uint64), ptr, ctypes.c_uint]
        self._devptr.restype = ctypes.c_int

    def device_pointer(self, t: torch.Tensor) -> int:
        """The device's address of pinned host tensor `t` (asked for its allocation's start, plus the offset)."""
        base = t.untyped_storage().data_ptr()
        out = ctypes.c_uint64()
        rc = self._devptr(ctypes.byref(out), base, 0)
        if rc != 0:
            raise RuntimeError(f"cuMemHostGetDevicePointer failed ({rc}): is the memory pinned?")
        return out.value + (t.data_ptr() - base)

    def request(self, stream: int, word: int, slot: int) -> None:
        """On `stream` (a CUstream): ask the worker whose word is at device address `word` for job `slot`, and wait
        for its answer (handoff.cpp's protocol). Both are stream operations: a CUDA graph captures them."""
        rc = self._write(stream, word, slot + 1, 0)  # 0: the default flags, a fence before the write
        if rc != 0:
            raise RuntimeError(f"cuStreamWriteValue32 failed ({rc})")
        rc = self._wait(stream, word, (slot + 1) | DONE, CU_STREAM_WAIT_VALUE_EQ)
        if rc != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed ({rc})")


_memops: MemOps | None = None
_probed: dict[int, str | None] = {}
_abandoned: list[Worker] = []  # a probe's workers whose word a stuck stream may still write: never freed


def memops() -> MemOps | None:
    """The driver's stream memory operations, or None where libcuda or its v2 entry points are missing."""
    global _memops
    if _memops is None:
        try:
            _memops = MemOps(ctypes.CDLL("libcuda.so.1"))
        except (OSError, AttributeError):
            return None
    return _memops


def probe(device: torch.device) -> str | None:
    """Why the worker cannot hand jobs over on this CUDA device, or None. Checked once per device: a request
    round-trips eagerly and twice from a captured graph, each within a deadline (a driver that refuses the
    operations, a capture that fails, or a mapping that does not work falls back to the host function)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _probed:
        reason = unavailable_reason()
        if reason is None and memops() is None:
            reason = "the CUDA driver has no cuStreamWriteValue32_v2 / cuStreamWaitValue32_v2"
        if reason is None:
            reason = _round_trip(memops(), torch.device("cuda", index))
        _probed[index] = reason
    return _probed[index]


def _finished(stream: torch.cuda.Stream, timeout_s: float) -> bool:
    done = torch.cuda.Event()
    done.record(stream)
    deadline = time.perf_counter() + timeout_s
    while not done.query():
        if time.perf_counter() > deadline:
            return False
        time.sleep(1e-4)
    return True


def _round_trip(ops: MemOps, device: torch.device) -> str | None:
    with torch.cuda.device(device):
        try:
            worker = Worker(pinned=True, spin_s=1.0)
            slot = worker.add(noop_function(), 0)
        except RuntimeError as exc:
            return str(exc)
        count = torch.zeros(1, dtype=torch.int32, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        stuck = False
        try:
            word = ops.device_pointer(worker.state)
            with torch.cuda.stream(stream):
                ops.request(stream.cuda_stream, word, slot)
                count.add_(1)  # runs only after the answer
            if not _finished(stream, PROBE_TIMEOUT_S):
                stuck = True
                return "a request from the stream got no answer (mapped memory not shared?)"
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                ops.request(stream.cuda_stream, word, slot)
                count.add_(1)
            with torch.cuda.stream(stream):
                graph.replay()
                graph.replay()
            if not _finished(stream, PROBE_TIMEOUT_S):
                stuck = True
                return "a request replayed from a CUDA graph got no answer"
            runs, n = worker.counts()["runs"], int(count.item())
            if runs != 3 or n != 3:
                return f"3 requests ran {runs} jobs and {n} kernels after them"
            return None
        except RuntimeError as exc:  # the driver refused an operation, or the capture failed
            stuck = not _finished(stream, PROBE_TIMEOUT_S)
            return f"the stream memory operations failed: {str(exc).strip().splitlines()[-1][:200]}"
        finally:
            if stuck:  # answer in the worker's place, so the stream is not left waiting forever
                worker.word[0] = (slot + 1) | DONE
                stuck = not _finished(stream, PROBE_TIMEOUT_S)
            if stuck:
                _abandoned.append(worker)
            else:
                worker.close()


# --- staging ---------------------------------------------------------------------------------------------------


class _Mapped:
    """A CUDA array interface for `n` bytes at device address `ptr` (torch.as_tensor then aliases them)."""

    def __init__(self, ptr: int, n: int):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (ptr, False), "version": 2}


def device_view(ops: MemOps, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned host tensor `t` (contiguous) as a CUDA tensor of `device` aliasing the same memory through its device
    mapping: kernels read and write host memory through it. RuntimeError where that cannot be had."""
    with torch.cuda.device(device):
        device = torch.device("cuda", torch.cuda.current_device())  # "cuda" names the current one; views name it
        ptr = ops.device_pointer(t)
        # (device given: torch versions that would otherwise convert to the default device, the CPU, then leave a
        # tensor already there as it is; one of another GPU would be copied, which the check sees)
        view = torch.as_tensor(_Mapped(ptr, t.numel() * t.element_size()), device=device)
    if view.device != device or view.data_ptr() != ptr:
        raise RuntimeError(f"pinned memory could not be had as a tensor of {device}")
    return view.view(t.dtype).view(t.shape)


def write_by_kernel(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst = src, converted to dst's dtype, by an elementwise kernel. torch's copy_ between two CUDA tensors of one
    dtype is a device-to-device cudaMemcpy, which for a destination that is host memory seen through its mapping
    names the wrong direction (undefined in CUDA's terms) and would be a copy-engine node in the graph besides; x * 1
    and ids + 0 are exact."""
    if dst.dtype.is_floating_point:
        torch.mul(src, 1, out=dst)
    else:
        torch.add(src, 0, out=dst)


def _carve(block: torch.Tensor, offsets: list[int], shapes: list[tuple], dtypes: list[torch.dtype]) -> list:
    out = []
    for off, shape, dt in zip(offsets, shapes, dtypes, strict=True):
        n = int(np.prod(shape)) * dt.itemsize
        out.append(block[off : off + n].view(dt).view(shape))
    return out


class Block:
    """Staging for T tokens of one dtype in one page-locked block: x [T, H] (the activations' dtype), ids [T, k]
    int64, w [T, k] fp32 and y [T, H] fp32, each 64-byte aligned; `x`, `ids`, `w`, `y` are the host's views (a
    job reads and writes them in place).

    `put` stages a layer's inputs from the current stream: with `mapped_in`, three small kernels write them straight
    into the block through its device mapping (`write_by_kernel`; the stream's request then fences them); else into
    a device block sent down with one copy. `fetch` gives the GPU the job's result after the answer: with
    `mapped_out`, the block's y itself (the kernel that adds it reads host memory); else one copy into a device
    tensor. Where the mapping cannot be had as a tensor of `device`, both fall back to copies (`mapped_in`,
    `mapped_out` say)."""

    def __init__(
        self,
        t: int,
        k: int,
        h: int,
        dtype: torch.dtype,
        device: torch.device,
        ops: MemOps | None = None,
        mapped_in: bool = True,
        mapped_out: bool = False,
    ):
        shapes = [(t, h), (t, k), (t, k), (t, h)]
        dtypes = [dtype, torch.int64, torch.float32, torch.float32]
        self.offsets, end = [], 0
        for shape, dt in zip(shapes, dtypes, strict=True):
            self.offsets.append(end)
            end += -(-int(np.prod(shape)) * dt.itemsize // 64) * 64
        cuda = device.type == "cuda"
        if cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # (what tensors of "cuda" end up on)
        self.host = torch.zeros(end, dtype=torch.uint8, pin_memory=cuda)
        self.x, self.ids, self.w, self.y = _carve(self.host, self.offsets, shapes, dtypes)
        mapped = self._mapping(ops, device) if cuda and ops is not None and (mapped_in or mapped_out) else None
        self.mapped_in, self.mapped_out = mapped_in and mapped is not None, mapped_out and mapped is not None
        self._in_bytes = self.offsets[3]  # x, ids, w: what goes down
        self._stage = None if self.mapped_in else torch.zeros(self._in_bytes, dtype=torch.uint8, device=device)
        src = mapped if self.mapped_in else self._stage
        self._x, self._ids, self._w = _carve(src, self.offsets[:3], shapes[:3], dtypes[:3])
        if self.mapped_out:
            self._y = _carve(mapped, self.offsets[3:], shapes[3:], dtypes[3:])[0]
        else:
            self._y = torch.zeros(t, h, dtype=torch.float32, device=device)

    def _mapping(self, ops: MemOps, device: torch.device) -> torch.Tensor | None:
        """The block as a uint8 CUDA tensor of `device` aliasing the host memory, or None."""
        try:
            view = device_view(ops, self.host, device)
        except (RuntimeError, TypeError, ValueError):
            return None
        self._keep = view
        return view

    def put(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Stages a layer's inputs (converted to int64 ids and fp32 weights on the way)."""
        if self.mapped_in:  # straight into host memory: three small kernels
            for dst, src in ((self._x, x), (self._ids, topk_ids), (self._w, topk_weights)):
                write_by_kernel(dst, src)
        else:  # into the device block, then down in one copy
            self._x.copy_(x)
            self._ids.copy_(topk_ids)
            self._w.copy_(topk_weights)
            self.host[: self._in_bytes].copy_(self._stage, non_blocking=True)

    def fetch(self) -> torch.Tensor:
        """The job's result [T, H] fp32 for the GPU (queue after the answer)."""
        if not self.mapped_out:
            self._y.copy_(self.y, non_blocking=True)
        return self._y
