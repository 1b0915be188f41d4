"""Qwen-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B), following transformers/models/qwen2_moe/modeling_qwen2_moe.py (same
class and parameter names).

Each sparse layer adds two things to Mixtral's block: an always-on shared expert (a dense MLP scaled per token by
sigmoid(shared_expert_gate(x))), and `norm_topk_prob`, which says whether the top-k weights are renormalised.
Dense MLP layers of `intermediate_size` can be mixed in (`decoder_sparse_step`, `mlp_only_layers`). The shared
expert and dense MLPs are ordinary weights (always on the GPU); only the routed experts sit behind the seam.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.models.args import ModelArgs
from cadenza.models.attention import Attention, AttentionContext
from cadenza.models.common import MLP, CausalLM, DecoderLayer, DecoderModel, SparseMoeBlock

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class Qwen2MoeConfig(ModelArgs):
    num_experts: int = 60
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    qkv_bias: bool = True
    sliding_window: int | None = None  # None unless use_sliding_window; applies to the "sliding_attention" layers
    layer_types: list[str] = field(default_factory=list)

    @classmethod
    def from_hf(cls, cfg: dict) -> Qwen2MoeConfig:
        common = cls.common_fields(cfg)
        n = common["num_hidden_layers"]
        step = cfg.get("decoder_sparse_step", 1)
        if not isinstance(step, int) or step < 1:
            raise CadenzaError(f"config.json has decoder_sparse_step={step}; it must be 1 or more. Fix config.json.")
        use_window = bool(cfg.get("use_sliding_window", False))
        # transformers stores sliding_window=0 when use_sliding_window is off; the window is then unused
        window = cfg.get("sliding_window") if use_window else None
        # without layer_types in config.json, transformers 5 slides every other layer below max_window_layers
        below = cfg.get("max_window_layers", 28)
        layer_types = cfg.get("layer_types") or [
            "sliding_attention" if use_window and i % 2 == 0 and i < below else "full_attention" for i in range(n)
        ]
        if len(layer_types) != n or any(t not in LAYER_TYPES for t in layer_types):
            raise CadenzaError(
                f"config.json's layer_types must list {n} entries, each one of {', '.join(LAYER_TYPES)}; it has "
                f"{layer_types}. Fix or remove layer_types in config.json."
            )
        if "sliding_attention" in layer_types and not (window and window > 0):
            raise CadenzaError(
                "config.json marks layers as sliding_attention but gives no sliding window (use_sliding_window is "
                f"{use_window}, sliding_window is {cfg.get('sliding_window')}). Set use_sliding_window to true with "
                "a positive sliding_window, or mark every layer full_attention."
            )
        return cls(
            **common,
            num_experts=cls.require(cfg, "num_experts"),
            num_experts_per_tok=cls.require(cfg, "num_experts_per_tok"),
            moe_intermediate_size=cls.require(cfg, "moe_intermediate_size"),
            shared_expert_intermediate_size=cls.require(cfg, "shared_expert_intermediate_size"),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=step,
            mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
            qkv_bias=bool(cfg.get("qkv_bias", True)),  # hub configs predate the key: q/k/v always had a bias
            sliding_window=window,
            layer_types=list(layer_types),
        )

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has routed experts (else a dense MLP of intermediate_size)."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


class Qwen2MoeAttention(Attention):
    """Attention with q/k/v biases (no o_proj bias); "sliding_attention" layers see only the last
    `sliding_window` positions, the others the whole causal past."""

    def __init__(self, config: Qwen2MoeConfig, layer_idx: int):
        super().__init__(config, layer_idx, qkv_bias=config.qkv_bias)
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.sliding_window is not None:
            # the model's context carries the full-attention mask; this layer narrows it to its window
            ctx = ctx.for_window(self.sliding_window)
        return super().forward(x, ctx)


class Qwen2MoeSparseMoeBlock(SparseMoeBlock):
    rounds_weights = True

    def __init__(self, config: Qwen2MoeConfig):
        super().__init__(config, config.num_experts, config.moe_intermediate_size)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        # not routed: every token goes through it, so it lives with the always-on weights
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size, config.hidden_act)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def shared_output(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        def shared_expert_output() -> torch.Tensor:  # [B*T, H]; gate [B*T, 1]
            return F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

        return shared_expert_output


class Qwen2MoeDecoderLayer(DecoderLayer):
    def __init__(self, config: Qwen2MoeConfig, layer_idx: int):
        if config.is_sparse(layer_idx):
            mlp: nn.Module = Qwen2MoeSparseMoeBlock(config)
        else:
            mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)  # Qwen2MoeMLP
        super().__init__(config, Qwen2MoeAttention(config, layer_idx), mlp)


class Qwen2MoeModel(DecoderModel):
    def __init__(self, config: Qwen2MoeConfig):
        super().__init__(config, Qwen2MoeDecoderLayer)
        # no model-wide window: the mask built per pass is plain causal, sliding layers narrow it themselves
        self.sliding_window = None


class Qwen2MoeForCausalLM(CausalLM):
    def __init__(self, config: Qwen2MoeConfig):
        super().__init__(config, Qwen2MoeModel(config))
