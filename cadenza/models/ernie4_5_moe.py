"""ERNIE-4.5-MoE (ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B), following
transformers/models/ernie4_5_moe/modeling_ernie4_5_moe.py (same class and parameter names).

Attention is ordinary grouped-query attention with two ERNIE specifics:
- rotary turns every head feature, laid out as interleaved pairs (x0, x1), (x2, x3)... rather than two halves, and
  is computed in float32 from float32 cos/sin tables whatever the compute dtype (transformers keeps them "in full
  precision"): cadenza.models.rope.apply_rotary_interleaved;
- `use_bias` puts a bias on every projection: q/k/v/o, the dense and shared MLPs and the LM head (not on the routed
  experts, which transformers builds without).
The MoE layers are those with (i + 1) % moe_layer_interval == 0 and moe_layer_start_index <= i <=
moe_layer_end_index (-1: the last layer); the others are dense MLPs of intermediate_size. An MoE layer has
`moe_num_experts` routed experts (top `moe_k`) and `moe_num_shared_experts` always-on ones, stored as one MLP of
moe_num_shared_experts * moe_intermediate_size and run by the seam next to the routed experts. The router softmaxes
in float32, chooses with the probabilities plus a learned bias (`moe_statics.e_score_correction_bias`, [1, E]) and
weights with the unbiased probabilities, renormalised with the sum clamped at `moe_norm_min`
(cadenza/moe/routing.py: softmax_biased_topk). The router's weight and the bias stay float32 whatever the compute
dtype, as transformers keeps them (`_keep_in_fp32_modules_strict`).
Checkpoint layout (the hub's, and what transformers' save_pretrained writes): routed experts one tensor per expert and
matrix (`mlp.experts.{e}.gate_proj.weight`, ...), the bias at `mlp.moe_statics.e_score_correction_bias` (beside the
gate, not inside it as transformers' module tree has it: its loader renames it), embeddings tied by default. The
multi-token-prediction tensors (`model.mtp_*`) serve speculative decoding; the model does not build them, so the
loader never reads them.

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
from cadenza.models.attention import Attention, AttentionContext, attend
from cadenza.models.common import CausalLM, DecoderLayer, DecoderModel, act_fn
from cadenza.models.rope import RotaryEmbedding, apply_rotary_interleaved
from cadenza.moe.experts import Experts
from cadenza.moe.routing import softmax_biased_topk


@dataclass
class Ernie4_5_MoeConfig(ModelArgs):
    moe_num_experts: int = 64
    moe_k: int = 6
    moe_intermediate_size: int = 1536
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1  # resolved: -1 in config.json means the last layer
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    use_bias: bool = False

    DEFAULT_ROPE_THETA: ClassVar[float] = 500000.0
    # transformers' Ernie4_5_MoeConfig defaults, for keys a config.json leaves out (or sets to null). Shapes are not
    # here: a config without them is incomplete, and says so.
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        num_key_value_heads=4,
        tie_word_embeddings=True,  # unlike most families: ERNIE-4.5-21B-A3B ties them
        bos_token_id=1,
        eos_token_id=2,
        use_bias=False,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_end_index=-1,
        moe_layer_interval=1,
        moe_norm_min=1e-12,
    )

    @property
    def num_experts(self) -> int:  # transformers' attribute_map names
        return self.moe_num_experts

    @property
    def num_experts_per_tok(self) -> int:
        return self.moe_k

    @classmethod
    def from_hf(cls, cfg: dict) -> Ernie4_5_MoeConfig:
        cfg = dict(cfg)
        # transformers' attribute_map: num_experts and num_experts_per_tok are other names of the same keys
        for key, alias in (("moe_num_experts", "num_experts"), ("moe_k", "num_experts_per_tok")):
            if cfg.get(key) is None and cfg.get(alias) is not None:
                cfg[key] = cfg[alias]
        for key, value in cls.DEFAULTS.items():
            if cfg.get(key) is None:
                cfg[key] = value
        for key in ("moe_num_experts", "moe_k", "moe_layer_start_index", "moe_layer_end_index"):
            if isinstance(cfg.get(key), list):  # ERNIE-4.5-VL's per-modality lists: another architecture
                raise CadenzaError(
                    f"config.json gives {key} as a list {cfg[key]}, as ERNIE-4.5-VL's multimodal experts do; "
                    "Ernie4_5_MoeForCausalLM (the text models) takes one integer. Use a text model's config.json."
                )
        fields = cls.common_fields(cfg)
        req = cls.require
        end = int(cfg["moe_layer_end_index"])
        config = cls(
            **fields,
            moe_num_experts=int(req(cfg, "moe_num_experts")),
            moe_k=int(req(cfg, "moe_k")),
            moe_intermediate_size=int(req(cfg, "moe_intermediate_size")),
            moe_num_shared_experts=int(cfg["moe_num_shared_experts"]),
            moe_layer_start_index=int(cfg["moe_layer_start_index"]),
            # transformers' __post_init__ turns -1 (only -1) into the last layer
            moe_layer_end_index=fields["num_hidden_layers"] - 1 if end == -1 else end,
            moe_layer_interval=int(cfg["moe_layer_interval"]),
            moe_norm_min=float(cfg["moe_norm_min"]),
            use_bias=bool(cfg["use_bias"]),
        )
        config.check_rope()
        config.check()
        return config

    def check_rope(self) -> None:
        """transformers' ERNIE rotates every head feature: its default rope ignores partial_rotary_factor (so does
        cadenza); the scaled variants would build narrower tables that do not fit the heads, and crash there."""
        if self.rope.partial_rotary_factor != 1.0:
            if self.rope.rope_type != "default":
                raise CadenzaError(
                    f"config.json has partial_rotary_factor={self.rope.partial_rotary_factor} with rope type "
                    f"{self.rope.rope_type!r}; ERNIE-4.5 rotates every head feature. Remove partial_rotary_factor."
                )
            self.rope.partial_rotary_factor = 1.0

    def check(self) -> None:
        """Values transformers would crash on, reported as the config mistake they are."""
        if self.moe_layer_interval < 1:
            raise CadenzaError(
                f"config.json has moe_layer_interval={self.moe_layer_interval}; it must be an integer >= 1 (1: every "
                "layer from moe_layer_start_index on has experts). Fix config.json."
            )
        if self.moe_num_shared_experts < 0:
            raise CadenzaError(
                f"config.json has moe_num_shared_experts={self.moe_num_shared_experts}; it cannot be negative. "
                "Fix config.json."
            )
        sparse = any(self.is_sparse(i) for i in range(self.num_hidden_layers))
        if sparse and not 1 <= self.moe_k <= self.moe_num_experts:
            raise CadenzaError(
                f"config.json routes each token to moe_k={self.moe_k} of moe_num_experts={self.moe_num_experts} "
                "experts; it must be between 1 and moe_num_experts. Fix config.json."
            )

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has routed experts (else a dense MLP of intermediate_size)."""
        in_range = self.moe_layer_start_index <= layer_idx <= self.moe_layer_end_index
        return in_range and (layer_idx + 1) % self.moe_layer_interval == 0


