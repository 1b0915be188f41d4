"""Phi-3.5-MoE, following transformers/models/phimoe/modeling_phimoe.py (same class names).

What sets it apart from Mixtral: the sparsemixer router (top-2 chosen one after the other, each weighted by a
softmax over only the experts whose logit lies within a relative 2 * router_jitter_noise of the pick), LayerNorm
with bias instead of RMSNorm, biases on q/k/v/o and on the LM head, and LongRoPE whose cos/sin are scaled by the
config's short_mscale / long_mscale. Parameter names follow the hub's checkpoints (`block_sparse_moe.gate`, experts
`w1`/`w3`/`w2`); transformers 5 renames them on load and its save_pretrained writes this layout back.

Shape legend: B batch, T new tokens, H hidden size, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cadenza.kv_cache import KVCache
from cadenza.models.args import ModelArgs
from cadenza.models.attention import Attention
from cadenza.models.common import CausalLM, DecoderLayer, DecoderModel, SparseMoeBlock, last_positions
from cadenza.models.rope import RopeParameters, RotaryEmbedding


@dataclass
class PhimoeConfig(ModelArgs):
    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01
    attention_bias: bool = False
    lm_head_bias: bool = False
    sliding_window: int | None = None

    DEFAULT_ROPE_THETA = 1e6

    @classmethod
    def from_hf(cls, cfg: dict) -> PhimoeConfig:
        # transformers' PhimoeConfig defaults rms_norm_eps (the LayerNorm eps here) to 1e-5 when config.json omits it
        cfg = {"rms_norm_eps": 1e-5, **cfg}
        return cls(
            **cls.common_fields(cfg),
            num_local_experts=cls.require(cfg, "num_local_experts"),
            # sparsemixer picks exactly two experts whatever num_experts_per_tok says (as transformers computes)
            num_experts_per_tok=2,
            router_jitter_noise=float(cfg.get("router_jitter_noise", 0.01)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            lm_head_bias=bool(cfg.get("lm_head_bias", False)),
            sliding_window=cfg.get("sliding_window"),
        )


# --- rotary: LongRoPE with Phi's own mscale ---------------------------------------------------------------------


class PhimoeRotaryEmbedding(RotaryEmbedding):
    """The shared tables (LongRoPE: short factors up to original_max_position_embeddings, long factors past it),
    scaled by short_mscale / long_mscale from the config instead of LongRoPE's derived attention factor (Phi-3.5-MoE:
    1.2432 against the derived 1.1902).

    transformers 5 computes its frequencies without the sequence length, so it always takes the short factors (only
    its mscale switches); the long ones apply here past the switch, as in transformers 4.x and Phi-3.5-MoE's own code.
    """

    def __init__(self, rope: RopeParameters, head_dim: int, max_position_embeddings: int):
        super().__init__(rope, head_dim, max_position_embeddings)
        x = self.extra
        self.short_mscale, self.long_mscale = x.get("short_mscale"), x.get("long_mscale")
        switches = rope.rope_type == "longrope" or (self.short_mscale is not None and self.long_mscale is not None)
        # the length past which the tables (or their mscale) change; None: they never do
        self.switch_at: int | None = (
            x.get("original_max_position_embeddings") if rope.rope_type != "default" and switches else None
        )

    def _update(self, seq_len: int) -> None:
        # the shared hook that picks short or long tables for a pass's length; the mscale follows the same choice
        super()._update(seq_len)
        if self.switch_at is not None and self.short_mscale is not None and self.long_mscale is not None:
            self.attention_scaling = float(self.long_mscale if seq_len > self.switch_at else self.short_mscale)


# --- routing ------------------------------------------------------------------------------------------------------


def sparsemixer(scores: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-MoE's router at inference: scores [T, E] -> (multiplier [T, 2], selected_experts [T, 2]).

    Each of the two picks is the largest remaining logit; its weight is its softmax probability among the
    experts whose logit is within a relative 2 * jitter_eps of it (all others masked to -inf), the first pick
    excluded from the second's softmax. The two weights are not renormalised. Training samples instead (Gumbel).
    """
    weights, picks = [], []
    remaining = scores  # [T, E]; experts already picked are -inf
    for _ in range(2):
        top, idx = remaining.max(dim=-1, keepdim=True)  # [T, 1]
        # relative distance to the pick, measured on the raw scores (the reference's exact formula)
        factor = scores.abs().clamp(min=top)
        far = ((top - scores) / factor) > (2 * jitter_eps)  # [T, E]
        gates = torch.softmax(remaining.masked_fill(far, float("-inf")), dim=-1)
        weights.append(gates.gather(-1, idx))
        picks.append(idx)
        remaining = remaining.scatter(-1, idx, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(picks, dim=-1)


class PhimoeSparseMoeBlock(SparseMoeBlock):
    def __init__(self, config: PhimoeConfig):
        super().__init__(config, config.num_local_experts, config.intermediate_size, names=("w1", "w3", "w2"))
        self.router_jitter_noise = config.router_jitter_noise

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        router_logits = self.gate(x)  # [T, E], in the compute dtype as the reference keeps it
        topk_weights, topk_ids = sparsemixer(router_logits, self.router_jitter_noise)
        return topk_weights.float(), topk_ids


# --- the decoder --------------------------------------------------------------------------------------------------


class PhimoeAttention(Attention):
    """Plain GQA attention; attention_bias puts a bias on all four projections, o_proj included."""

    def __init__(self, config: PhimoeConfig, layer_idx: int):
        super().__init__(config, layer_idx, qkv_bias=config.attention_bias, o_bias=config.attention_bias)


class PhimoeDecoderLayer(DecoderLayer):
    mlp_name = "block_sparse_moe"

    def __init__(self, config: PhimoeConfig, layer_idx: int):
        attn, moe = PhimoeAttention(config, layer_idx), PhimoeSparseMoeBlock(config)
        # LayerNorm with weight and bias; its eps is config.rms_norm_eps, as in the reference
        super().__init__(config, attn, moe, norm_class=nn.LayerNorm)


class PhimoeModel(DecoderModel):
    def __init__(self, config: PhimoeConfig):
        super().__init__(config, PhimoeDecoderLayer, norm_class=nn.LayerNorm, rotary_class=PhimoeRotaryEmbedding)
        self.sliding_window = config.sliding_window


class PhimoeKVCache(KVCache):
    """The KV cache plus the token ids each slot holds: crossing the LongRoPE switch re-runs them (see forward)."""

    token_ids: torch.Tensor | None = None  # [slots, max_length], slot s filled up to lengths[s]

    def remember(self, input_ids: torch.Tensor, rows: list[int]) -> None:
        if self.token_ids is None:
            self.token_ids = torch.empty((self.batch, self.max_length), dtype=torch.long, device=input_ids.device)
        t = input_ids.shape[1]
        for i, r in enumerate(rows):
            self.token_ids[r, self.lengths[r] : self.lengths[r] + t] = input_ids[i]

    def reorder(self, dst, src) -> None:
        super().reorder(dst, src)
        if self.token_ids is not None and list(dst) != list(src):
            d, s = torch.tensor(list(dst)), torch.tensor(list(src))
            self.token_ids.index_copy_(0, d.to(self.token_ids.device), self.token_ids.index_select(0, s.to(d.device)))


class PhimoeForCausalLM(CausalLM):
    def __init__(self, config: PhimoeConfig):
        super().__init__(config, PhimoeModel(config), lm_head_bias=config.lm_head_bias)

    def new_cache(self, max_length: int, dtype: torch.dtype, device: torch.device, batch: int = 1) -> KVCache:
        c = self.config
        return PhimoeKVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_length, dtype, device)

    # LongRoPE picks its factors by the pass's whole length: padding could cross the switch a prompt does not
    pads_prompts = False

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        last_only: bool = False,
        rows: list[int] | None = None,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only, or at row b's position last[b]);
        rows: the cache slots."""
        b, t = input_ids.shape
        rows = list(range(b)) if rows is None else list(rows)
        switch_at = self.model.rotary_emb.switch_at
        if switch_at is not None and isinstance(cache, PhimoeKVCache):
            starts = [cache.lengths[r] for r in rows]
            crossing = [0 < s <= switch_at < s + t for s in starts]
            if any(crossing) and cache.token_ids is not None:
                if b > 1:  # rows cross at different steps: each goes alone (a rare, one-off pass per sequence)
                    own = [None if last is None else last[i : i + 1] for i in range(b)]
                    parts = [
                        self.forward(input_ids[i : i + 1], cache, last_only, [r], o)
                        for i, (r, o) in enumerate(zip(rows, own, strict=True))
                    ]
                    return torch.cat(parts)
                # The sequence passes the LongRoPE switch: keys cached with the short factors no longer fit. As
                # the reference's generate (and Phi-3.5's own code) does, run the whole sequence again, all long.
                input_ids = torch.cat((cache.token_ids[rows[0] : rows[0] + 1, : starts[0]], input_ids), dim=1)
                cache.reset(rows)
            cache.remember(input_ids, rows)
        h = self.model(input_ids, cache, rows)
        return self.lm_head(last_positions(h[:, -t:], last_only, last)).float()
