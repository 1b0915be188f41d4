"""Top-k routing variants as pure functions of the router logits.

Each returns (topk_weights [T, k] float32, topk_ids [T, k] int64); the model file decides which applies.
"""

from __future__ import annotations

import torch


def softmax_topk(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, keep the k largest, optionally renormalise them to sum to 1
    (Mixtral always renormalises; Qwen-MoE and OLMoE say so with `norm_topk_prob`). On a GPU: one fused launch
    (cadenza.kernels.gpu_fused, the same arithmetic) instead of five."""
    if router_logits.is_cuda:
        from cadenza.kernels import gpu_fused  # (imports Triton: only where a GPU runs the model)

        if gpu_fused.topk_fits(router_logits, top_k):
            return gpu_fused.softmax_topk(router_logits, top_k, norm_topk_prob)
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _keep_groups(scores: torch.Tensor, group_scores: torch.Tensor, topk_group: int, fill: float) -> torch.Tensor:
    """scores [T, E] with every expert outside the `topk_group` best groups (group_scores [T, G]) set to `fill`."""
    t, e = scores.shape
    g = group_scores.shape[1]
    kept = torch.topk(group_scores, topk_group, dim=-1).indices  # [T, topk_group]
    mask = torch.zeros(t, g, dtype=torch.bool, device=scores.device).scatter_(1, kept, True)  # [T, G]
    return scores.masked_fill(~mask.repeat_interleave(e // g, dim=1), fill)


def softmax_group_topk(
    router_logits: torch.Tensor,
    top_k: int,
    topk_method: str = "greedy",
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2's router: softmax over all experts in fp32, then the k best, either among all experts
    ("greedy") or among the experts of the `topk_group` groups (of `n_group` equal groups) with the highest single
    expert score ("group_limited_greedy"); the weights are the softmax scores times `routed_scaling_factor`, not
    renormalised (transformers' DeepseekV2TopkRouter; it reads no norm_topk_prob)."""
    scores = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    if topk_method == "group_limited_greedy":
        group_scores = scores.view(scores.shape[0], n_group, -1).amax(dim=-1)  # [T, G]
        scores = _keep_groups(scores, group_scores, topk_group, 0.0)
    weights, ids = torch.topk(scores, top_k, dim=-1)  # [T, k]
    return weights * routed_scaling_factor, ids


def sigmoid_group_topk(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router ("noaux_tc"): sigmoid scores in fp32; the choice uses scores plus the load-balancing
    bias `e_score_correction_bias`: the `topk_group` groups whose two best biased scores sum highest, then the k best
    biased scores among their experts. The weights are the unbiased scores of the chosen experts, renormalised to
    sum to 1 when `norm_topk_prob`, times `routed_scaling_factor`."""
    scores = torch.sigmoid(router_logits.float())  # [T, E]
    choice = scores + e_score_correction_bias.float()  # [T, E]
    if n_group > 1 and topk_group < n_group:  # keeping every group changes nothing
        group_scores = choice.view(choice.shape[0], n_group, -1).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        choice = _keep_groups(choice, group_scores, topk_group, float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def softmax_biased_topk(
    router_logits: torch.Tensor, e_score_correction_bias: torch.Tensor, top_k: int, norm_min: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ERNIE-4.5's router: softmax over all experts in fp32; the choice uses the probabilities plus the
    load-balancing bias `e_score_correction_bias` ([E] or [1, E]); the weights are the unbiased probabilities of the
    chosen experts, renormalised to sum to 1 with the sum clamped below at `norm_min` (transformers'
    Ernie4_5_MoeTopKRouter)."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    ids = torch.topk(probs + e_score_correction_bias.float().reshape(-1), top_k, dim=-1).indices  # [T, k]
    weights = probs.gather(1, ids)
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=norm_min), ids
