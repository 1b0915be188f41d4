"""DeepSeek-V2 (V2, V2-Lite, V2.5, Coder-V2), following transformers/models/deepseek_v2/modeling_deepseek_v2.py (same
class and parameter names).

Three things set it apart from Mixtral:
- attention is multi-head latent attention (cadenza/models/mla.py): the cache holds a 512-number latent and a
  64-number rotary key per position instead of every head's keys and values;
- the first `first_k_dense_replace` layers have a dense MLP of `intermediate_size`; after them every
  `moe_layer_freq`-th layer is an MoE layer;
- an MoE layer has `n_shared_experts` always-on experts (one MLP of n_shared_experts * moe_intermediate_size) next
  to the routed ones. They are ordinary weights, always on the GPU; the seam runs them there while the CPU works on
  routed experts.
Routing: softmax, top-k among all experts ("greedy") or within the best groups ("group_limited_greedy"), weights
scaled by routed_scaling_factor (cadenza/moe/routing.py).

DeepSeek-V3 (deepseek_v3.py) reuses all of this with another router.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.kv_cache import MLACache
from cadenza.models.args import ModelArgs
from cadenza.models.common import MLP, CausalLM, DecoderLayer, DecoderModel, SparseMoeBlock
from cadenza.models.mla import MultiHeadLatentAttention
from cadenza.moe.routing import softmax_group_topk

TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclass
class DeepseekV2Config(ModelArgs):
    """config.json's fields. MLA has no per-head key/value width of its own: `head_dim` is the query/key head
    (qk_nope_head_dim + qk_rope_head_dim) and num_key_value_heads equals num_attention_heads, as after expansion."""

    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1408
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False

    # transformers' DeepseekV2Config defaults, for keys a config.json leaves out
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        n_shared_experts=2,
        first_k_dense_replace=0,
        moe_layer_freq=1,
        topk_method="greedy",
        n_group=None,
        topk_group=None,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
    )

    @classmethod
    def deepseek_fields(cls, cfg: dict) -> dict[str, Any]:
        """The fields V2 and V3 share, from config.json (shapes required, switches defaulted as transformers)."""
        req = cls.require
        common = cls.common_fields(cfg)
        nope, rope = req(cfg, "qk_nope_head_dim"), req(cfg, "qk_rope_head_dim")
        common.update(head_dim=nope + rope, num_key_value_heads=common["num_attention_heads"])
        get = lambda key: cfg[key] if cfg.get(key) is not None else cls.DEFAULTS[key]
        fields = dict(
            **common,
            n_routed_experts=req(cfg, "n_routed_experts"),
            num_experts_per_tok=req(cfg, "num_experts_per_tok"),
            moe_intermediate_size=req(cfg, "moe_intermediate_size"),
            n_shared_experts=get("n_shared_experts"),
            first_k_dense_replace=get("first_k_dense_replace"),
            moe_layer_freq=get("moe_layer_freq"),
            topk_method=get("topk_method"),
            n_group=get("n_group"),
            topk_group=get("topk_group"),
            routed_scaling_factor=float(get("routed_scaling_factor")),
            norm_topk_prob=bool(get("norm_topk_prob")),
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=req(cfg, "kv_lora_rank"),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=req(cfg, "v_head_dim"),
            attention_bias=bool(cfg.get("attention_bias", False)),
        )
        if cfg.get("mlp_bias"):
            raise CadenzaError(
                "config.json sets mlp_bias, which no published DeepSeek model uses and cadenza does not implement. "
                "Set mlp_bias to false if the checkpoint has no MLP biases."
            )
        if fields["moe_layer_freq"] < 1:
            raise CadenzaError(f"config.json has moe_layer_freq={fields['moe_layer_freq']}; it must be 1 or more.")
        if fields["num_experts_per_tok"] > fields["n_routed_experts"]:
            raise CadenzaError(
                f"config.json asks for num_experts_per_tok={fields['num_experts_per_tok']} of only "
                f"n_routed_experts={fields['n_routed_experts']} experts. Fix config.json."
            )
        return fields

    @classmethod
    def from_hf(cls, cfg: dict) -> DeepseekV2Config:
        config = cls(**cls.deepseek_fields(cfg))
        if config.topk_method not in TOPK_METHODS:
            raise CadenzaError(
                f"config.json asks for topk_method={config.topk_method!r}; DeepSeek-V2 routes with "
                f"{' or '.join(TOPK_METHODS)}. Fix topk_method (DeepSeek-V3's noaux_tc needs "
                "architectures: DeepseekV3ForCausalLM)."
            )
        if config.topk_method == "group_limited_greedy":
            config.check_groups(config.n_group, config.topk_group)
        return config

    def check_groups(self, n_group: int | None, topk_group: int | None) -> None:
        """Group-limited routing needs n_group equal groups and 1 <= topk_group <= n_group whose experts can fill
        the top-k."""
        e, k = self.n_routed_experts, self.num_experts_per_tok
        ok = n_group is not None and topk_group is not None and n_group >= 1 and e % n_group == 0
        ok = ok and 1 <= topk_group <= n_group and topk_group * (e // n_group) >= k
        if not ok:
            raise CadenzaError(
                f"config.json's expert groups do not work: n_group={n_group}, topk_group={topk_group} for "
                f"{e} experts, top-{k}. n_group must divide n_routed_experts and the topk_group kept groups must hold "
                "at least num_experts_per_tok experts. Fix config.json."
            )

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has routed experts (else a dense MLP of intermediate_size)."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


class DeepseekV2TopkRouter(nn.Module):
    """The router's weight ([E, H], checkpoint name `mlp.gate.weight`); scores in fp32, as the reference."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size), requires_grad=False)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())  # [T, E]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_weights [T, k] float32, topk_ids [T, k]."""
        c = self.config
        return softmax_group_topk(
            self.router_logits(x),
            c.num_experts_per_tok,
            c.topk_method,
            c.n_group,
            c.topk_group,
            c.routed_scaling_factor,
        )