class Ernie4_5_MoeRotaryEmbedding(RotaryEmbedding):
    """The usual tables, always float32: the reference rotates q and k in float32 and rounds once after."""

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(positions, torch.float32)


class Ernie4_5_MoeAttention(Attention):
    """GQA with interleaved-pair rotary over the whole head in float32; `use_bias` biases q/k/v and o_proj."""

    def __init__(self, config: Ernie4_5_MoeConfig, layer_idx: int):
        super().__init__(
            config,
            layer_idx,
            qkv_bias=config.use_bias,
            o_bias=config.use_bias,
        )

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q, k = apply_rotary_interleaved(q, ctx.cos, ctx.sin), apply_rotary_interleaved(k, ctx.cos, ctx.sin)
        k_all, v_all = ctx.cache.update(self.layer_idx, k, v, ctx)  # [B, K, S, D]
        return self.o_proj(attend(q, k_all, v_all, ctx, self.scaling).transpose(1, 2).reshape(b, t, -1))


class Ernie4_5_MoeMLP(nn.Module):
    """SwiGLU MLP of the dense layers and the shared experts, biased under `use_bias` (common.MLP never is)."""

    def __init__(self, config: Ernie4_5_MoeConfig, intermediate_size: int | None = None):
        super().__init__()
        h, i, bias = config.hidden_size, intermediate_size or config.intermediate_size, config.use_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Ernie4_5_MoeStatics(nn.Module):
    """The routing bias `e_score_correction_bias` [1, E] (one expert group), kept in float32 as the reference."""

    keep_float32 = ("e_score_correction_bias",)  # the loader keeps it float32 whatever the dtype

    def __init__(self, config: Ernie4_5_MoeConfig):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.empty(1, config.moe_num_experts), requires_grad=False)


