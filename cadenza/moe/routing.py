"""Top-k routing variants as pure functions of the router logits.

Each returns (topk_weights [T, k] float32, topk_ids [T, k] int64); the model file decides which applies.
"""

from __future__ import annotations

import torch


def softmax_topk(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, keep the k largest, optionally renormalise them to sum to 1
    (Mixtral always renormalises; Qwen-MoE and OLMoE say so with `norm_topk_prob`)."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
