"""The CPU side of the expert work: one worker thread that runs a layer's host-resident experts with PyTorch's
CPU kernels (its own intra-op threads), while the main thread keeps the GPU busy.

PyTorch releases the GIL inside its operators, so the worker's matrix products overlap with the main thread
launching GPU kernels and copies.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's memory bandwidth and FMA units)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[tuple[str, str]] = set()
    try:
        cpu, phys = None, "0"
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu in allowed:
                    cores.add((phys, value))
    except OSError:
        pass
    return len(cores) or len(allowed)


class CpuWorker:
    """A single thread that runs submitted CPU expert jobs in order, with `threads` intra-op threads."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or physical_cores()
        # OpenMP's thread count is per calling thread: set it inside the worker, not only in the main thread.
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="cadenza-cpu-experts",
            initializer=torch.set_num_threads,
            initargs=(self.threads,),
        )

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
