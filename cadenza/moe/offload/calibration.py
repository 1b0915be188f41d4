"""Measuring this machine for an Orchestra at first use: the CPU kernel's prefetch distance, then the cost model.

Both are cached on disk (under the cache folder), keyed by the machine, the thread count and the expert's shape and
format, so later loads read them instead of measuring.
"""

from __future__ import annotations

import logging
import time

import torch

from cadenza.moe.offload import costmodel, policy

log = logging.getLogger(__name__)


def cost_model_key(device: torch.device, orch, dtype: torch.dtype) -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "emulated"
    kernel = ""
    if orch.cpu_kernel:  # (int8 activations change the CPU's time: a model measured without them is not reused)
        from cadenza.kernels.cpu_moe import int8_formats

        int8 = int8_formats(orch.format_name.split("/")[:1], dtype, orch.options.cpu_activations)
        kernel = " | fused CPU kernel" + (f", int8 activations for {'+'.join(int8)}" if int8 else "")
    return (
        f"{cpu} | {gpu} | {orch.worker.threads} threads | expert {orch.hidden}x{orch.intermediate} "
        f"{orch.format_name} | torch {torch.__version__}{kernel}"
    )


def calibrate(orch, device: torch.device, dtype: torch.dtype) -> None:
    """Gives `orch` its cost model for `auto` (cached, or measured here) after tuning the CPU kernel's prefetch
    (first: the cost model measures the CPU as it will run), then re-decides whether decode layers stream."""
    if orch.cost is not None:
        return
    from cadenza.paths import cache_dir

    key = cost_model_key(device, orch, dtype)
    t0 = time.perf_counter()
    tune_prefetch(orch, key, dtype)
    cost = costmodel.load_cached(cache_dir(), key)
    if cost is None:
        log.info("measuring this machine's CPU and host-to-GPU link for the expert placement (once; cached)")
        slot = orch.cache.weights(0, orch.reference.parts) if orch.cache is not None else None
        cost = costmodel.calibrate(
            key,
            orch.calibration_experts(),
            orch.act,
            device,
            slot,
            cpu_run=orch.cpu_run_one,
            gpu_run=orch.gpu_run_one,
            hidden=orch.hidden,
            dtype=dtype,
        )
        if orch.cache is not None:
            orch.cache.clear()
            costmodel.save_cached(cache_dir(), cost)
    if time.perf_counter() - t0 > 1:
        log.info("measured in %.1f s: %s", time.perf_counter() - t0, cost.describe())
    orch.cost = cost
    orch.choose_streamed()  # auto streams its decode layers where the CPU is not much slower than the link
    if orch.options.zero_copy is None and orch.streamed is not None:  # CADENZA_ZERO_COPY=auto
        direct = orch.streamed.measure_direct(orch.reference, dtype)
        cpu = orch.cpu_one_s if orch.cpu_one_s is not None else cost.cpu_time(1)
        # (no step is captured before the first decode: choose_streamed's new version covers this share too)
        orch.zero_copy_share = policy.zero_copy_share(cpu, direct) if direct is not None else 0.0
        log.info(
            "zero-copy: one expert %.2f ms on the CPU, %s reading host memory from the GPU: the GPU takes %.0f%% of "
            "each token's host experts",
            cpu * 1e3,
            f"{direct * 1e3:.2f} ms" if direct is not None else "unavailable",
            100 * orch.zero_copy_share,
        )


def tune_prefetch(orch, key: str, dtype: torch.dtype) -> None:
    """The fused CPU kernel's prefetch distance for decode calls: the options' (CADENZA_CPU_PREFETCH), or cached,
    or measured."""
    forced = orch.options.cpu_prefetch
    if forced is not None:
        orch.cpu_prefetch = forced
        return
    if not orch.cpu_kernel:
        return
    from cadenza.paths import cache_dir

    value = costmodel.load_prefetch(cache_dir(), key)
    if value is None:
        value = costmodel.tune_prefetch(orch.cpu_run_one, orch.calibration_experts(), orch.hidden, dtype)
        costmodel.save_prefetch(cache_dir(), key, value)
    orch.cpu_prefetch, orch.cpu_one_s = value
