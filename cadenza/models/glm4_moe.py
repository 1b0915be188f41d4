"""GLM-4.5 (GLM-4.5, GLM-4.5-Air, GLM-4.6), following transformers/models/glm4_moe/modeling_glm4_moe.py (same
class and parameter names).

Attention is ordinary grouped-query attention (no MLA), with three GLM switches:
- `partial_rotary_factor` (transformers' default 0.5 when config.json names none): only the first
  head_dim * factor features of each q/k head turn, the rest pass through;
- `use_qk_norm`: RMSNorm over each head's head_dim features of q and k, before rotary (GLM-4.5 has it on);
- `attention_bias`: biases on q/k/v, never on o_proj. head_dim is its own key (128 for hidden 5120 and 96 heads).
The MoE part is DeepSeek-V3's: the first `first_k_dense_replace` layers are dense (an MLP of intermediate_size),
every later one has routed experts plus `n_shared_experts` always-on ones (one MLP of n_shared_experts *
moe_intermediate_size, run by the seam next to the routed experts: DeepseekV2Moe). The router ("noaux_tc") chooses
with sigmoid scores plus a learned bias `e_score_correction_bias`, group by group, and weights with the unbiased
scores, renormalised and scaled (cadenza/moe/routing.py: sigmoid_group_topk). The router's weight and bias stay in
float32 whatever the compute dtype, as transformers keeps them (`_keep_in_fp32_modules_strict`).
The checkpoints' multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`, `num_nextn_predict_layers`)
serves speculative decoding; the model does not build it, so the loader never reads its tensors.

Shape legend: B batch, T new tokens, H hidden size, N query heads, K key/value heads, D head dim, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.models.args import ModelArgs
from cadenza.models.attention import Attention
from cadenza.models.common import MLP, CausalLM, DecoderLayer, DecoderModel, RMSNorm
from cadenza.models.deepseek_v2 import DeepseekV2Moe
from cadenza.moe.routing import sigmoid_group_topk


@dataclass
class Glm4MoeConfig(ModelArgs):
    n_routed_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 1408
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    use_qk_norm: bool = False
    attention_bias: bool = False
    num_nextn_predict_layers: int = 0  # multi-token-prediction layers in the checkpoint (not loaded)

    # transformers' Glm4MoeConfig defaults, for keys a config.json leaves out (or sets to null). Shapes are not
    # here: a config without them is incomplete, and says so.
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        partial_rotary_factor=0.5,  # top level; a value inside rope_parameters wins, as in transformers
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        use_qk_norm=False,
        attention_bias=False,
        num_nextn_predict_layers=0,
    )

    @classmethod
    def from_hf(cls, cfg: dict) -> Glm4MoeConfig:
        cfg = dict(cfg)
        # transformers' attribute_map: num_local_experts and num_mtp_layers are other names of the same keys
        for key, alias in (("n_routed_experts", "num_local_experts"), ("num_nextn_predict_layers", "num_mtp_layers")):
            if cfg.get(key) is None and cfg.get(alias) is not None:
                cfg[key] = cfg[alias]
        for key, value in cls.DEFAULTS.items():
            if cfg.get(key) is None:
                cfg[key] = value
        req = cls.require
        config = cls(
            **cls.common_fields(cfg),
            n_routed_experts=req(cfg, "n_routed_experts"),
            num_experts_per_tok=req(cfg, "num_experts_per_tok"),
            moe_intermediate_size=req(cfg, "moe_intermediate_size"),
            n_shared_experts=int(cfg["n_shared_experts"]),
            first_k_dense_replace=int(cfg["first_k_dense_replace"]),
            n_group=int(cfg["n_group"]),
            topk_group=int(cfg["topk_group"]),
            norm_topk_prob=bool(cfg["norm_topk_prob"]),
            routed_scaling_factor=float(cfg["routed_scaling_factor"]),
            use_qk_norm=bool(cfg["use_qk_norm"]),
            attention_bias=bool(cfg["attention_bias"]),
            num_nextn_predict_layers=int(cfg["num_nextn_predict_layers"]),
        )
        config.check()
        return config

    def check(self) -> None:
        """Values transformers would crash on (or silently misread), reported as the config mistake they are."""
        e, k, g, kept = self.n_routed_experts, self.num_experts_per_tok, self.n_group, self.topk_group
        if not 1 <= k <= e:
            raise CadenzaError(
                f"config.json routes each token to num_experts_per_tok={k} of n_routed_experts={e} experts; it must "
                "be between 1 and n_routed_experts. Fix config.json."
            )
        # the router ranks the groups by the sum of their two best experts, then picks k among the kept groups
        if not (g >= 1 and e % g == 0 and e // g >= 2 and 1 <= kept <= g and kept * (e // g) >= k):
            raise CadenzaError(
                f"config.json's expert groups do not work: n_group={g}, topk_group={kept} for {e} experts, top-{k}. "
                "n_group must divide n_routed_experts into groups of at least 2 experts, and the topk_group kept "
                "groups must hold at least num_experts_per_tok experts. Fix config.json."
            )
        if self.first_k_dense_replace < 0 or self.n_shared_experts < 0:
            raise CadenzaError(
                f"config.json has first_k_dense_replace={self.first_k_dense_replace} and n_shared_experts="
                f"{self.n_shared_experts}; neither can be negative. Fix config.json."
            )
        if not 0.0 < self.rope.partial_rotary_factor <= 1.0:
            raise CadenzaError(
                f"config.json has partial_rotary_factor={self.rope.partial_rotary_factor}: the share of each head "
                "that rotary turns must be in (0, 1] (GLM-4.5 uses 0.5). Fix config.json."
            )

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has routed experts (else a dense MLP of intermediate_size)."""
        return layer_idx >= self.first_k_dense_replace


