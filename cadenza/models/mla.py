"""Multi-head latent attention (MLA), DeepSeek-V2's attention, shared by the DeepSeek-V2 and DeepSeek-V3 families
(parameter names as in transformers' DeepseekV2Attention / DeepseekV3Attention).

Shape legend: B batch, T new tokens, S positions in the cache (past + new), H hidden size, N heads, R kv_lora_rank
(the latent), Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim.

Keys and values are low rank. Per position, kv_a_proj_with_mqa makes a latent c [R] (normalised by kv_a_layernorm)
and a rotary key k_pe [Dr] shared by every head; kv_b_proj expands c into each head's key part k_nope [Dn] and value
[Dv]. The cache holds only c and k_pe (`MLACache`): R + Dr numbers per position and layer (576 for DeepSeek-V2/V3),
against N * (Dn + Dr + Dv) for the keys and values they stand for (5120 for V2-Lite's 16 heads). Two ways to
attend, equal in exact arithmetic:

- decompressed: expand the cached latents into per-head keys and values, then ordinary attention. Cheap when many
  queries share the expansion (a prefill chunk);
- absorbed: fold kv_b_proj's key half into the query (q_nope W_UK: a query in latent space) and its value half into
  the output, and attend over the cached latents directly; no per-head key or value is ever made. Each query costs
  N * S * (2R + Dr) instead of expanding all S positions, so decode (T = 1) takes this path.

`absorb` chooses: None (default) picks by token count (`absorb_max_tokens`), True or False forces one path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cadenza.models.attention import AttentionContext, attend
from cadenza.models.common import RMSNorm
from cadenza.models.rope import RopeParameters, apply_rotary

# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default epsilon, whatever rms_norm_eps says
LATENT_NORM_EPS = 1e-6


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction for a context stretched `scale` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(qk_head_dim: int, rope: RopeParameters) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 when the rope is scaled and the config gives
    mscale_all_dim (DeepSeek's YaRN: the cos/sin tables carry mscale / mscale_all_dim, the softmax the rest)."""
    scale = qk_head_dim**-0.5
    extra = rope.extra or {}
    if rope.rope_type != "default" and extra.get("mscale_all_dim"):
        m = yarn_get_mscale(extra["factor"], extra["mscale_all_dim"])
        scale = scale * m * m
    return scale