class Ernie4_5_MoeTopKRouter(nn.Module):
    """The router's weight [E, H] (checkpoint: `mlp.gate.weight`), kept in float32; logits in float32."""

    keep_float32 = ("weight",)

    def __init__(self, config: Ernie4_5_MoeConfig):
        super().__init__()
        self.top_k = config.moe_k
        self.norm_min = config.moe_norm_min
        self.weight = nn.Parameter(torch.empty(config.moe_num_experts, config.hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, e_score_correction_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_weights [T, k] float32, topk_ids [T, k]. The bias comes from the block's moe_statics,
        where the checkpoint puts it (transformers nests the statics in its router)."""
        router_logits = F.linear(x.float(), self.weight.float())  # [T, E]
        return softmax_biased_topk(router_logits, e_score_correction_bias, self.top_k, self.norm_min)


class Ernie4_5_MoeSparseMoeBlock(nn.Module):
    """Routed experts (checkpoint: mlp.experts.{e}.gate_proj / up_proj / down_proj) plus the shared experts
    (mlp.shared_experts.*), added by the seam."""

    def __init__(self, config: Ernie4_5_MoeConfig):
        super().__init__()
        self.top_k = config.moe_k  # read by the offloading's prefetch guess (loader.moe_routers)
        self.gate = Ernie4_5_MoeTopKRouter(config)
        self.moe_statics = Ernie4_5_MoeStatics(config)
        self.experts = Experts(
            config.moe_num_experts, config.hidden_size, config.moe_intermediate_size, config.hidden_act
        )  # no biases, even under use_bias: transformers' Ernie4_5_MoeExperts has none
        self.shared_experts = None
        if config.moe_num_shared_experts > 0:  # all shared experts as one wider MLP, as the checkpoint stores them
            shared_size = config.moe_intermediate_size * config.moe_num_shared_experts
            self.shared_experts = Ernie4_5_MoeMLP(config, shared_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)  # [B*T, H]
        topk_weights, topk_ids = self.gate(x, self.moe_statics.e_score_correction_bias)
        # transformers rounds the routing weights to the compute dtype (a no-op in fp32); so do we
        topk_weights = topk_weights.to(x.dtype).float()
        shared = None if self.shared_experts is None else (lambda: self.shared_experts(x))
        # the seam adds the shared experts' output (routed + shared, the reference's order), computed on the GPU
        # while the CPU works on routed experts
        return self.experts(x, topk_ids, topk_weights, shared=shared).reshape(b, t, h)


class Ernie4_5_MoeDecoderLayer(DecoderLayer):
    def __init__(self, config: Ernie4_5_MoeConfig, layer_idx: int):
        mlp = Ernie4_5_MoeSparseMoeBlock(config) if config.is_sparse(layer_idx) else Ernie4_5_MoeMLP(config)
        super().__init__(config, Ernie4_5_MoeAttention(config, layer_idx), mlp)


class Ernie4_5_MoeModel(DecoderModel):
    def __init__(self, config: Ernie4_5_MoeConfig):
        super().__init__(config, Ernie4_5_MoeDecoderLayer, rotary_class=Ernie4_5_MoeRotaryEmbedding)


class Ernie4_5_MoeForCausalLM(CausalLM):
    def __init__(self, config: Ernie4_5_MoeConfig):
        # tied to the embeddings by default (the loader ties them); the bias, under use_bias, is the head's own
        super().__init__(config, Ernie4_5_MoeModel(config), lm_head_bias=config.use_bias)
