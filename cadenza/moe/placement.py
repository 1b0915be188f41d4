"""Where each routed expert lives: a pure planner from model sizes and a GPU budget to a placement.

The GPU holds, in this order of priority: the always-on part (non-expert weights), the KV cache, a workspace,
slots for experts fetched from the host on demand, and then as many routed experts as still fit ("residents").
Everything else stays in host memory. No CUDA here: the caller measures sizes from safetensors headers and
passes them in, so the planner is unit-testable on a CPU.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from cadenza.errors import CadenzaError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# Single letters mean the binary unit ("24G" == 24GiB, as nvidia-smi and most users mean it); "GB" is 10^9.
_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "ki": KiB,
    "kib": KiB,
    "kb": 10**3,
    "m": MiB,
    "mi": MiB,
    "mib": MiB,
    "mb": 10**6,
    "g": GiB,
    "gi": GiB,
    "gib": GiB,
    "gb": 10**9,
    "t": TiB,
    "ti": TiB,
    "tib": TiB,
    "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_EXAMPLES = '"24GiB", "24G" (the same), "24GB" (10^9 bytes), "512MiB", "1.5GiB" or "0" (every expert on the host)'


def parse_size(text: str | int | float, name: str = "Memory size") -> int:
    """A memory size in bytes from "24GiB", "24 GiB", "24G" (== GiB), "24GB" (10^9), "512MiB", "1.5GiB", "0"...

    The rule: text needs a unit (case-insensitive; "B" for bytes), except "0", which needs none; a bare number
    such as "24" is refused with the fix ("24GiB" or "24GB"), since it would mean 24 bytes and was surely meant as
    GiB. An int or float (the Python API) is a number of bytes (fractions of a byte are dropped). Raises
    CadenzaError for text that is not a size, or for a negative size; its message starts with `name` (the CLI
    passes its flag, e.g. "--gpu-memory").
    """
    if isinstance(text, bool):  # bool is an int subclass; True is never meant as "1 byte"
        raise CadenzaError(f"{name} {text!r} is not a size. Give a number with a unit, e.g. {_SIZE_EXAMPLES}.")
    if isinstance(text, int | float):
        if not math.isfinite(text) or text < 0:
            raise CadenzaError(
                f"{name} {text!r} is not a size: it must be a finite number of bytes, 0 or more. "
                f"Give e.g. {_SIZE_EXAMPLES}."
            )
        return int(text)
    stripped = str(text).strip()
    if stripped.startswith("-"):
        raise CadenzaError(f"{name} {text!r} is negative. Give a size of 0 or more, e.g. {_SIZE_EXAMPLES}.")
    match = _SIZE_RE.match(stripped)
    if match is None or match.group(2).lower() not in _UNITS:
        raise CadenzaError(f"{name} {text!r} is not a size I can read. Give e.g. {_SIZE_EXAMPLES}.")
    number, unit = match.groups()
    if not unit and Fraction(number) != 0:
        raise CadenzaError(
            f"{name} {text!r} has no unit, and a bare number would be bytes. Write {number}GiB (or {number}GB "
            f"for 10^9 bytes), or {number}B if you mean bytes; sizes are e.g. {_SIZE_EXAMPLES}."
        )
    # Fraction, not float: "3.2GiB" must give exactly floor(3.2 * 2^30), the value refusal messages promise.
    return math.floor(Fraction(number) * _UNITS[unit.lower()])


def format_size(n: int) -> str:
    """A byte count for messages: "23.50 GiB", "512.0 MiB", "3.0 KiB", "17 B"."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    if abs(n) >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{n} B"


