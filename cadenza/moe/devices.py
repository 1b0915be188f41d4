"""Placement over several GPUs of one host (issue: several GPUs): the MoE layers in contiguous blocks, one a device.

At batch 1 a pipeline by layer costs one small activation copy per block boundary, and each GPU holds only its
layers' weights, KV cache and residents; every GPU keeps its own workspace and fetch slots, and the CPU computes
every device's non-resident experts as with one GPU. `plan_devices` chooses the split and, per device, runs the
single-device planner (`placement.plan`) on that device's layers within its budget, so the residents follow the same
rules (popularity, whole layers first).

The split gives each device layers in proportion to what its budget holds beyond its fixed parts, then moves the
boundaries one layer at a time while that keeps more experts resident (a device whose budget exceeds its layers'
experts leaves memory unused; one that cannot hold its layers' always-on parts cannot take them). The non-expert
weights and the KV cache are counted per layer as an even share of the model's (`ModelSizes` keeps totals; the
embeddings and the LM head, on the first and last device, are spread the same way: a few hundred MB off for a
large vocabulary, which the per-device CUDA margin absorbs).

Only the plan exists so far: the executor that runs each block on its device (and `--gpus`) is not built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cadenza.errors import CadenzaError
from cadenza.moe.placement import ModelSizes, Placement, format_size, plan


@dataclass(frozen=True)
class DeviceShare:
    """One device's part: MoE layers [first, stop) and the placement of their experts in its budget (its
    `resident` lists are indexed from the block's first layer)."""

    device: int
    first: int
    stop: int
    placement: Placement

    @property
    def layers(self) -> range:
        return range(self.first, self.stop)

    def summary(self) -> str:
        return f"GPU {self.device}: MoE layers {self.first}-{self.stop - 1}, {self.placement.summary()}"


def segment_sizes(sizes: ModelSizes, first: int, stop: int) -> ModelSizes:
    """The sizes of MoE layers [first, stop) alone: always-on bytes and KV per token as their even share."""
    n, total = stop - first, sizes.num_moe_layers
    lb = sizes.layer_bytes()[first:stop]
    return ModelSizes(
        always_bytes=sizes.always_bytes * n // total,
        kv_bytes_per_token=sizes.kv_bytes_per_token * n // total,
        expert_bytes=max(lb) if lb else 0,
        num_moe_layers=n,
        num_experts=sizes.num_experts,
        layer_expert_bytes=tuple(lb) if sizes.layer_expert_bytes else (),
    )


def plan_devices(
    sizes: ModelSizes,
    budgets: list[int],
    max_context: int,
    workspace_bytes: int,
    popularity: list[list[float]] | None = None,
    fetch_slots: int = 0,
) -> list[DeviceShare]:
    """The MoE layers split over len(budgets) devices (module doc), each block placed in its device's budget.
    CadenzaError when the budgets cannot hold the model's always-on parts, or a device gets no layer."""
    d, total = len(budgets), sizes.num_moe_layers
    if d == 0:
        raise CadenzaError("No GPU budget was given. Give one per GPU, e.g. --gpu-memory 24GiB,24GiB.")
    if any(b <= 0 for b in budgets):
        raise CadenzaError(
            f"Every GPU of a split needs a budget above 0; got {', '.join(format_size(b) for b in budgets)}. "
            "Leave a GPU out of --gpus instead of giving it 0."
        )
    if total < d:
        raise CadenzaError(f"The model has {total} MoE layers, fewer than the {d} GPUs asked for. Use at most {total}.")
    per_layer_fixed = (sizes.always_bytes + sizes.kv_bytes_per_token * max_context) / total
    fixed = workspace_bytes + fetch_slots * sizes.expert_bytes
    room = [max(0.0, b - fixed) for b in budgets]
    if sum(room) < per_layer_fixed * total:
        need = fixed * d + per_layer_fixed * total
        raise CadenzaError(
            f"The GPUs' budgets ({', '.join(format_size(b) for b in budgets)}) hold less than the model's "
            f"always-on weights, KV cache for {max_context} tokens and each GPU's workspace "
            f"({format_size(int(need))} in all). Raise the budgets or lower --max-context."
        )
    counts = _proportional(total, room)
    best = _evaluate(sizes, budgets, counts, max_context, workspace_bytes, popularity, fetch_slots)
    improved = best is not None
    while improved:  # move one layer across one boundary while it keeps more experts resident
        improved = False
        for i in range(d - 1):
            for step in (1, -1):
                trial = list(counts)
                trial[i] += step
                trial[i + 1] -= step
                if min(trial) < 1:
                    continue
                shares = _evaluate(sizes, budgets, trial, max_context, workspace_bytes, popularity, fetch_slots)
                if shares is not None and (best is None or _resident(shares) > _resident(best)):
                    counts, best, improved = trial, shares, True
    if best is None:
        raise CadenzaError(
            f"No split of the {total} MoE layers over budgets of {', '.join(format_size(b) for b in budgets)} "
            "fits every GPU's share of the always-on weights and KV cache. Raise the smallest budget."
        )
    return best


def _proportional(total: int, room: list[float]) -> list[int]:
    """total layers in proportion to room, at least one each (largest remainders)."""
    s = sum(room) or 1.0
    exact = [total * r / s for r in room]
    counts = [max(1, int(x)) for x in exact]
    while sum(counts) > total:
        i = max(range(len(counts)), key=lambda j: (counts[j] - exact[j], counts[j]))
        counts[i] -= 1
    while sum(counts) < total:
        i = max(range(len(counts)), key=lambda j: exact[j] - counts[j])
        counts[i] += 1
    return counts


def _evaluate(sizes, budgets, counts, max_context, workspace_bytes, popularity, fetch_slots):
    """Each device's placement for this split, or None where one cannot hold its layers."""
    shares, first = [], 0
    for device, (budget, n) in enumerate(zip(budgets, counts, strict=True)):
        stop = first + n
        seg = segment_sizes(sizes, first, stop)
        pop = popularity[first:stop] if popularity is not None else None
        try:
            p = plan(seg, budget, max_context, workspace_bytes, pop, fetch_slots=fetch_slots)
        except CadenzaError:
            return None
        shares.append(DeviceShare(device, first, stop, replace(p)))
        first = stop
    return shares


def _resident(shares: list[DeviceShare]) -> int:
    return sum(s.placement.resident_count for s in shares)
