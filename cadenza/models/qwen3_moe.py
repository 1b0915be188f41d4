"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B), following transformers/models/qwen3_moe/modeling_qwen3_moe.py
(same class and parameter names).

What sets it apart from Mixtral: per-head RMSNorm on q and k (over head_dim, before rotary), an explicit head_dim
unrelated to hidden_size / heads, many small experts (128, top-8) with optional renormalisation of the top-k
weights (`norm_topk_prob`), and dense MLP layers mixed in (`mlp_only_layers`, `decoder_sparse_step`).

Shape legend: B batch, T new tokens, H hidden size, N query heads, K key/value heads, D head dim, E experts,
k experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from cadenza.errors import CadenzaError
from cadenza.models.args import ModelArgs
from cadenza.models.attention import Attention
from cadenza.models.common import MLP, CausalLM, DecoderLayer, DecoderModel, RMSNorm, SparseMoeBlock


@dataclass
class Qwen3MoeConfig(ModelArgs):
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    attention_bias: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> Qwen3MoeConfig:
        # The hub's config.json says "num_experts"; transformers 5's save_pretrained writes "num_local_experts"
        # (its Qwen3MoeConfig maps one name onto the other).
        num_experts = cfg.get("num_experts")
        if num_experts is None:
            num_experts = cls.require(cfg, "num_local_experts")
        # transformers keeps sliding_window only when use_sliding_window is set, then on every layer: unlike
        # dense Qwen3, its Qwen3-MoE ignores max_window_layers.
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
        config = cls(
            **cls.common_fields(cfg),
            num_experts=num_experts,
            num_experts_per_tok=cls.require(cfg, "num_experts_per_tok"),
            moe_intermediate_size=cls.require(cfg, "moe_intermediate_size"),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=cfg.get("decoder_sparse_step", 1),
            mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
            attention_bias=bool(cfg.get("attention_bias", False)),
            sliding_window=window,
        )
        config.check()
        return config

    def check(self) -> None:
        """Values transformers would crash on, reported as the config mistake they are."""
        if not isinstance(self.decoder_sparse_step, int) or self.decoder_sparse_step < 1:
            raise CadenzaError(
                f"config.json has decoder_sparse_step={self.decoder_sparse_step!r}; it must be an integer >= 1 "
                "(1: every layer is MoE). Correct it in config.json."
            )
        sparse = any(self.is_sparse(i) for i in range(self.num_hidden_layers))
        if sparse and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise CadenzaError(
                f"config.json routes each token to num_experts_per_tok={self.num_experts_per_tok} of "
                f"num_experts={self.num_experts} experts; it must be between 1 and num_experts. Correct config.json."
            )

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has routed experts (else a dense MLP of intermediate_size)."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


class Qwen3MoeAttention(Attention):
    """Attention with RMSNorm over each head's D features of q and k, applied before rotary."""

    def __init__(self, config: Qwen3MoeConfig, layer_idx: int):
        # transformers gives o_proj the same bias switch as q/k/v
        super().__init__(config, layer_idx, qkv_bias=config.attention_bias, o_bias=config.attention_bias)
        self.q_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps)

    def head_norms(self) -> tuple[nn.Module, nn.Module]:
        return self.q_norm, self.k_norm


class Qwen3MoeMLP(MLP):
    """The dense layers' SwiGLU MLP (mlp_only_layers, layers between sparse steps)."""


class Qwen3MoeSparseMoeBlock(SparseMoeBlock):
    rounds_weights = True

    def __init__(self, config: Qwen3MoeConfig):
        # gate: transformers' Qwen3MoeTopKRouter holds one [E, H] weight, checkpoint name mlp.gate.weight;
        # experts: mlp.experts.{e}.gate_proj / up_proj / down_proj
        super().__init__(config, config.num_experts, config.moe_intermediate_size)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob


class Qwen3MoeDecoderLayer(DecoderLayer):
    def __init__(self, config: Qwen3MoeConfig, layer_idx: int):
        if config.is_sparse(layer_idx):
            mlp: nn.Module = Qwen3MoeSparseMoeBlock(config)
        else:
            mlp = Qwen3MoeMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        super().__init__(config, Qwen3MoeAttention(config, layer_idx), mlp)


class Qwen3MoeModel(DecoderModel):
    def __init__(self, config: Qwen3MoeConfig):
        super().__init__(config, Qwen3MoeDecoderLayer)
        self.sliding_window = config.sliding_window


class Qwen3MoeForCausalLM(CausalLM):
    def __init__(self, config: Qwen3MoeConfig):
        super().__init__(config, Qwen3MoeModel(config))
