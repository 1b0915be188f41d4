"""The result of `cadenza bench --profile-step` (cadenza.bench.step_profile): a Row of times per step and per
decoder layer, their medians, and the StepProfile that writes them as JSON and as a text table."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field


@dataclass
class Row:
    """One step's (or one layer's) time, in milliseconds. See the module docstring for each field."""

    wall_ms: float = 0.0
    gpu_kernels_ms: float = 0.0
    transfers_ms: float = 0.0
    cpu_experts_ms: float = 0.0
    overhead_ms: float = 0.0  # wall - |gpu kernels U transfers U cpu experts|: nothing useful running
    overhead_simple_ms: float = 0.0  # wall - gpu kernels - cpu experts (the definition; may be < 0)
    syncs: float | None = None  # GPU->host synchronisations (offloaded models)
    sync_wait_ms: float | None = None  # host time waiting in them
    kernels: float | None = None  # device kernels (CUDA)
    launches: float | None = None  # host launch calls (CUDA)

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def median_row(rows: list[Row]) -> Row:
    """Each field's median over the rows (None where every row has None)."""
    out = {}
    for f in dataclasses.fields(Row):
        values = [getattr(r, f.name) for r in rows if getattr(r, f.name) is not None]
        out[f.name] = float(statistics.median(values)) if values else None
    return Row(**out)


@dataclass
class StepProfile:
    """A decode step's time split. `step`: per-step totals, median over the profiled steps; `layers`: one Row per
    decoder layer (index = layer), median per layer; `outside`: the step's time outside the layers; `steps`: every
    profiled step's totals."""

    step: Row
    layers: list[Row]
    outside: Row
    steps: list[Row]
    unprofiled_step_ms: float  # median wall time of a step without the profiler (same number of steps)
    device: str
    cuda: bool  # device events measured (gpu_kernels, transfers, kernels, launches)
    cpu_experts_source: str  # "profiler" (worker thread traced), "perf_counter" (moved onto its clock) or "none"
    layers_traced: bool = True  # False: the layers ran inside CUDA graphs, their time is in `outside`
    prompt_tokens: int = 0
    warmup: int = 0
    layer_steps: list[list[Row]] = field(default_factory=list, repr=False)  # [step][layer], unmedianed

    @property
    def profiled_step_ms(self) -> float:
        return self.step.wall_ms

    @property
    def profiler_slowdown(self) -> float | None:
        """Profiled step time / unprofiled step time."""
        return self.step.wall_ms / self.unprofiled_step_ms if self.unprofiled_step_ms > 0 else None

    def as_dict(self) -> dict:
        slowdown = self.profiler_slowdown
        return {
            "device": self.device,
            "cuda": self.cuda,
            "prompt_tokens": self.prompt_tokens,
            "warmup_steps": self.warmup,
            "profiled_steps": len(self.steps),
            "profiled_step_ms": round(self.profiled_step_ms, 4),
            "unprofiled_step_ms": round(self.unprofiled_step_ms, 4),
            "profiler_slowdown": None if slowdown is None else round(slowdown, 3),
            "cpu_experts_source": self.cpu_experts_source,
            "layers_traced": self.layers_traced,
            "definitions": {
                "overhead_ms": "wall - |union(gpu kernels, transfers, cpu experts) within wall|",
                "overhead_simple_ms": "wall - gpu_kernels - cpu_experts (the issue's definition; < 0 on overlap)",
                "median": "every value is the median over the profiled steps, field by field",
            },
            "step": self.step.as_dict(),
            "outside_layers": self.outside.as_dict(),
            "layers": [r.as_dict() for r in self.layers],
            "per_step": [r.as_dict() for r in self.steps],
        }

    def table(self) -> str:
        """A fixed-width text table: one line per decoder layer, the time outside the layers, the step total."""
        slowdown = self.profiler_slowdown
        lines = [
            f"decode step on {self.device}: {len(self.steps)} profiled steps, medians in ms; profiled step "
            f"{self.profiled_step_ms:.3f} ms, unprofiled {self.unprofiled_step_ms:.3f} ms"
            + (f" (profiler x{slowdown:.2f})" if slowdown is not None else ""),
            "overhead = wall - |gpu U xfer U cpu-exp| (nothing useful running); simple = wall - gpu - cpu-exp",
        ]
        if not self.cuda:
            lines.append("no device events (CPU model): gpu and xfer are 0, the emulated GPU side is overhead")
        if not self.layers_traced:
            lines.append("layers not traced (the step replays CUDA graphs): their time is in 'outside'; eager=True")
        head = ("layer", "wall", "gpu", "xfer", "cpu-exp", "overhead", "simple", "syncs", "sync-wait", "launches")
        widths = (8, 9, 9, 9, 9, 9, 9, 6, 9, 8)
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        lines.append(fmt.format(*head))

        def num(v, spec=".3f"):
            return "-" if v is None else format(v, spec)

        def line(name, r: Row):
            return fmt.format(
                name,
                num(r.wall_ms),
                num(r.gpu_kernels_ms),
                num(r.transfers_ms),
                num(r.cpu_experts_ms),
                num(r.overhead_ms),
                num(r.overhead_simple_ms),
                num(r.syncs, "g"),
                num(r.sync_wait_ms),
                num(r.launches, "g"),
            )

        lines += [line(str(i), r) for i, r in enumerate(self.layers)]
        lines.append(line("outside", self.outside))
        lines.append(line("step", self.step))
        return "\n".join(lines)
