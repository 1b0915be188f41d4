"""Placement over several GPUs of one host (issue: several GPUs): the MoE layers in contiguous blocks, one a device.

At batch 1 a pipeline by layer costs one small activation copy per block boundary, and each GPU holds only its
layers' weights, KV cache and residents; every GPU keeps its own workspace and fetch slots, and the CPU computes
every device's non-resident experts as with one GPU. `plan_devices` chooses the split and, per device, runs the
single-device planner (`placement.plan`) on that device's layers within its budget, so the residents follow the same
rules (popularity, whole layers first).

The split gives each device layers in proportion to what its budget holds beyond its fixed parts, then moves the
boundaries one layer at a time while that keeps more experts resident (a device whose budget exceeds its layers'
experts leaves memory unused; one that cannot hold its layers' always-on parts cannot take them). The non-expert
weights and the KV cache are counted per layer as an even share of the model's (`ModelSizes` keeps totals), less
`edge_bytes` (the embeddings, the final norm and the LM head), which the first device holds whole: tokens enter and
logits leave there.

The executor: cadenza.layer_split (each decoder layer's device, the weights' devices at load) and
cadenza.moe.offload.stages (one Orchestra a device).
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


def segment_sizes(sizes: ModelSizes, first: int, stop: int, edge: int = 0, edge_bytes: int = 0) -> ModelSizes:
    """The sizes of MoE layers [first, stop) alone: always-on bytes (less the model's `edge_bytes`, plus this
    device's `edge`) and KV per token as their even share."""
    n, total = stop - first, sizes.num_moe_layers
    lb = sizes.layer_bytes()[first:stop]
    return ModelSizes(
        always_bytes=(sizes.always_bytes - edge_bytes) * n // total + edge,
        kv_bytes_per_token=sizes.kv_bytes_per_token * n // total,
        expert_bytes=max(lb) if lb else 0,
        num_moe_layers=n,
        num_experts=sizes.num_experts,
        layer_expert_bytes=tuple(lb) if sizes.layer_expert_bytes else (),
        kv_bytes_per_sequence=sizes.kv_bytes_per_sequence * n // total,
    )


def plan_devices(
    sizes: ModelSizes,
    budgets: list[int],
    max_context: int,
    workspace_bytes: int,
    popularity: list[list[float]] | None = None,
    fetch_slots: int = 0,
    fill: str = "layers",
    edge_bytes: int = 0,
) -> list[DeviceShare]:
    """The MoE layers split over len(budgets) devices (module doc), each block placed in its device's budget
    (fetch_slots and fill: `placement.plan`'s, per device). CadenzaError when the budgets cannot hold the model's
    always-on parts, or a device gets no layer."""
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
    edge_bytes = min(edge_bytes, sizes.always_bytes)
    per_layer_fixed = (sizes.always_bytes - edge_bytes + sizes.kv_bytes_per_token * max_context) / total
    fixed = workspace_bytes + fetch_slots * sizes.expert_bytes
    room = [max(0.0, b - fixed - (edge_bytes if i == 0 else 0)) for i, b in enumerate(budgets)]
    if sum(room) < per_layer_fixed * total:
        need = fixed * d + edge_bytes + per_layer_fixed * total
        raise CadenzaError(
            f"The GPUs' budgets ({', '.join(format_size(b) for b in budgets)}) hold less than the model's "
            f"always-on weights, KV cache for {max_context} tokens and each GPU's workspace "
            f"({format_size(int(need))} in all). Raise the budgets or lower --max-context."
        )
    counts = _proportional(total, room)
    args = (sizes, budgets, max_context, workspace_bytes, popularity, fetch_slots, fill, edge_bytes)
    best = _evaluate(counts, *args)
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
                shares = _evaluate(trial, *args)
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


def place_blocks(
    sizes: ModelSizes,
    budgets: list[int],
    counts: list[int],
    max_context: int,
    workspace_bytes: int,
    popularity: list[list[float]] | None = None,
    fetch_slots: int = 0,
    fill: str = "layers",
    edge_bytes: int = 0,
) -> list[DeviceShare]:
    """Each device's placement for a split already made (`counts` MoE layers each, in order): a new budget or
    policy once the weights sit on their devices. CadenzaError naming the device that cannot hold its layers."""
    shares, first = [], 0
    edge_bytes = min(edge_bytes, sizes.always_bytes)
    for device, (budget, n) in enumerate(zip(budgets, counts, strict=True)):
        stop = first + n
        seg = segment_sizes(sizes, first, stop, edge_bytes if device == 0 else 0, edge_bytes)
        pop = popularity[first:stop] if popularity is not None else None
        try:
            p = plan(seg, budget, max_context, workspace_bytes, pop, fetch_slots=fetch_slots, fill=fill)
        except CadenzaError as exc:
            raise CadenzaError(f"GPU {device} (MoE layers {first}-{stop - 1}): {exc}") from None
        shares.append(DeviceShare(device, first, stop, replace(p)))
        first = stop
    return shares


def merged(shares: list[DeviceShare]) -> Placement:
    """The devices' placements as one (every MoE layer's residents, the sums of their memory): what a
    single-device caller reads (`LLM.placement`, the server's and the benchmarks' reports)."""
    ps = [s.placement for s in shares]
    layer_bytes = sum((list(p.layer_expert_bytes) or [p.expert_bytes] * len(p.resident) for p in ps), [])
    expert_bytes = max(p.expert_bytes for p in ps)
    budgets = [p.budget_bytes for p in ps]
    return Placement(
        resident=[ids for p in ps for ids in p.resident],
        fetch_slots=sum(p.fetch_slots for p in ps),
        budget_bytes=None if None in budgets else sum(budgets),
        always_bytes=sum(p.always_bytes for p in ps),
        kv_bytes=sum(p.kv_bytes for p in ps),
        workspace_bytes=sum(p.workspace_bytes for p in ps),
        expert_bytes=expert_bytes,
        num_experts=ps[0].num_experts,
        layer_expert_bytes=tuple(layer_bytes) if len(set(layer_bytes)) > 1 else (),
    )


def _evaluate(counts, *args):
    """Each device's placement for this split, or None where one cannot hold its layers."""
    try:
        return place_blocks(args[0], args[1], counts, *args[2:])
    except CadenzaError:
        return None


def _resident(shares: list[DeviceShare]) -> int:
    return sum(s.placement.resident_count for s in shares)
