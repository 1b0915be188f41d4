"""Measured facts of the box, taken at the start of a benchmark run: what it is, and the bandwidths that bound
decode speed (host DRAM read, pinned host-to-GPU copy, GPU memory read). Numbers differ between boxes and runs,
so every results file carries its own."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cadenza import foreign_environment

GiB = 1 << 30
GB = 1e9  # bandwidths are in GB/s (10^9 bytes), as DRAM and PCIe are quoted

# CPU features that decide which CPU expert kernels can run fast.
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def machine_info(device: torch.device | str) -> dict:
    """The box's description and measured bandwidths; the CUDA fields are None on a CPU-only run."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    cpu = cpu_facts()
    info = {
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_mem_gib": round(torch.cuda.get_device_properties(device).total_memory / GiB, 2) if cuda else None,
        "cpu_model": cpu["model"],
        "physical_cores": cpu["physical_cores"],
        "logical_cpus": cpu["logical_cpus"],
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": cpu["flags"],
        "host_mem_gib": host_memory_gib(),
        "torch_threads": torch.get_num_threads(),
        # the OpenMP wait policy cadenza ran under and the one a peer it starts gets (cadenza.foreign_environment)
        "gomp_spincount": {
            "cadenza": os.environ.get("GOMP_SPINCOUNT"),
            "peers": foreign_environment().get("GOMP_SPINCOUNT"),
        },
        "dram_read_gb_s": round(measure_dram_read_gb_s(), 2),
        "pinned_h2d_gb_s": round(measure_pinned_h2d_gb_s(device), 2) if cuda else None,
        "gpu_mem_bw_gb_s": round(measure_gpu_read_gb_s(device), 1) if cuda else None,
        "gpu_copy_gb_s": round(measure_gpu_copy_gb_s(device), 1) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cadenza": _cadenza_version(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if cuda:
        torch.cuda.empty_cache()  # the measurement buffers are freed: give their memory back
    return info


# --- what the box is -----------------------------------------------------------------------------------------------


def cpu_facts(cpuinfo: str | None = None) -> dict:
    """CPU model, physical cores (distinct (socket, core) pairs), logical CPUs and notable flags from
    /proc/cpuinfo; falls back to platform/os facts where that file does not exist."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags, cores, logical = None, set(), set(), 0
    phys = core = None
    for line in cpuinfo.splitlines() + [""]:
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "processor":
            logical += 1
        elif key == "model name" and model is None:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
        elif not key:  # a blank line ends one processor's block
            if core is not None:
                cores.add((phys, core))
            phys = core = None
    logical = logical or os.cpu_count() or 0
    return {
        "model": model or platform.processor() or None,
        "physical_cores": len(cores) or logical,
        "logical_cpus": logical,
        "flags": [f for f in _CPU_FLAGS if f in flags],
    }


def host_memory_gib() -> float | None:
    """MemTotal of /proc/meminfo in GiB (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / GiB, 2)
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_gib() -> float | None:
    """This process's resident host memory in GiB (VmRSS), to show the baseline's copy is gone before cadenza's
    loads; None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) * 1024 / GiB, 2)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cadenza_version() -> str:
    from cadenza import __version__

    return __version__


def _git(*args: str) -> str | None:
    # Run in the package's folder, not the cwd: the commit is that of the code being measured.
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """HEAD's hash when cadenza runs from a git checkout, else None."""
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD (results from uncommitted code say so); None outside git."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out)


# --- bandwidths ----------------------------------------------------------------------------------------------------


def measure_dram_read_gb_s(nbytes: int = 2 * GiB, repeats: int = 3) -> float:
    """Host DRAM read bandwidth: a multithreaded sum over `nbytes` of float32, best of `repeats`.

    2 GiB is far beyond the L3 (300 MB on the benchmark box), so this reads DRAM, not cache. Ones, not
    uninitialised memory: denormals would slow the adds and measure the ALUs instead.
    """
    buf = torch.ones(nbytes // 4, dtype=torch.float32)  # also faults every page in before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    del buf
    return nbytes / best / GB


def cuda_times(fn, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn()` on the device's current stream (CUDA events; after one warm-up
    call)."""
    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def _time_cuda(fn, device: torch.device, repeats: int) -> float:
    """Best time in seconds of `fn()` (cuda_times). The callers' buffers die when they return; machine_info then
    empties the CUDA cache."""
    return min(cuda_times(fn, device, repeats))


def measure_pinned_h2d_gb_s(device: torch.device, nbytes: int = GiB, repeats: int = 3) -> float:
    """Host-to-GPU copy bandwidth from pinned (page-locked) memory, best of `repeats`."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    t = _time_cuda(lambda: dev.copy_(host, non_blocking=True), device, repeats)
    return nbytes / t / GB


def measure_gpu_read_gb_s(device: torch.device, nbytes: int = 2 * GiB, repeats: int = 3) -> float:
    """GPU memory READ bandwidth: bytes read / time of a sum over `nbytes`.

    A reduction reads and writes nearly nothing, like a batch-1 decode matmul streaming its weights, so this is
    the bandwidth the GPU side of the roofline uses. (A copy's read rate would be about half: it also writes.)
    """
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    t = _time_cuda(lambda: x.sum(), device, repeats)
    return nbytes / t / GB


def measure_gpu_copy_gb_s(device: torch.device, nbytes: int = 2 * GiB, repeats: int = 3) -> float:
    """Device-to-device copy of `nbytes`, counting read + write: (2 * nbytes) / time. For reference only."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _time_cuda(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / t / GB
