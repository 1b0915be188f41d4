"""One planning function for every caller (`LLM`, `cadenza info`): the placement a budget gives a model.

What every token needs (attention, norms, router, shared experts, embeddings), the KV cache of `max_batch` whole
contexts and the activation workspace of one prefill chunk are reserved first; the fetch slots the policy needs
next; routed experts fill the rest (cadenza.moe.placement.plan).
"""

from __future__ import annotations

import torch

from cadenza.moe.devices import DeviceShare, place_blocks, plan_devices
from cadenza.moe.offload import policy
from cadenza.moe.placement import Placement, plan

CUDA_MARGIN = 256 * 1024 * 1024  # cuBLAS workspaces and the allocator's rounding, on a real GPU


def workspace_bytes(config, dtype: torch.dtype, max_context: int, chunk: int, margin: int, experts: int = 0) -> int:
    """GPU activation memory for one prefill chunk: hidden states and attention projections, a few expert
    intermediates, the [T, S] mask, logits, plus a margin; on a real GPU (a margin) also the experts a big step
    dequantizes at once (gpu_grouped.dequant_workspace, a chunk of a layer's `experts` routed experts)."""
    from cadenza.kernels.gpu_grouped import dequant_workspace

    elem = torch.empty((), dtype=dtype).element_size()
    h, i = config.hidden_size, config.intermediate_size
    heads = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    per_token = (8 * h + 4 * i + 4 * heads) * elem
    expert_i = getattr(config, "moe_intermediate_size", None) or i
    dequant = dequant_workspace(h, expert_i, elem, experts) if margin else 0
    per_token += getattr(config, "linear_workspace_per_token", 0)  # a linear-attention layer's chunked pass
    return chunk * per_token + chunk * max_context + 8 * config.vocab_size + margin + dequant


def plan_offload(
    sizes,
    config,
    dtype: torch.dtype,
    budget_bytes: int,
    policy_name: str,
    max_context: int,
    max_batch: int,
    chunk: int,
    popularity=None,
    cuda: bool = True,
    micro_batches: int = 1,
) -> Placement:
    """The placement of a model (`sizes`: models.model_sizes) in a GPU budget of `budget_bytes` under an offload
    policy, for `max_batch` sequences of `max_context` tokens prefilled in chunks of `chunk`; popularity: a
    [layers][experts] matrix (a `cadenza profile` file) or None (even). cuda: a real GPU (keeps a margin).
    micro_batches > 1: fetch slots for a whole layer; a `max_batch` whose steps want every expert: more slots and
    residents spread over the layers (policy.fetch_slots, policy.placement_fill)."""
    slots, workspace, fill = _terms(
        sizes, config, dtype, policy_name, max_context, max_batch, chunk, cuda, micro_batches
    )
    return plan(sizes, budget_bytes, max_context * max_batch, workspace, popularity, fetch_slots=slots, fill=fill)


def _terms(sizes, config, dtype, policy_name, max_context, max_batch, chunk, cuda, micro_batches=1):
    """(fetch slots, workspace bytes, fill) a device's plan reserves for this policy and batch."""
    k, e = getattr(config, "num_experts_per_tok", 2), sizes.num_experts
    slots = policy.fetch_slots(policy_name, k, e if micro_batches > 1 else 0, max_batch, e, sizes.expert_bytes)
    workspace = workspace_bytes(config, dtype, max_context, chunk, CUDA_MARGIN if cuda else 0, e)
    # a sequence's fixed-size cache (linear-attention states) is reserved with the pass's buffers, once per slot
    workspace += max_batch * sizes.kv_bytes_per_sequence
    return slots, workspace, policy.placement_fill(policy_name, max_batch, k, e)


def plan_split(
    sizes,
    config,
    dtype: torch.dtype,
    budgets: list[int],
    policy_name: str,
    max_context: int,
    max_batch: int,
    chunk: int,
    popularity=None,
    cuda: bool = True,
    edge_bytes: int = 0,
    counts: list[int] | None = None,
) -> list[DeviceShare]:
    """`plan_offload` over several devices (cadenza.moe.devices): each device keeps its own workspace and fetch
    slots within its budget; the first holds the `edge_bytes` (embeddings, LM head) too. counts: the MoE layers
    each device holds already (a new plan once the weights are placed), else the split is chosen here."""
    slots, workspace, fill = _terms(sizes, config, dtype, policy_name, max_context, max_batch, chunk, cuda)
    args = (max_context * max_batch, workspace, popularity, slots, fill, edge_bytes)
    if counts is not None:
        return place_blocks(sizes, budgets, counts, *args)
    return plan_devices(sizes, budgets, *args)


def default_budget(device: torch.device) -> int:
    """The GPU's free memory plus what this process already holds (a re-plan reuses the old placement's memory),
    less room for the CUDA context and other users."""
    free, total = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device)
    return max(0, free + held - max(1 << 30, total // 20))