class MultiHeadLatentAttention(nn.Module):
    """MLA with its latent cache. `config` carries hidden_size, num_attention_heads, q_lora_rank (None: a plain
    q_proj), kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, attention_bias and rope."""

    def __init__(self, config, layer_idx: int, rope_interleave: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        # rotary dimensions laid out as interleaved pairs (x0, x1), (x2, x3)... (DeepSeek's checkpoints) rather than
        # as two halves
        self.rope_interleave = rope_interleave
        self.scaling = softmax_scale(self.qk_head_dim, config.rope)
        self.absorb: bool | None = None  # None: by token count; True / False force the absorbed / decompressed path

        n, h, bias = self.num_heads, self.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, n * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, n * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, n * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n * self.v_head_dim, h, bias=bias)

    @property
    def absorb_max_tokens(self) -> int | float:
        """The most new tokens for which the absorbed path is cheaper. Per cached position, absorbed costs
        N*T*(2R + Dr) multiply-adds; decompressed N*R*(Dn + Dv) to expand it plus N*T*(Dn + Dr + Dv) to attend."""
        r, dn, dv = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
        extra = 2 * r - dn - dv  # absorbed's extra cost per query and position
        return math.inf if extra <= 0 else r * (dn + dv) // extra

    def use_absorbed(self, t: int) -> bool:
        return self.absorb if self.absorb is not None else t <= self.absorb_max_tokens

    def _rope(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """x: [B, heads, T, Dr]. Interleaved pairs are regrouped into halves first: q and k get the same
        permutation, so their dot products (all attention sees) are those of the interleaved rotation."""
        if self.rope_interleave:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rotary(x, ctx.cos, ctx.sin)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        n, r = self.num_heads, self.kv_lora_rank
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, n, self.qk_head_dim).transpose(1, 2)  # [B, N, T, Dn+Dr]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        compressed_kv = self.kv_a_proj_with_mqa(x)  # [B, T, R+Dr]
        kv, k_pe = compressed_kv.split([r, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_a_layernorm(kv).view(b, 1, t, r)  # one "head": shared by all heads
        k_pe = k_pe.reshape(b, 1, t, self.qk_rope_head_dim)
        q_pe, k_pe = self._rope(q_pe, ctx), self._rope(k_pe, ctx)

        kv_all = ctx.cache.write(self.layer_idx, "kv", kv, ctx)  # [B, 1, S, R]
        pe_all = ctx.cache.write(self.layer_idx, "pe", k_pe, ctx)  # [B, 1, S, Dr]
        if self.use_absorbed(t):
            out = self._absorbed(q_nope, q_pe, kv_all, pe_all, ctx)
        else:
            out = self._decompressed(q_nope, q_pe, kv_all, pe_all, ctx)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, n * self.v_head_dim))  # out: [B, N, T, Dv]

    def _decompressed(self, q_nope, q_pe, kv_all, pe_all, ctx: AttentionContext) -> torch.Tensor:
        """Per-head keys and values from the cached latents, then ordinary attention -> [B, N, T, Dv]."""
        b, _, s, _ = kv_all.shape
        n, dn = self.num_heads, self.qk_nope_head_dim
        kv = self.kv_b_proj(kv_all).view(b, s, n, dn + self.v_head_dim).transpose(1, 2)  # [B, N, S, Dn+Dv]
        k_nope, v = kv.split([dn, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, pe_all.expand(b, n, s, self.qk_rope_head_dim)), dim=-1)  # [B, N, S, Dn+Dr]
        return attend(torch.cat((q_nope, q_pe), dim=-1), k, v, ctx, self.scaling)

    def _absorbed(self, q_nope, q_pe, kv_all, pe_all, ctx: AttentionContext) -> torch.Tensor:
        """Attention over the cached latents, kv_b_proj folded into the query and the output -> [B, N, T, Dv].

        Heads and new tokens share one matrix product against the latents ([B, N*T, R] @ [B, R, S]): the cache is
        read once per layer, whatever the number of heads."""
        b, n, t, dn = q_nope.shape
        s, r, dv = kv_all.shape[2], self.kv_lora_rank, self.v_head_dim
        w = self.kv_b_proj.weight.view(n, dn + dv, r)
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # [N, Dn, R], [N, Dv, R]
        q_lat = torch.bmm(q_nope.transpose(0, 1).reshape(n, b * t, dn), w_uk)  # [N, B*T, R]
        q_lat = q_lat.view(n, b, t, r).transpose(0, 1).reshape(b, n * t, r)  # [B, N*T, R]
        c, pe = kv_all[:, 0], pe_all[:, 0]  # [B, S, R], [B, S, Dr]
        scores = torch.bmm(q_lat, c.transpose(1, 2))  # [B, N*T, S]
        scores = scores.baddbmm_(q_pe.reshape(b, n * t, self.qk_rope_head_dim), pe.transpose(1, 2))
        scores = scores.view(b, n, t, s).float() * self.scaling
        mask = ctx.mask
        if mask is None and ctx.is_causal and t > 1:
            mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # mask [T, S] or [B, 1, T, S]
        probs = torch.softmax(scores, dim=-1).to(c.dtype)  # [B, N, T, S]
        o_lat = torch.bmm(probs.view(b, n * t, s), c)  # [B, N*T, R]
        o_lat = o_lat.view(b, n, t, r).transpose(0, 1).reshape(n, b * t, r)  # [N, B*T, R]
        out = torch.bmm(o_lat, w_uv.transpose(1, 2))  # [N, B*T, Dv]
        return out.view(n, b, t, dv).transpose(0, 1)
