"""DeepSeek-V3 (V3, V3.1, R1, Kimi-K2), following transformers/models/deepseek_v3/modeling_deepseek_v3.py (same
class and parameter names).

The layers are DeepSeek-V2's (deepseek_v2.py: MLA, dense first layers, shared experts); two things differ:
- the router ("noaux_tc"): sigmoid scores plus a learned load-balancing bias `e_score_correction_bias` (the bias
  and the router's weight kept in float32, as the reference keeps them) choose the experts, group by group; the
  unbiased scores, renormalised and scaled, weight them (cadenza/moe/routing.py: sigmoid_group_topk);
- `rope_interleave` says whether the rotary dimensions come as interleaved pairs (the default, DeepSeek's layout)
  or as two halves.
The published weights are block-quantized fp8; the loader dequantizes them (cadenza/checkpoint.py: BlockFP8). Their
multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`) serves speculative decoding and is not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.models.deepseek_v2 import (
    DeepseekV2Config,
    DeepseekV2DecoderLayer,
    DeepseekV2ForCausalLM,
    DeepseekV2Model,
    DeepseekV2Moe,
    DeepseekV2TopkRouter,
)
from cadenza.models.mla import MultiHeadLatentAttention
from cadenza.moe.routing import sigmoid_group_topk


@dataclass
class DeepseekV3Config(DeepseekV2Config):
    n_group: int = 1
    topk_group: int = 1
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 0  # multi-token-prediction layers in the checkpoint (not loaded)

    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        n_shared_experts=1,
        first_k_dense_replace=3,
        moe_layer_freq=1,
        topk_method="noaux_tc",
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )

    @classmethod
    def from_hf(cls, cfg: dict) -> DeepseekV3Config:
        fields = cls.deepseek_fields(cfg)
        # transformers' V3 router is always noaux_tc, whatever topk_method says; no groups is one group
        fields["n_group"] = fields["n_group"] or 1
        fields["topk_group"] = fields["topk_group"] or fields["n_group"]
        config = cls(
            **fields,
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            num_nextn_predict_layers=int(cfg.get("num_nextn_predict_layers") or 0),
        )
        config.check_groups(config.n_group, config.topk_group)
        if config.n_group > 1 and config.n_routed_experts // config.n_group < 2:
            raise CadenzaError(
                f"config.json splits {config.n_routed_experts} experts into n_group={config.n_group} groups; "
                "DeepSeek-V3 ranks groups by their two best experts, so each group needs at least 2. Fix n_group."
            )
        return config


class DeepseekV3TopkRouter(DeepseekV2TopkRouter):
    """The router's weight [E, H] and its score correction bias [E] (checkpoint: `mlp.gate.weight`,
    `mlp.gate.e_score_correction_bias`)."""

    # the loader keeps these in float32 whatever the compute dtype, as transformers does (_keep_in_fp32_modules_strict)
    keep_float32 = ("weight", "e_score_correction_bias")

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.e_score_correction_bias = nn.Parameter(torch.empty(config.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_weights [T, k] float32, topk_ids [T, k]."""
        c = self.config
        return sigmoid_group_topk(
            self.router_logits(x),
            self.e_score_correction_bias,
            c.num_experts_per_tok,
            c.n_group,
            c.topk_group,
            c.norm_topk_prob,
            c.routed_scaling_factor,
        )


class DeepseekV3MoE(DeepseekV2Moe):
    router_class = DeepseekV3TopkRouter


class DeepseekV3Attention(MultiHeadLatentAttention):
    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__(config, layer_idx, rope_interleave=config.rope_interleave)


class DeepseekV3DecoderLayer(DeepseekV2DecoderLayer):
    attention_class = DeepseekV3Attention
    moe_class = DeepseekV3MoE


class DeepseekV3Model(DeepseekV2Model):
    decoder_layer_class = DeepseekV3DecoderLayer


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    model_class = DeepseekV3Model
