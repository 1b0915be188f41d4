"""The expert seam: `experts(x, topk_ids, topk_weights) -> y`, wherever each expert lives.

A family's MoE block computes routing in plain view and calls this module; it never knows where an expert's
weights are. Work that does not depend on where experts live (shared experts) comes in as `shared`, a callable whose
[T, H] result is added: the offloaded path queues it on the GPU right after handing the CPU its experts, so the two
run at once. The weights of all experts of a layer are stacked ([E, I, H] for gate and up, [E, H, I] for down);
parameter names keep the checkpoint's (Mixtral: w1 gate, w3 up, w2 down; Qwen/OLMoE: gate_proj, up_proj,
down_proj), so `experts.{e}.{name}.weight` in a checkpoint lands in row e of the stacked parameter `{name}`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cadenza.models.common import act_fn


class Experts(nn.Module):
    """A layer's routed SwiGLU experts. Shapes: x [T, H], topk_ids / topk_weights [T, k] -> y [T, H]."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_name, self.up_name, self.down_name = names
        self.act_fn = act_fn(hidden_act)
        self.hidden_act = hidden_act  # the name, for kernels that take the activation by name
        e, h, i = num_experts, hidden_size, intermediate_size
        for name, shape in ((self.gate_name, (e, i, h)), (self.up_name, (e, i, h)), (self.down_name, (e, h, i))):
            self.register_parameter(name, nn.Parameter(torch.empty(shape), requires_grad=False))

    @property
    def gate(self) -> torch.Tensor:
        return getattr(self, self.gate_name)

    @property
    def up(self) -> torch.Tensor:
        return getattr(self, self.up_name)

    @property
    def down(self) -> torch.Tensor:
        return getattr(self, self.down_name)

    def checkpoint_shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """The per-expert tensor names and shapes this module expects in a checkpoint."""
        out = {}
        for name in (self.gate_name, self.up_name, self.down_name):
            shape = tuple(getattr(self, name).shape[1:])
            for e in range(self.num_experts):
                out[f"{prefix}{e}.{name}.weight"] = shape
        return out

    def load_checkpoint_tensor(self, rest: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype):
        """rest: "{e}.{name}.weight". Allocates the stacked parameter on first use, then fills row e."""
        e_str, name, _ = rest.split(".")
        stacked = getattr(self, name)
        if stacked.is_meta:
            stacked = nn.Parameter(torch.empty(stacked.shape, device=device, dtype=dtype), requires_grad=False)
            self.register_parameter(name, stacked)
        stacked.data[int(e_str)].copy_(tensor)

    # Set by the scheduler when routed experts are offloaded (cadenza.moe.scheduler.LayerOffload); None: every
    # expert's weights are in this module's parameters on the compute device.
    offload = None

    def forward(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        shared: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [T, H], topk_ids / topk_weights [T, k] -> sum of the routed experts' weighted outputs [T, H], plus
        `shared()` ([T, H]: the family's always-on experts) when given."""
        if self.offload is not None:
            return self.offload(x, topk_ids, topk_weights, shared)
        counts = torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts).tolist()  # one host sync
        y = torch.zeros_like(x)
        order = expert_order(topk_ids)
        active = [e for e, n in enumerate(counts) if n]
        run_experts(x, topk_ids.shape[1], topk_weights, order, counts, active, self.weights_of, self.act_fn, y)
        return y if shared is None else y + shared()

    def weights_of(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate[e], self.up[e], self.down[e]


def expert_order(topk_ids: torch.Tensor) -> torch.Tensor:
    """(token, slot) pairs [T*k] grouped by expert id; with per-expert counts from the host, expert e's pairs are
    order[offset_e : offset_e + count_e], sliced without a device sync."""
    return torch.argsort(topk_ids.reshape(-1), stable=True)


def offsets(counts: list[int]) -> list[int]:
    out, acc = [], 0
    for n in counts:
        out.append(acc)
        acc += n
    return out


def run_experts(
    x: torch.Tensor,
    k: int,
    topk_weights: torch.Tensor,
    order: torch.Tensor,
    counts: list[int],
    experts: list[int],
    weights_of,
    act,
    y: torch.Tensor,
) -> None:
    """y += sum over the given experts of weight * SwiGLU_e(x) for the tokens routed to them.

    x, y [T, H]; topk_weights [T, k]; order from `expert_order`; counts [E] on the host; weights_of(e) -> (gate
    [I, H], up [I, H], down [H, I]) wherever expert e's weights are (a resident row, a fetched slot, host memory).
    """
    flat_w = topk_weights.reshape(-1)
    starts = offsets(counts)
    for e in experts:
        pairs = order[starts[e] : starts[e] + counts[e]]
        tokens = pairs // k
        gate, up, down = weights_of(e)
        xe = x[tokens]  # [n, H]
        h = act(xe @ gate.T) * (xe @ up.T)  # [n, I]
        ye = (h @ down.T) * flat_w[pairs, None]  # [n, H], float32 through the routing weight
        y.index_add_(0, tokens, ye.to(y.dtype))
