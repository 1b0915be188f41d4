"""The expert seam: `experts(x, topk_ids, topk_weights) -> y`, wherever each expert lives.

A family's MoE block computes routing in plain view and calls this module; it never knows where an expert's
weights are. The weights of all experts of a layer are stacked ([E, I, H] for gate and up, [E, H, I] for down);
parameter names keep the checkpoint's (Mixtral: w1 gate, w3 up, w2 down; Qwen/OLMoE: gate_proj, up_proj,
down_proj), so `experts.{e}.{name}.weight` in a checkpoint lands in row e of the stacked parameter `{name}`.
"""

from __future__ import annotations

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

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return run_experts(x, topk_ids, topk_weights, self.gate, self.up, self.down, self.act_fn)


def run_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    act,
) -> torch.Tensor:
    """Tokens grouped by expert, one SwiGLU per expert that has tokens, results weighted and summed per token.

    x [T, H]; topk_ids, topk_weights [T, k]; gate, up [E, I, H]; down [E, H, I] -> y [T, H] in x's dtype.
    """
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)  # [T*k]
    flat_w = topk_weights.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=gate.shape[0]).tolist()  # one host sync per layer
    y = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        tokens = pairs // k
        xe = x[tokens]  # [n, H]
        h = act(xe @ gate[e].T) * (xe @ up[e].T)  # [n, I]
        ye = (h @ down[e].T) * flat_w[pairs, None]  # [n, H], float32 through the routing weight
        y.index_add_(0, tokens, ye.to(x.dtype))
    return y
