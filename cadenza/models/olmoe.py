"""OLMoE, following transformers/models/olmoe/modeling_olmoe.py (same class and parameter names).

What sets it apart from Mixtral: q and k pass an RMSNorm over the whole projection (all heads at once, before the
split into heads), q, k and v may be clipped to [-clip_qkv, clip_qkv], and the top-k routing weights are
renormalised only when `norm_topk_prob` says so (OLMoE-1B-7B ships false). Routing is computed here; the experts
sit behind the shared seam `Experts(x, topk_ids, topk_weights)`.

Shape legend: B batch, T tokens, H hidden, N query heads, K key/value heads, D head dim, E experts, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cadenza.models.args import ModelArgs
from cadenza.models.attention import Attention
from cadenza.models.common import CausalLM, DecoderLayer, DecoderModel, RMSNorm, SparseMoeBlock


@dataclass
class OlmoeConfig(ModelArgs):
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    attention_bias: bool = False

    DEFAULT_ROPE_THETA = 10000.0

    @classmethod
    def from_hf(cls, cfg: dict) -> OlmoeConfig:
        # transformers' OlmoeConfig defaults rms_norm_eps to 1e-5 (not ModelArgs' 1e-6) when config.json omits it
        cfg = {"rms_norm_eps": 1e-5, **cfg}
        # "num_local_experts" is the alias transformers' attribute_map accepts for "num_experts"
        experts_key = (
            "num_local_experts" if cfg.get("num_experts") is None and "num_local_experts" in cfg else "num_experts"
        )
        clip = cfg.get("clip_qkv")
        return cls(
            **cls.common_fields(cfg),
            num_experts=cls.require(cfg, experts_key),
            num_experts_per_tok=cls.require(cfg, "num_experts_per_tok"),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            clip_qkv=None if clip is None else float(clip),
            attention_bias=bool(cfg.get("attention_bias", False)),
        )


class OlmoeAttention(Attention):
    """Attention whose q and k are RMS-normalised across the full projection width (N*D for q, K*D for k), i.e.
    one norm over all heads together, not per head as in Qwen3; then optionally clipped."""

    def __init__(self, config: OlmoeConfig, layer_idx: int):
        super().__init__(config, layer_idx, qkv_bias=config.attention_bias, o_bias=config.attention_bias)
        self.clip_qkv = config.clip_qkv
        self.q_norm = RMSNorm(config.num_attention_heads * config.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(config.num_key_value_heads * config.head_dim, eps=config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, H] -> q [B, N, T, D], k and v [B, K, T, D]."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)  # [B, T, N*D], [B, T, K*D]
        if self.clip_qkv is not None:  # the clip applies after the norms, as in the reference
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        return q, k, v


class OlmoeSparseMoeBlock(SparseMoeBlock):
    """Softmax over all E in fp32, top-k; the k weights are renormalised only with norm_topk_prob."""

    rounds_weights = True

    def __init__(self, config: OlmoeConfig):
        # transformers names the gate OlmoeTopKRouter; its one parameter lands at `mlp.gate.weight` all the same
        super().__init__(config, config.num_experts, config.intermediate_size)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob


class OlmoeDecoderLayer(DecoderLayer):
    def __init__(self, config: OlmoeConfig, layer_idx: int):
        super().__init__(config, OlmoeAttention(config, layer_idx), OlmoeSparseMoeBlock(config))


class OlmoeModel(DecoderModel):
    def __init__(self, config: OlmoeConfig):
        super().__init__(config, OlmoeDecoderLayer)


class OlmoeForCausalLM(CausalLM):
    def __init__(self, config: OlmoeConfig):
        super().__init__(config, OlmoeModel(config))