@dataclass(frozen=True)
class ModelSizes:
    """What the planner needs, all in bytes, computed by the caller from safetensors headers (no tensor data).

    always_bytes: non-expert weights that always live on the GPU (embeddings, attention, norms, routers, shared
    experts, dense layers, LM head). kv_bytes_per_token: KV cache bytes per token of context, all layers;
    kv_bytes_per_sequence: the cache's bytes per sequence whatever its length (linear-attention states).
    expert_bytes: one routed expert (gate + up + down), the largest layer's (what a fetch slot holds).
    num_moe_layers: MoE layers, numbered 0..num_moe_layers-1 by their ordinal among MoE layers. num_experts: routed
    experts per MoE layer. layer_expert_bytes: one expert of each MoE layer where layers differ (a GGUF's Q4_K_M
    keeps some layers' down projections in Q6_K, others in Q4_K); empty: expert_bytes in every layer.
    """

    always_bytes: int
    kv_bytes_per_token: int
    expert_bytes: int
    num_moe_layers: int
    num_experts: int
    layer_expert_bytes: tuple[int, ...] = ()
    kv_bytes_per_sequence: int = 0  # a sequence's fixed-size cache (Qwen3-Next's linear layers' states), any length

    def __post_init__(self):
        # Sizes come from code reading headers, not from users: a negative one is a bug, hence ValueError.
        for name in (
            "always_bytes", "kv_bytes_per_token", "expert_bytes", "num_moe_layers", "num_experts",
            "kv_bytes_per_sequence",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"ModelSizes.{name} must be >= 0, got {getattr(self, name)}")
        lb = self.layer_expert_bytes
        if lb and (len(lb) != self.num_moe_layers or min(lb) < 0 or max(lb) != self.expert_bytes):
            raise ValueError(f"ModelSizes.layer_expert_bytes {lb} must give each layer, the largest expert_bytes")

    def layer_bytes(self) -> list[int]:
        """One expert's bytes in each MoE layer."""
        return list(self.layer_expert_bytes) or [self.expert_bytes] * self.num_moe_layers


