"""Mixtral, following transformers/models/mixtral/modeling_mixtral.py (same class and parameter names).

Routing is computed here (router logits -> softmax in fp32 -> top-k -> renormalised weights); the experts sit
behind the shared seam `Experts(x, topk_ids, topk_weights)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cadenza.models.args import ModelArgs
from cadenza.models.common import Attention, AttentionContext, CausalLM, DecoderModel, RMSNorm
from cadenza.models.rope import RotaryEmbedding
from cadenza.moe.experts import Experts
from cadenza.moe.routing import softmax_topk


@dataclass
class MixtralConfig(ModelArgs):
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    sliding_window: int | None = None

    DEFAULT_ROPE_THETA = 1e6

    @classmethod
    def from_hf(cls, cfg: dict) -> MixtralConfig:
        return cls(
            **cls.common_fields(cfg),
            num_local_experts=cls.require(cfg, "num_local_experts"),
            num_experts_per_tok=cls.require(cfg, "num_experts_per_tok"),
            sliding_window=cfg.get("sliding_window"),
        )


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Experts(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            names=("w1", "w3", "w2"),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)  # [B*T, H]
        router_logits = self.gate(x)  # [B*T, E]
        topk_weights, topk_ids = softmax_topk(router_logits, self.top_k, norm_topk_prob=True)
        return self.experts(x, topk_ids, topk_weights).reshape(b, t, h)


class MixtralDecoderLayer(nn.Module):
    def __init__(self, config: MixtralConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
        )
        self.block_sparse_moe = MixtralSparseMoeBlock(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), ctx)
        return hidden_states + self.block_sparse_moe(self.post_attention_layernorm(hidden_states))


class MixtralModel(DecoderModel):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.sliding_window = config.sliding_window
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MixtralDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)


class MixtralForCausalLM(CausalLM):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.config = config
        self.model = MixtralModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
