"""How a user asked the offloaded experts to run: one dataclass that the CLI and `LLM` fill.

Environment variables remain as documented overrides of the same fields (for debugging and the benchmarks), read in
one place, `OffloadOptions.with_env`:

| variable | field | values |
| --- | --- | --- |
| CADENZA_SPLIT_EXPERTS=1 | split_experts | let `auto` split one plain expert's rows between the CPU and the GPU |
| CADENZA_STREAM_CPU=0 / host | stream_cpu | "off": every decode layer decides on the host; "host": start the CPU's share with cuLaunchHostFunc instead of the handoff worker |
| CADENZA_CPU_KERNEL=0 | cpu_kernel | PyTorch's products instead of the fused CPU kernel (bf16 experts) |
| CADENZA_GPU_KERNEL=0 | gpu_kernel | per-expert products instead of the indexed decode kernels (plain experts) |
| CADENZA_CPU_PREFETCH=BYTES | cpu_prefetch | the CPU kernel's software prefetch distance, instead of measuring it |
| CADENZA_CPU_ACTIVATIONS=auto / exact / int8 | cpu_activations | how the CPU kernel multiplies experts with integer codes: int8 activations (cadenza.kernels.cpu_moe.int8_bits), the exact products, or auto (int8 for K-quant experts in bf16 / fp16 runs); read by the kernel's calls outside an offloaded run too |
| CADENZA_ZERO_COPY=SHARE / auto | zero_copy | in graph decode, the share (0-1) of each token's host experts the GPU computes reading their weights from pinned host memory while the CPU computes the rest; auto: the share at which both finish together, measured at load (default 0: the CPU computes all) |

Read once where the kernels are imported, not fields (the benchmarks' choices between kernel variants):

| variable | read by | values |
| --- | --- | --- |
| CADENZA_LINEAR_PROGRAMS=N | kernels/gpu_linear.py | programs a GGUF dense layer's decode launch aims for, splitting K (default 8192; 1: never split) |
| GOMP_SPINCOUNT | libgomp | cadenza sets 10000 where a GPU is present and it is unset (cadenza/__init__.py): OpenMP threads spin ~1 ms, then sleep |
"""  # noqa: E501

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cadenza.errors import CadenzaError

POLICIES = ("auto", "cpu", "fetch")
STREAM_CPU = ("on", "off", "host")


@dataclass(frozen=True)
class OffloadOptions:
    """policy: where a non-resident expert is computed ("auto": the cost model's choice per layer, "cpu", "fetch").
    prefetch: guess the next layer's experts and copy them early (None: with the fetch policy only). eviction: which
    fetched expert leaves a full fetch cache. cpu_threads: the CPU worker's threads (None: one per physical core,
    less one when a GPU is driven). The rest are the switches the environment variables above override."""

    policy: str = "auto"
    prefetch: bool | None = None
    eviction: str = "lru"
    cpu_threads: int | None = None
    split_experts: bool = False
    stream_cpu: str = "on"
    cpu_kernel: bool = True
    gpu_kernel: bool = True
    cpu_prefetch: int | None = None
    zero_copy: float | None = 0.0  # None: measured (auto)
    cpu_activations: str = "auto"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise CadenzaError(f"Unknown offload policy {self.policy!r}. Use one of: {', '.join(POLICIES)}.")
        if self.stream_cpu not in STREAM_CPU:
            raise CadenzaError(f"stream_cpu={self.stream_cpu!r} is not one of {', '.join(STREAM_CPU)}.")
        t = self.cpu_threads
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 1):
            raise CadenzaError(f"cpu_threads={t!r} is not valid. Use a whole number of at least 1.")
        if self.cpu_activations not in ("auto", "exact", "int8"):
            raise CadenzaError(f"cpu_activations={self.cpu_activations!r} is not valid. Use auto, exact or int8.")
        if self.zero_copy is not None and not 0.0 <= self.zero_copy <= 1.0:
            raise CadenzaError(f"zero_copy={self.zero_copy!r} is not a share. Give a number from 0 to 1.")

    def with_policy(self, policy: str) -> OffloadOptions:
        return dataclasses.replace(self, policy=policy)

    def with_env(self, env: Mapping[str, str] | None = None) -> OffloadOptions:
        """These options with the CADENZA_* overrides of the module's table applied (a bad value is refused with
        the fix, before any weight is read)."""
        env = os.environ if env is None else env
        changes: dict = {}
        if env.get("CADENZA_SPLIT_EXPERTS") == "1":
            changes["split_experts"] = True
        stream = env.get("CADENZA_STREAM_CPU")
        if stream == "0":
            changes["stream_cpu"] = "off"
        elif stream == "host":
            changes["stream_cpu"] = "host"
        if env.get("CADENZA_CPU_KERNEL") == "0":
            changes["cpu_kernel"] = False
        if env.get("CADENZA_GPU_KERNEL") == "0":
            changes["gpu_kernel"] = False
        forced = env.get("CADENZA_CPU_PREFETCH")
        if forced is not None:
            if not forced.isdigit():
                raise CadenzaError(f"CADENZA_CPU_PREFETCH={forced!r}: give a distance in bytes (0 turns it off).")
            changes["cpu_prefetch"] = int(forced)
        share = env.get("CADENZA_ZERO_COPY")
        if share == "auto":
            changes["zero_copy"] = None
        elif share is not None:
            try:
                changes["zero_copy"] = float(share)
            except ValueError:
                changes["zero_copy"] = -1.0  # refused below, with the fix
            if not 0.0 <= changes["zero_copy"] <= 1.0:
                raise CadenzaError(
                    f"CADENZA_ZERO_COPY={share!r}: give the GPU's share of each token's host experts, from 0 to 1, "
                    "or auto."
                )
        acts = env.get("CADENZA_CPU_ACTIVATIONS")
        if acts is not None:
            if acts.strip().lower() not in ("auto", "exact", "int8"):
                raise CadenzaError(f"CADENZA_CPU_ACTIVATIONS={acts!r}: use auto, exact or int8 (or unset it).")
            changes["cpu_activations"] = acts.strip().lower()
        return dataclasses.replace(self, **changes) if changes else self
