"""dots.llm1 (rednote-hilab's dots.llm1.base / .inst, 142B total, 14B active), following
transformers/models/dots1/modeling_dots1.py (same class and parameter names).

Qwen3's attention (per-head RMSNorm on q and k before rotary, biases under `attention_bias`, sliding-window layers
where `layer_types` says: by default the layers from `max_window_layers` on) with DeepSeek-V3's MoE: the first
`first_k_dense_replace` layers dense, every later one routed experts plus `n_shared_experts` always-on ones, chosen
by sigmoid scores plus the learned bias `e_score_correction_bias` (kept in float32), group by group, weighted by the
unbiased scores (renormalised under `norm_topk_prob`) times `routed_scaling_factor` (deepseek_v3.py's block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.models.args import ModelArgs
from cadenza.models.attention import AttentionContext
from cadenza.models.common import MLP, CausalLM, DecoderLayer, DecoderModel
from cadenza.models.deepseek_v3 import DeepseekV3MoE
from cadenza.models.qwen3_moe import Qwen3MoeAttention

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class Dots1Config(ModelArgs):
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1408
    n_shared_experts: int = 2
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    attention_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)

    # transformers' Dots1Config defaults, for keys a config.json leaves out (or sets to null)
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        attention_bias=False,
        max_window_layers=62,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
    )

    @classmethod
    def from_hf(cls, cfg: dict) -> Dots1Config:
        cfg = dict(cfg)
        for key, value in cls.DEFAULTS.items():
            if cfg.get(key) is None:
                cfg[key] = value
        window = cfg.get("sliding_window", 4096)  # transformers' default when the key is absent (null: no window)
        common = cls.common_fields(cfg)
        n = common["num_hidden_layers"]
        types = cfg.get("layer_types") or [
            "sliding_attention" if window is not None and i >= cfg["max_window_layers"] else "full_attention"
            for i in range(n)
        ]
        if len(types) != n or any(t not in LAYER_TYPES for t in types):
            raise CadenzaError(
                f"config.json's layer_types must list {n} entries, each one of {', '.join(LAYER_TYPES)}; it has "
                f"{types}. Fix or remove layer_types in config.json."
            )
        if "sliding_attention" in types and not (window and window > 0):
            raise CadenzaError(
                f"config.json marks layers as sliding_attention but its sliding_window is {window}. Give a positive "
                "sliding_window, or mark every layer full_attention."
            )
        req = cls.require
        config = cls(
            **common,
            n_routed_experts=req(cfg, "n_routed_experts"),
            num_experts_per_tok=req(cfg, "num_experts_per_tok"),
            moe_intermediate_size=req(cfg, "moe_intermediate_size"),
            n_shared_experts=int(req(cfg, "n_shared_experts")),  # transformers multiplies by it: no default
            first_k_dense_replace=int(cfg["first_k_dense_replace"]),
            n_group=int(cfg["n_group"]),
            topk_group=int(cfg["topk_group"]),
            norm_topk_prob=bool(cfg["norm_topk_prob"]),
            routed_scaling_factor=float(cfg["routed_scaling_factor"]),
            attention_bias=bool(cfg["attention_bias"]),
            sliding_window=window if "sliding_attention" in types else None,
            layer_types=list(types),
        )
        e, k, g, kept = config.n_routed_experts, config.num_experts_per_tok, config.n_group, config.topk_group
        if not (1 <= k <= e and g >= 1 and e % g == 0 and 1 <= kept <= g and kept * (e // g) >= k):
            raise CadenzaError(
                f"config.json routes top-{k} of n_routed_experts={e} in n_group={g} groups keeping topk_group={kept}: "
                "num_experts_per_tok must be between 1 and n_routed_experts, n_group must divide n_routed_experts, "
                "and the kept groups must hold at least num_experts_per_tok experts. Fix config.json."
            )
        return config

    def is_sparse(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace


class Dots1Attention(Qwen3MoeAttention):
    """Qwen3's attention; a "sliding_attention" layer sees only the last `sliding_window` positions."""

    def __init__(self, config: Dots1Config, layer_idx: int):
        super().__init__(config, layer_idx)
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.sliding_window is not None:  # the pass's mask is the full-attention one: this layer narrows it
            ctx = ctx.for_window(self.sliding_window)
        return super().forward(x, ctx)


class Dots1DecoderLayer(DecoderLayer):
    def __init__(self, config: Dots1Config, layer_idx: int):
        if config.is_sparse(layer_idx):
            mlp: nn.Module = DeepseekV3MoE(config)  # Dots1MoE: DeepSeek-V3's block
        else:
            mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)  # Dots1MLP
        super().__init__(config, Dots1Attention(config, layer_idx), mlp)


class Dots1Model(DecoderModel):
    def __init__(self, config: Dots1Config):
        super().__init__(config, Dots1DecoderLayer)
        self.sliding_window = None  # the pass's mask is plain causal; sliding layers narrow it themselves


class Dots1ForCausalLM(CausalLM):
    def __init__(self, config: Dots1Config):
        super().__init__(config, Dots1Model(config))