class Glm4MoeAttention(Attention):
    """GQA with partial rotary (the tables' width says how much turns: cadenza.models.rope.apply_rotary), optional
    per-head q/k RMSNorm, q/k/v biases under `attention_bias` and none on o_proj."""

    def __init__(self, config: Glm4MoeConfig, layer_idx: int):
        super().__init__(
            config,
            layer_idx,
            qkv_bias=config.attention_bias,
            o_bias=False,
        )
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.q_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps)

    def head_norms(self) -> tuple[nn.Module, nn.Module] | None:
        return (self.q_norm, self.k_norm) if self.use_qk_norm else None


class Glm4MoeMLP(MLP):
    """The dense layers' SwiGLU MLP (the first first_k_dense_replace layers) and the shared experts."""


class Glm4MoeTopkRouter(nn.Module):
    """The router's weight [E, H] and its score correction bias [E] (checkpoint: `mlp.gate.weight`,
    `mlp.gate.e_score_correction_bias`), both kept in float32 as the reference keeps them."""

    keep_float32 = ("weight", "e_score_correction_bias")  # the loader keeps these in float32 whatever the dtype

    def __init__(self, config: Glm4MoeConfig):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(config.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_weights [T, k] float32, topk_ids [T, k]."""
        c = self.config
        router_logits = F.linear(x.float(), self.weight.float())  # [T, E], in float32 as the reference
        return sigmoid_group_topk(
            router_logits,
            self.e_score_correction_bias,
            c.num_experts_per_tok,
            c.n_group,
            c.topk_group,
            c.norm_topk_prob,
            c.routed_scaling_factor,
        )


class Glm4MoeMoE(DeepseekV2Moe):
    """Routed experts (checkpoint: mlp.experts.{e}.gate_proj / up_proj / down_proj) plus the shared experts
    (mlp.shared_experts.*), added by the seam; DeepSeek's block with GLM's router."""

    router_class = Glm4MoeTopkRouter


class Glm4MoeDecoderLayer(DecoderLayer):
    def __init__(self, config: Glm4MoeConfig, layer_idx: int):
        if config.is_sparse(layer_idx):
            mlp: nn.Module = Glm4MoeMoE(config)
        else:
            mlp = Glm4MoeMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        super().__init__(config, Glm4MoeAttention(config, layer_idx), mlp)


class Glm4MoeModel(DecoderModel):
    def __init__(self, config: Glm4MoeConfig):
        # num_hidden_layers only: the multi-token-prediction layers after them are not part of the model; the
        # rotary tables have int(head_dim * partial_rotary_factor) features, the rotary part of each head
        super().__init__(config, Glm4MoeDecoderLayer)


class Glm4MoeForCausalLM(CausalLM):
    def __init__(self, config: Glm4MoeConfig):
        super().__init__(config, Glm4MoeModel(config))
