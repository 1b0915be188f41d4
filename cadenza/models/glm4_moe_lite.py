"""GLM-4.7-Flash (30B total, 3B active), following transformers/models/glm4_moe_lite/modeling_glm4_moe_lite.py
(same class and parameter names).

DeepSeek-V3's layers (deepseek_v3.py: multi-head latent attention with `rope_interleave`, shared experts, the
"noaux_tc" sigmoid router with `e_score_correction_bias`) with GLM-4.5's router (glm4_moe.py: its weight and bias
kept in float32, the logits computed in float32), and the dense layers named per layer by `mlp_layer_types`
("dense" / "sparse"; transformers' default: the first layer dense). Only the `qk_rope_head_dim` part of each head
turns, all of it: a `partial_rotary_factor` below 1 would not fit the interleaved rotation (transformers fails on
it), so it is refused. The checkpoint's multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`) is not
built, so its tensors are neither expected nor read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from cadenza.errors import CadenzaError
from cadenza.models.deepseek_v3 import (
    DeepseekV3Config,
    DeepseekV3DecoderLayer,
    DeepseekV3ForCausalLM,
    DeepseekV3Model,
)
from cadenza.models.glm4_moe import Glm4MoeMoE

LAYER_TYPES = ("dense", "sparse")


@dataclass
class Glm4MoeLiteConfig(DeepseekV3Config):
    mlp_layer_types: list[str] = field(default_factory=list)

    # transformers' Glm4MoeLiteConfig defaults, for keys a config.json leaves out (or sets to null); shapes are not
    # here: a config without them is incomplete, and says so
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        n_shared_experts=1,
        first_k_dense_replace=1,  # (transformers reads only mlp_layer_types, whose default is one dense layer)
        moe_layer_freq=1,
        topk_method="noaux_tc",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.8,
        norm_topk_prob=True,
    )
    HF_DEFAULTS: ClassVar[dict[str, Any]] = dict(rms_norm_eps=1e-5, max_position_embeddings=202752, hidden_act="silu")

    @classmethod
    def from_hf(cls, cfg: dict) -> Glm4MoeLiteConfig:
        cfg = dict(cfg)
        for key, value in cls.HF_DEFAULTS.items():
            if cfg.get(key) is None:
                cfg[key] = value
        if cfg.get("n_routed_experts") is None and cfg.get("num_local_experts") is not None:  # attribute_map
            cfg["n_routed_experts"] = cfg["num_local_experts"]
        cfg.setdefault("q_lora_rank", 768)  # transformers' default where the key is absent; null: no query LoRA
        base = super().from_hf(cfg)  # the V3 fields and their checks
        layers = base.num_hidden_layers
        types = cfg.get("mlp_layer_types")
        if types is None:
            dense = int(cfg.get("first_k_dense_replace") or cls.DEFAULTS["first_k_dense_replace"])
            types = ["dense"] * dense + ["sparse"] * (layers - dense)
        if len(types) != layers or any(t not in LAYER_TYPES for t in types):
            raise CadenzaError(
                f"config.json's mlp_layer_types has {len(types)} entries for num_hidden_layers={layers} (values "
                f"{sorted(set(map(str, types)))}); it needs one per layer, each 'dense' or 'sparse'. Fix config.json."
            )
        base.mlp_layer_types = list(types)
        if base.rope.partial_rotary_factor != 1.0:
            raise CadenzaError(
                f"config.json has partial_rotary_factor={base.rope.partial_rotary_factor}; GLM-4.7-Flash turns the "
                f"whole qk_rope_head_dim={base.qk_rope_head_dim} part of each head (transformers fails on any other "
                "value). Remove partial_rotary_factor from config.json."
            )
        return base

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has routed experts (else a dense MLP of intermediate_size)."""
        return self.mlp_layer_types[layer_idx] == "sparse"


class Glm4MoeLiteDecoderLayer(DeepseekV3DecoderLayer):
    moe_class = Glm4MoeMoE  # DeepSeek's MoE block with GLM's float32 router (Glm4MoeLiteMoE in transformers)


class Glm4MoeLiteModel(DeepseekV3Model):
    decoder_layer_class = Glm4MoeLiteDecoderLayer


class Glm4MoeLiteForCausalLM(DeepseekV3ForCausalLM):
    model_class = Glm4MoeLiteModel
