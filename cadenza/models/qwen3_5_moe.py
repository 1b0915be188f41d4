"""Qwen3.5 MoE (Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B), text only, following
transformers/models/qwen3_5_moe/modeling_qwen3_5_moe.py (same class and parameter names).

The text model is Qwen3-Next's (qwen3_next.py: Gated DeltaNet layers between gated-attention ones, zero-centred
norms, a shared expert beside the routed ones) with two differences: the DeltaNet's projections are four plain
matrices (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`) instead of two interleaved per key head, and every
layer has routed experts whose top-k weights are always renormalised. Its rotary embedding is multimodal (separate
time, height and width positions, `mrope_section`); for text the three positions are the token's, so it is the
ordinary rotary embedding over the rotary quarter of each head.

The published checkpoints are the multimodal `Qwen3_5MoeForConditionalGeneration`: the text model's keys live in
`text_config` and its tensors under `model.language_model.` (the LM head at the top, `lm_head.weight`); the vision
tower (`model.visual.*`) is not built, so its tensors are never read. Images and video are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cadenza.models.qwen3_next import (
    Qwen3NextConfig,
    Qwen3NextDecoderLayer,
    Qwen3NextForCausalLM,
    Qwen3NextGatedDeltaNet,
    Qwen3NextModel,
)


@dataclass
class Qwen3_5MoeTextConfig(Qwen3NextConfig):
    @classmethod
    def from_hf(cls, cfg: dict) -> Qwen3_5MoeTextConfig:
        cfg = dict(cfg)
        if "text_config" in cfg:  # the multimodal config.json: the text model's keys live in text_config
            tie = cfg.get("tie_word_embeddings")  # the multimodal model's own LM head decides
            cfg = dict(cfg["text_config"] or {})
            if tie is not None:
                cfg["tie_word_embeddings"] = tie
        # transformers' Qwen3.5 MoE reads none of these: every layer routed, the top-k weights renormalised
        cfg.update(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        return super().from_hf(cfg)


class Qwen3_5MoeGatedDeltaNet(Qwen3NextGatedDeltaNet):
    """Qwen3-Next's layer with four plain projections: q, k, v side by side (all heads of each), z, b and a."""

    def __init__(self, config: Qwen3_5MoeTextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.in_proj_qkvz, self.in_proj_ba
        h = config.hidden_size
        self.in_proj_qkv = nn.Linear(h, 2 * self.key_dim + self.value_dim, bias=False)
        self.in_proj_z = nn.Linear(h, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(h, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(h, self.num_v_heads, bias=False)

    def project(self, x: torch.Tensor):
        bsz, t, _ = x.shape
        q, k, v = self.in_proj_qkv(x).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(bsz, t, self.num_k_heads, self.head_k_dim)
        k = k.reshape(bsz, t, self.num_k_heads, self.head_k_dim)
        v = v.reshape(bsz, t, self.num_v_heads, self.head_v_dim)
        z = self.in_proj_z(x).reshape(bsz, t, self.num_v_heads, self.head_v_dim)
        return q, k, v, z, self.in_proj_b(x), self.in_proj_a(x)


class Qwen3_5MoeDecoderLayer(Qwen3NextDecoderLayer):
    linear_class = Qwen3_5MoeGatedDeltaNet


class Qwen3_5MoeTextModel(Qwen3NextModel):
    decoder_layer_class = Qwen3_5MoeDecoderLayer


class Qwen3_5MoeForCausalLM(Qwen3NextForCausalLM):
    """The text model alone (`model.*`, `lm_head.weight`)."""

    def __init__(self, config: Qwen3_5MoeTextConfig):
        nn.Module.__init__(self)
        self.config = config
        self.model = Qwen3_5MoeTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class Qwen3_5MoeForConditionalGeneration(Qwen3NextForCausalLM):
    """The hub's multimodal checkpoint, text only: the text model at `model.language_model.*`, the LM head at
    `lm_head.weight`."""

    def __init__(self, config: Qwen3_5MoeTextConfig):
        nn.Module.__init__(self)
        self.config = config
        holder = nn.Module()  # (transformers' Qwen3_5MoeModel, of which only the language model is built)
        holder.language_model = Qwen3_5MoeTextModel(config)
        self._modules["model"] = holder
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def model(self) -> Qwen3_5MoeTextModel:
        return self._modules["model"].language_model
