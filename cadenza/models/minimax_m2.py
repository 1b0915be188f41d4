"""MiniMax-M2 (MiniMax-M2, M2.1, M2.5: 230B total, 10B active), following
transformers/models/minimax_m2/modeling_minimax_m2.py (same class and parameter names).

A Mixtral-shaped model (checkpoint names `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1 / w3 / w2`, no
shared experts, no dense layers) with three differences:
- q and k pass an RMSNorm over the whole projection (all heads at once, before the split into heads), as OLMoE's;
- rotary turns only the first head_dim * partial_rotary_factor features of each head; the hub's config.json says it
  as `rotary_dim` (64 of head_dim 128), which transformers reads as partial_rotary_factor = rotary_dim / head_dim;
- the router scores with a sigmoid and chooses by scores plus a load-balancing bias `e_score_correction_bias`
  (checkpoint: `block_sparse_moe.e_score_correction_bias`, on the block, not inside the gate), then weights with the
  unbiased scores renormalised to sum to 1, in one group, unscaled: DeepSeek-V3's rule with one group
  (cadenza/moe/routing.py: sigmoid_group_topk). Router weight and bias take the compute dtype, as in transformers.
The hub's config also carries keys transformers does not read (`scoring_func`, `use_qk_norm`, `qk_norm_type`,
`attn_type_list`, `use_mtp`, `routed_scaling_factor`, ...). The ones that would describe another computation than
transformers' are refused when they say so; the multi-token-prediction modules are not built, so their tensors are
neither expected nor read.

Shape legend: B batch, T tokens, H hidden, N query heads, K key/value heads, D head dim, E experts, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.models.args import ModelArgs
from cadenza.models.common import CausalLM, DecoderLayer, DecoderModel, SparseMoeBlock
from cadenza.models.olmoe import OlmoeAttention
from cadenza.moe.routing import sigmoid_group_topk


@dataclass
class MiniMaxM2Config(ModelArgs):
    num_local_experts: int = 256
    num_experts_per_tok: int = 8

    # what OlmoeAttention reads, fixed for this family: no clipping, no biases
    clip_qkv: ClassVar[float | None] = None
    attention_bias: ClassVar[bool] = False
    DEFAULT_ROPE_THETA = 5e6  # transformers' MiniMaxM2Config.default_theta
    # transformers' MiniMaxM2Config defaults, for keys a config.json leaves out (or sets to null)
    DEFAULTS: ClassVar[dict[str, Any]] = dict(hidden_act="silu", max_position_embeddings=196608, rms_norm_eps=1e-6)

    @classmethod
    def from_hf(cls, cfg: dict) -> MiniMaxM2Config:
        cfg = dict(cfg)
        for key, value in cls.DEFAULTS.items():
            if cfg.get(key) is None:
                cfg[key] = value
        if cfg.get("num_local_experts") is None and cfg.get("num_experts") is not None:  # transformers' attribute_map
            cfg["num_local_experts"] = cfg["num_experts"]
        cls._refuse_other_computations(cfg)
        rotary_dim = cfg.get("rotary_dim")
        nested = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        named = nested.get("partial_rotary_factor") or cfg.get("partial_rotary_factor")
        if rotary_dim is not None and not named:  # the hub's spelling; a partial_rotary_factor named anywhere wins
            head_dim = cfg.get("head_dim") or cls.require(cfg, "hidden_size") // cls.require(cfg, "num_attention_heads")
            if not 0 < int(rotary_dim) <= head_dim:
                raise CadenzaError(
                    f"config.json has rotary_dim={rotary_dim} for heads of head_dim={head_dim}: the rotary features "
                    "must be between 1 and head_dim (MiniMax-M2: 64 of 128). Fix config.json."
                )
            cfg["partial_rotary_factor"] = int(rotary_dim) / head_dim
        config = cls(
            **cls.common_fields(cfg),
            num_local_experts=cls.require(cfg, "num_local_experts"),
            num_experts_per_tok=cls.require(cfg, "num_experts_per_tok"),
        )
        if not 1 <= config.num_experts_per_tok <= config.num_local_experts:
            raise CadenzaError(
                f"config.json routes each token to num_experts_per_tok={config.num_experts_per_tok} of "
                f"num_local_experts={config.num_local_experts} experts; it must be between 1 and num_local_experts. "
                "Fix config.json."
            )
        if not 0.0 < config.rope.partial_rotary_factor <= 1.0:
            raise CadenzaError(
                f"config.json has partial_rotary_factor={config.rope.partial_rotary_factor}: the share of each head "
                "that rotary turns must be in (0, 1] (MiniMax-M2 uses 0.5). Fix config.json."
            )
        return config

    @staticmethod
    def _refuse_other_computations(cfg: dict) -> None:
        """Keys of the hub's config.json that transformers' MiniMaxM2 does not read, where their value would ask
        for a computation it does not do (and neither does cadenza): refused rather than silently misread."""
        wrong = []
        if cfg.get("scoring_func") not in (None, "sigmoid"):
            wrong.append(f"scoring_func={cfg['scoring_func']!r} (MiniMax-M2's router is a sigmoid)")
        if cfg.get("use_qk_norm") is False:
            wrong.append("use_qk_norm=false (MiniMax-M2 normalises q and k)")
        if cfg.get("qk_norm_type") not in (None, "per_layer"):
            wrong.append(f"qk_norm_type={cfg['qk_norm_type']!r} (MiniMax-M2's norm spans all heads: 'per_layer')")
        if cfg.get("use_routing_bias") is False:
            wrong.append("use_routing_bias=false (MiniMax-M2's router adds e_score_correction_bias)")
        if any(kind != 1 for kind in cfg.get("attn_type_list") or ()):
            wrong.append("attn_type_list with linear-attention layers (0s: MiniMax-Text-01's lightning attention)")
        if cfg.get("routed_scaling_factor") not in (None, 1, 1.0):
            wrong.append(f"routed_scaling_factor={cfg['routed_scaling_factor']} (transformers' MiniMax-M2 scales by 1)")
        if wrong:
            raise CadenzaError(
                f"config.json describes a model MiniMaxM2ForCausalLM does not compute: {'; '.join(wrong)}. cadenza "
                "computes MiniMax-M2 as transformers does. Check that config.json belongs to a MiniMax-M2 model."
            )


class MiniMaxM2Attention(OlmoeAttention):
    """Grouped-query attention whose q and k are RMS-normalised across the full projection width (N*D for q, K*D
    for k), with no biases and no clipping: OLMoE's attention (its `project`); partial rotary comes from the tables'
    width (cadenza.models.rope.apply_rotary)."""


class MiniMaxM2SparseMoeBlock(SparseMoeBlock):
    """The gate [E, H] (a bias-free linear map in the compute dtype), the routing bias [E] beside it, and the
    experts w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, config: MiniMaxM2Config):
        super().__init__(config, config.num_local_experts, config.intermediate_size, names=("w1", "w3", "w2"))
        self.top_k = config.num_experts_per_tok
        self.e_score_correction_bias = nn.Parameter(torch.empty(config.num_local_experts), requires_grad=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_weights [T, k] float32, topk_ids [T, k]: sigmoid of the logits in float32, chosen by
        score plus bias, weighted by the unbiased scores renormalised."""
        router_logits = self.gate(x)  # [T, E], in the compute dtype as the reference computes them
        return sigmoid_group_topk(router_logits, self.e_score_correction_bias, self.top_k, 1, 1, True, 1.0)


class MiniMaxM2DecoderLayer(DecoderLayer):
    mlp_name = "block_sparse_moe"

    def __init__(self, config: MiniMaxM2Config, layer_idx: int):
        super().__init__(config, MiniMaxM2Attention(config, layer_idx), MiniMaxM2SparseMoeBlock(config))


class MiniMaxM2Model(DecoderModel):
    def __init__(self, config: MiniMaxM2Config):
        # the rotary tables have int(head_dim * partial_rotary_factor) features, the rotary part of each head
        super().__init__(config, MiniMaxM2DecoderLayer)


class MiniMaxM2ForCausalLM(CausalLM):
    def __init__(self, config: MiniMaxM2Config):
        super().__init__(config, MiniMaxM2Model(config))
