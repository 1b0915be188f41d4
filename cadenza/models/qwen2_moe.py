"""Qwen-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B), following transformers/models/qwen2_moe/modeling_qwen2_moe.py (same
class and parameter names).

Each sparse layer adds two things to Mixtral's block: an always-on shared expert (a dense MLP scaled per token by
sigmoid(shared_expert_gate(x))), and `norm_topk_prob`, which says whether the top-k weights are renormalised.
Dense MLP layers of `intermediate_size` can be mixed in (`decoder_sparse_step`, `mlp_only_layers`). The shared
expert and dense MLPs are ordinary weights (always on the GPU); only the routed experts sit behind the seam.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.models.args import ModelArgs
from cadenza.models.common import MLP, Attention, AttentionContext, CausalLM, DecoderModel, RMSNorm
from cadenza.models.rope import RotaryEmbedding
from cadenza.moe.experts import Experts
from cadenza.moe.routing import softmax_topk

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
        super().__init__(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            qkv_bias=config.qkv_bias,
        )
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.sliding_window is not None:
            # the model's context carries the full-attention mask; this layer narrows it to its window
            ctx = ctx.for_window(self.sliding_window)
        return super().forward(x, ctx)


class Qwen2MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(
            config.num_experts,
            config.hidden_size,
            config.moe_intermediate_size,
            config.hidden_act,
            names=("gate_proj", "up_proj", "down_proj"),
        )
        # not routed: every token goes through it, so it lives with the always-on weights
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size, config.hidden_act)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)  # [B*T, H]
        router_logits = self.gate(x)  # [B*T, E]
        topk_weights, topk_ids = softmax_topk(router_logits, self.top_k, norm_topk_prob=self.norm_topk_prob)

        def shared_expert_output() -> torch.Tensor:  # [B*T, H]; gate [B*T, 1]
            return F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

        # routed experts + the shared expert, which the seam runs on the GPU while the CPU works on routed ones
        return self.experts(x, topk_ids, topk_weights, shared=shared_expert_output).reshape(b, t, h)


class Qwen2MoeDecoderLayer(nn.Module):
    def __init__(self, config: Qwen2MoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2MoeAttention(config, layer_idx)
        if config.is_sparse(layer_idx):
            self.mlp: nn.Module = Qwen2MoeSparseMoeBlock(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)  # Qwen2MoeMLP
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), ctx)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Qwen2MoeModel(DecoderModel):
    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        # no model-wide window: the mask built per pass is plain causal, sliding layers narrow it themselves
        self.sliding_window = None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)


class Qwen2MoeForCausalLM(CausalLM):
    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