@dataclass
class Placement:
    """The plan: which routed experts are resident on the GPU, and how much GPU memory each part takes."""

    resident: list[list[int]]  # per MoE layer, the sorted expert ids kept on the GPU
    fetch_slots: int  # GPU slots (one expert's bytes each) reserved for experts fetched from the host
    budget_bytes: int | None  # None = unlimited; 0 = every routed expert on the host
    always_bytes: int
    kv_bytes: int
    workspace_bytes: int
    expert_bytes: int  # the largest layer's expert: what a fetch slot holds
    num_experts: int
    layer_expert_bytes: tuple[int, ...] = ()  # per MoE layer where layers differ (ModelSizes.layer_expert_bytes)
    _sets: list[set[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._sets = [set(ids) for ids in self.resident]

    def is_resident(self, layer: int, expert: int) -> bool:
        """Whether expert `expert` of MoE layer `layer` lives on the GPU (O(1))."""
        return expert in self._sets[layer]

    @property
    def resident_count(self) -> int:
        """Routed experts on the GPU, all layers."""
        return sum(len(ids) for ids in self.resident)

    @property
    def total_experts(self) -> int:
        """Routed experts in the model, all layers."""
        return len(self.resident) * self.num_experts

    @property
    def expert_gpu_bytes(self) -> int:
        """GPU bytes of residents plus fetch slots."""
        if not self.layer_expert_bytes:
            return (self.resident_count + self.fetch_slots) * self.expert_bytes
        resident = sum(len(ids) * b for ids, b in zip(self.resident, self.layer_expert_bytes, strict=True))
        return resident + self.fetch_slots * self.expert_bytes

    @property
    def gpu_bytes(self) -> int:
        """GPU bytes of the whole plan: always + KV + workspace + (residents + fetch slots) * expert bytes."""
        return self.always_bytes + self.kv_bytes + self.workspace_bytes + self.expert_gpu_bytes

    @property
    def resident_fraction(self) -> float:
        """Share of routed experts on the GPU (1.0 for a model without routed experts)."""
        return self.resident_count / self.total_experts if self.total_experts else 1.0

    def expected_gpu_share(self, popularity: list[list[float]] | None = None) -> float:
        """Share of expert-token work that falls on resident experts.

        With `popularity` ([num_moe_layers][num_experts] counts or shares), the resident experts' part of the
        total; without it (or when it is all zero), resident_fraction, i.e. assuming uniform routing.
        """
        if popularity is None:
            return self.resident_fraction
        pop = _check_popularity(popularity, len(self.resident), self.num_experts, "the popularity matrix", "")
        total = sum(sum(row) for row in pop)
        if total == 0:
            return self.resident_fraction
        return sum(pop[layer][e] for layer, ids in enumerate(self.resident) for e in ids) / total

    def as_dict(self) -> dict[str, Any]:
        """The plan as a JSON-able dict (sizes in bytes; resident experts as per-layer counts)."""
        return {
            "budget_bytes": self.budget_bytes,
            "gpu_bytes": self.gpu_bytes,
            "always_bytes": self.always_bytes,
            "kv_bytes": self.kv_bytes,
            "workspace_bytes": self.workspace_bytes,
            "expert_bytes": self.expert_bytes,
            "fetch_slots": self.fetch_slots,
            "resident_count": self.resident_count,
            "total_experts": self.total_experts,
            "resident_fraction": self.resident_fraction,
            "resident_per_layer": [len(ids) for ids in self.resident],
        }

    def summary(self) -> str:
        """One line for humans: resident counts, fetch slots, and where the GPU memory goes."""
        counts = [len(ids) for ids in self.resident] or [0]
        per_layer = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
        slots = f"{self.fetch_slots} fetch slot{'' if self.fetch_slots == 1 else 's'}"
        gib = lambda n: f"{n / GiB:.1f}"
        if self.budget_bytes is None:
            gpu, note = f"GPU {gib(self.gpu_bytes)} GiB, no limit", ""
        elif self.budget_bytes == 0:
            gpu, note = f"GPU {gib(self.gpu_bytes)} GiB", "; --gpu-memory 0: every routed expert on the host"
        else:
            gpu, note = f"GPU {gib(self.gpu_bytes)} of {gib(self.budget_bytes)} GiB", ""
        return (
            f"resident {self.resident_count}/{self.total_experts} experts ({100 * self.resident_fraction:.1f}%), "
            f"per layer {per_layer}; {slots}; {gpu} (always {gib(self.always_bytes)}, KV {gib(self.kv_bytes)}, "
            f"workspace {gib(self.workspace_bytes)}, experts {gib(self.expert_gpu_bytes)}){note}"
        )


FILLS = ("layers", "spread")  # where residents go without a popularity matrix (see plan)


def plan(
    sizes: ModelSizes,
    budget_bytes: int | None,
    max_context: int,
    workspace_bytes: int,
    popularity: list[list[float]] | None = None,
    fetch_slots: int = 0,
    fill: str = "layers",
) -> Placement:
    """Choose the resident experts and fetch slots for a GPU budget.

    budget_bytes: None means no limit (every expert resident, no fetch slots). 0 is special: it means "every
    routed expert on the host" (`--gpu-memory 0`): no resident expert and no fetch slot, and the always-on part,
    KV cache and workspace are not checked against it (the caller puts them on the GPU regardless). Any other
    budget must hold always + KV (kv_bytes_per_token * max_context) + workspace, else CadenzaError says the
    smallest budget that works; what is left goes first to up to `fetch_slots` fetch slots, then to as many
    residents as fit. When every expert fits as a resident, all are resident and fetch slots are 0.

    popularity: [num_moe_layers][num_experts] routing counts or shares; the most popular (layer, expert) pairs
    become resident first (ties: lower layer, then lower expert id). Without it, `fill` says where residents go:
    "layers" (default) fills whole layers, first to last: at batch 1 a layer with every expert resident needs no
    host decision (no synchronisation; inside a CUDA graph), and the host's layers meet their misses in pairs
    (the CPU computes one while the link fetches the other) instead of one at a time; "spread" spreads them
    evenly over the layers.
    """
    if fill not in FILLS:
        raise CadenzaError(f"Unknown placement fill {fill!r}. Use one of: {', '.join(FILLS)}.")
    for name, value in (("max_context", max_context), ("workspace_bytes", workspace_bytes)):
        if value < 0:
            raise CadenzaError(f"{name} is {value}, which is negative. Give a value of 0 or more.")
    if fetch_slots < 0:
        raise CadenzaError(f"fetch_slots is {fetch_slots}, which is negative. Ask for 0 or more fetch slots.")
    if budget_bytes is not None and budget_bytes < 0:
        raise CadenzaError(
            f"--gpu-memory is {budget_bytes} bytes, which is negative. Give a size of 0 or more, e.g. {_SIZE_EXAMPLES}."
        )
    num_layers, num_experts, eb = sizes.num_moe_layers, sizes.num_experts, sizes.expert_bytes
    pop = None
    if popularity is not None:
        pop = _check_popularity(popularity, num_layers, num_experts, "the popularity matrix", "")
    kv_bytes = sizes.kv_bytes_per_token * max_context
    required = sizes.always_bytes + kv_bytes + workspace_bytes
    total = num_layers * num_experts

    def placement(resident: list[list[int]], slots: int) -> Placement:
        return Placement(
            resident, slots, budget_bytes, sizes.always_bytes, kv_bytes, workspace_bytes, eb, num_experts,
            sizes.layer_expert_bytes,
        )  # fmt: skip

    if budget_bytes == 0:
        return placement([[] for _ in range(num_layers)], 0)
    if budget_bytes is not None and budget_bytes < required:
        raise CadenzaError(_too_small(budget_bytes, sizes, max_context, workspace_bytes, required))
    spare = None if budget_bytes is None else budget_bytes - required
    per_layer = sizes.layer_bytes()
    if spare is None or eb == 0 or sum(per_layer) * num_experts <= spare:
        return placement([list(range(num_experts)) for _ in range(num_layers)], 0)
    slots = min(fetch_slots, spare // eb)
    if sizes.layer_expert_bytes:
        order = _fill_order(pop, num_layers, num_experts, fill)
        return placement(_fit_bytes(order, per_layer, spare - slots * eb), slots)
    n = min(total, (spare - slots * eb) // eb)
    if pop is not None:
        chosen = _most_popular(pop, n)
    elif fill == "layers":
        chosen = _whole_layers(num_layers, num_experts, n)
    else:
        chosen = _spread_evenly(num_layers, num_experts, n)
    return placement([sorted(ids) for ids in chosen], slots)


def _too_small(budget: int, sizes: ModelSizes, max_context: int, workspace: int, required: int) -> str:
    tenths = -(-required * 10 // GiB)  # ceil(required / 0.1 GiB), in integers so it never rounds below required
    smallest = f"{tenths / 10:.1f}GiB"
    kv_per_1k = sizes.kv_bytes_per_token * 1000
    return (
        f"--gpu-memory {format_size(budget)} is too small: the parts that must be on the GPU need "
        f"{format_size(required)} (always-on weights {format_size(sizes.always_bytes)}, KV cache for "
        f"{max_context} tokens {format_size(sizes.kv_bytes_per_token * max_context)}, workspace "
        f"{format_size(workspace)}), before any routed expert ({format_size(sizes.expert_bytes)} each). "
        f"Fix: raise the budget to at least `--gpu-memory {smallest}`, or lower --max-context "
        f"(every 1000 tokens less saves {format_size(kv_per_1k)} of KV cache), or run on the CPU with --device cpu."
    )


def _most_popular(pop: list[list[float]], n: int) -> list[list[int]]:
    pairs = sorted(
        ((layer, e) for layer, row in enumerate(pop) for e in range(len(row))),
        key=lambda le: (-pop[le[0]][le[1]], le[0], le[1]),
    )
    chosen: list[list[int]] = [[] for _ in pop]
    for layer, e in pairs[:n]:
        chosen[layer].append(e)
    return chosen


def _fill_order(pop: list[list[float]] | None, num_layers: int, num_experts: int, fill: str) -> list[tuple[int, int]]:
    """(layer, expert) pairs in the order they become resident: by popularity, else whole layers first to last,
    else round-robin over the layers (`plan`'s three ways)."""
    if pop is not None:
        pairs = ((layer, e) for layer in range(num_layers) for e in range(num_experts))
        return sorted(pairs, key=lambda le: (-pop[le[0]][le[1]], le[0], le[1]))
    if fill == "layers":
        return [(layer, e) for layer in range(num_layers) for e in range(num_experts)]
    return [(layer, e) for e in range(num_experts) for layer in range(num_layers)]


def _fit_bytes(order: list[tuple[int, int]], per_layer: list[int], room: int) -> list[list[int]]:
    """Residents taken in `order` while their layer's expert still fits in `room` bytes (a larger layer's expert
    that no longer fits leaves room for a smaller layer's)."""
    chosen: list[list[int]] = [[] for _ in per_layer]
    for layer, e in order:
        if per_layer[layer] <= room:
            chosen[layer].append(e)
            room -= per_layer[layer]
    return [sorted(ids) for ids in chosen]


def _whole_layers(num_layers: int, num_experts: int, n: int) -> list[list[int]]:
    full, rest = divmod(n, num_experts) if num_experts else (0, 0)
    return [list(range(num_experts if layer < full else rest if layer == full else 0)) for layer in range(num_layers)]


def _spread_evenly(num_layers: int, num_experts: int, n: int) -> list[list[int]]:
    if num_layers == 0:
        return []
    base, extra = divmod(n, num_layers)
    # The layers that get one more: the centres of `extra` equal stretches, so they are spread over the depth
    # rather than bunched at the front (distinct, since the stretches are at least one layer long).
    more = {(2 * i + 1) * num_layers // (2 * extra) for i in range(extra)}
    # No information prefers any expert, so take ids 0, 1, 2, ...
    return [list(range(min(num_experts, base + (layer in more)))) for layer in range(num_layers)]


def _check_popularity(value: Any, num_layers: int, num_experts: int, where: str, fix: str) -> list[list[float]]:
    """A validated copy of a [num_layers][num_experts] matrix of finite non-negative numbers, else CadenzaError."""

    def bad(problem: str) -> CadenzaError:
        return CadenzaError(
            f"{where[0].upper()}{where[1:]} {problem}; it must be a list of {num_layers} rows (one per MoE layer) "
            f"of {num_experts} finite, non-negative numbers (one per routed expert).{fix}"
        )

    if not isinstance(value, list | tuple):
        raise bad(f"is a {type(value).__name__}, not a list of rows")
    if len(value) != num_layers:
        raise bad(f"has {len(value)} rows")
    out = []
    for layer, row in enumerate(value):
        if not isinstance(row, list | tuple):
            raise bad(f"has row {layer} that is a {type(row).__name__}, not a list")
        if len(row) != num_experts:
            raise bad(f"has {len(row)} numbers in row {layer}")
        for e, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, int | float):
                raise bad(f"has {x!r} at row {layer}, expert {e}, which is not a number")
            if not math.isfinite(x) or x < 0:
                raise bad(f"has {x!r} at row {layer}, expert {e}")
        out.append([float(x) for x in row])
    return out


def load_popularity(path: str | Path, num_moe_layers: int, num_experts: int) -> list[list[float]]:
    """Routing popularity from a JSON file: {"counts": [[...], ...]} (other keys such as "model" are ignored)
    or a bare [[...], ...] list, shaped [num_moe_layers][num_experts]. Raises CadenzaError on any problem."""
    path = Path(path)
    fix = " Make the file with `cadenza profile` for this model, or omit --placement to spread experts evenly."
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CadenzaError(f"Placement file {path} does not exist.{fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CadenzaError(f"Placement file {path} cannot be read ({exc}).{fix}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CadenzaError(f"Placement file {path} is not valid JSON ({exc}).{fix}") from None
    if isinstance(data, dict):
        if "counts" not in data:
            raise CadenzaError(f'Placement file {path} has no "counts" key (it has {sorted(data)}).{fix}')
        data = data["counts"]
    return _check_popularity(data, num_moe_layers, num_experts, f"the counts in placement file {path}", fix)
