"""Mixtral, following transformers/models/mixtral/modeling_mixtral.py (same class and parameter names).

Routing is computed here (router logits -> softmax in fp32 -> top-k -> renormalised weights); the experts sit
behind the shared seam `Experts(x, topk_ids, topk_weights)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cadenza.models.args import ModelArgs
from cadenza.models.attention import Attention
from cadenza.models.common import CausalLM, DecoderLayer, DecoderModel, SparseMoeBlock


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


class MixtralSparseMoeBlock(SparseMoeBlock):
    """Softmax top-k routing, the k weights always renormalised (SparseMoeBlock's default route)."""

    def __init__(self, config: MixtralConfig):
        super().__init__(config, config.num_local_experts, config.intermediate_size, names=("w1", "w3", "w2"))
        self.top_k = config.num_experts_per_tok


class MixtralDecoderLayer(DecoderLayer):
    mlp_name = "block_sparse_moe"

    def __init__(self, config: MixtralConfig, layer_idx: int):
        super().__init__(config, Attention(config, layer_idx), MixtralSparseMoeBlock(config))


class MixtralModel(DecoderModel):
    def __init__(self, config: MixtralConfig):
        super().__init__(config, MixtralDecoderLayer)
        self.sliding_window = config.sliding_window


class MixtralForCausalLM(CausalLM):
    def __init__(self, config: MixtralConfig):
        super().__init__(config, MixtralModel(config))