class DeepseekV2Moe(SparseMoeBlock):
    router_class: ClassVar[type[nn.Module]] = DeepseekV2TopkRouter

    def __init__(self, config: DeepseekV2Config):
        super().__init__(config, config.n_routed_experts, config.moe_intermediate_size, gate=self.router_class(config))
        self.shared_experts = None
        if config.n_shared_experts:  # all shared experts as one wider MLP, as the checkpoint stores them
            shared_size = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = MLP(config.hidden_size, shared_size, config.hidden_act)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(x)  # the router computes the weights itself

    def shared_output(self, x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
        return None if self.shared_experts is None else (lambda: self.shared_experts(x))


class DeepseekV2Attention(MultiHeadLatentAttention):
    """MLA; DeepSeek-V2 always rotates interleaved pairs."""

    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__(config, layer_idx, rope_interleave=True)


class DeepseekV2DecoderLayer(DecoderLayer):
    attention_class: ClassVar[type[nn.Module]] = DeepseekV2Attention
    moe_class: ClassVar[type[nn.Module]] = DeepseekV2Moe

    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        if config.is_sparse(layer_idx):
            mlp: nn.Module = self.moe_class(config)
        else:
            mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)  # DeepseekV2MLP
        super().__init__(config, self.attention_class(config, layer_idx), mlp)


class DeepseekV2Model(DecoderModel):
    decoder_layer_class: ClassVar[type[nn.Module]] = DeepseekV2DecoderLayer

    def __init__(self, config: DeepseekV2Config):
        # only the rotary part of each head turns
        super().__init__(config, self.decoder_layer_class, rotary_dim=config.qk_rope_head_dim)


class DeepseekV2ForCausalLM(CausalLM):
    model_class: ClassVar[type[nn.Module]] = DeepseekV2Model

    def __init__(self, config: DeepseekV2Config):
        super().__init__(config, self.model_class(config))

    def new_cache(self, max_length: int, dtype: torch.dtype, device: torch.device, batch: int = 1) -> MLACache:
        """MLA's cache: the latent and the rotary key per position and layer, (kv_lora_rank + qk_rope_head_dim)
        numbers, shared by every head."""
        c = self.config
        return MLACache(c.num_hidden_layers, batch, c.kv_lora_rank, c.qk_rope_head_dim, max_length, dtype, device)
