"""Qwen3-Next (Qwen3-Next-80B-A3B), following transformers/models/qwen3_next/modeling_qwen3_next.py (same class and
parameter names).

Three of every four layers (`layer_types`, from `full_attention_interval`) replace attention by a Gated DeltaNet
(`linear_attn`): a linear-attention layer whose memory is a fixed-size state per sequence rather than keys and values
per token (cadenza/models/gated_deltanet.py has the equations). Its projections give q, k, v (through a short causal
convolution), an output gate z and the per-head rates b (beta = sigmoid(b)) and a (the decay g = -exp(A_log) *
softplus(a + dt_bias)); its output is RMS-normalised per head, gated by silu(z), and projected back. The cache keeps
each sequence's convolution inputs and state in its slot (cadenza.kv_cache.HybridCache); a slot starting a new
sequence (position 0) reads zeros, whatever it held before.

The other layers are gated attention: q_proj gives each head's query and an output gate side by side, q and k get a
per-head RMSNorm, a quarter of each head turns (partial_rotary_factor 0.25 unless config.json says otherwise), and
the attention's output is scaled by sigmoid(gate) before o_proj. Every norm of the model except the DeltaNet's is
zero-centred: it multiplies by (1 + weight). The MoE block is Qwen-MoE's (softmax top-k, renormalised by
`norm_topk_prob`, a shared expert scaled by sigmoid(shared_expert_gate)). The multi-token-prediction weights
(`mtp.*`) are not built and not read.

Prompts of different lengths are never padded into one pass (`pads_prompts`): padding would flow into the state.

Shape legend: B batch, T tokens, H hidden, N query heads, K key/value heads, D head dim, Hk / Hv the DeltaNet's key /
value heads, dk / dv their dims, C the convolution's channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.kv_cache import HybridCache
from cadenza.models.attention import Attention, AttentionContext, attend
from cadenza.models.common import MLP, CausalLM, DecoderLayer, DecoderModel, RMSNorm
from cadenza.models.gated_deltanet import CHUNK, causal_conv, delta_rule_chunked, delta_rule_step
from cadenza.models.qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
from cadenza.models.rope import apply_rotary_qk

LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass
class Qwen3NextConfig(Qwen2MoeConfig):
    attention_bias: bool = False
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    layer_types: list[str] = field(default_factory=list)

    @classmethod
    def from_hf(cls, cfg: dict) -> Qwen3NextConfig:
        cfg = dict(cfg)
        nested = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not (nested.get("partial_rotary_factor") or cfg.get("partial_rotary_factor")):
            cfg["partial_rotary_factor"] = 0.25  # transformers' default for this family
        for key, value in (("rms_norm_eps", 1e-6), ("max_position_embeddings", 32768), ("head_dim", 256)):
            if cfg.get(key) is None:
                cfg[key] = value
        common = cls.common_fields(cfg)
        n = common["num_hidden_layers"]
        interval = cfg.get("full_attention_interval") or 4
        types = cfg.get("layer_types") or [
            "linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)
        ]
        if len(types) != n or any(t not in LAYER_TYPES for t in types):
            raise CadenzaError(
                f"config.json's layer_types must list {n} entries, each one of {', '.join(LAYER_TYPES)}; it has "
                f"{types}. Fix or remove layer_types in config.json."
            )
        step = cfg.get("decoder_sparse_step") or 1
        get = lambda key, default: cfg[key] if cfg.get(key) is not None else default  # noqa: E731
        config = cls(
            **common,
            num_experts=cls.require(cfg, "num_experts"),
            num_experts_per_tok=cls.require(cfg, "num_experts_per_tok"),
            moe_intermediate_size=cls.require(cfg, "moe_intermediate_size"),
            shared_expert_intermediate_size=cls.require(cfg, "shared_expert_intermediate_size"),
            norm_topk_prob=bool(get("norm_topk_prob", True)),
            decoder_sparse_step=step,
            mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
            attention_bias=bool(get("attention_bias", False)),
            linear_conv_kernel_dim=int(get("linear_conv_kernel_dim", 4)),
            linear_key_head_dim=int(get("linear_key_head_dim", 128)),
            linear_value_head_dim=int(get("linear_value_head_dim", 128)),
            linear_num_key_heads=int(get("linear_num_key_heads", 16)),
            linear_num_value_heads=int(get("linear_num_value_heads", 32)),
            layer_types=list(types),
        )
        config.check()
        return config

    def check(self) -> None:
        """Values transformers would crash on, reported as the config mistake they are."""
        hk, hv = self.linear_num_key_heads, self.linear_num_value_heads
        e, k = self.num_experts, self.num_experts_per_tok
        if hk < 1 or hv % hk:
            raise CadenzaError(
                f"config.json has linear_num_value_heads={hv} and linear_num_key_heads={hk}: each key head serves a "
                "whole number of value heads, so the value heads must be a multiple of the key heads. Fix config.json."
            )
        if not 1 <= k <= e:
            raise CadenzaError(
                f"config.json routes each token to num_experts_per_tok={k} of num_experts={e} experts; it must be "
                "between 1 and num_experts. Fix config.json."
            )
        if self.decoder_sparse_step < 1 or self.linear_conv_kernel_dim < 1:
            raise CadenzaError(
                f"config.json has decoder_sparse_step={self.decoder_sparse_step} and linear_conv_kernel_dim="
                f"{self.linear_conv_kernel_dim}; both must be 1 or more. Fix config.json."
            )

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def conv_dim(self) -> int:
        """The convolution's channels: q, k and v of every head."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + self.value_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_workspace_per_token(self) -> int:
        """GPU bytes a prompt token of a linear layer's chunked pass takes at once (float32 q, k, v and the output,
        and the chunk's four [C, C] matrices per value head)."""
        hv, dk, dv = self.linear_num_value_heads, self.linear_key_head_dim, self.linear_value_head_dim
        return 4 * hv * (2 * dk + 2 * dv + 4 * CHUNK + dk)


class Qwen3NextRMSNorm(RMSNorm):
    """Zero-centred RMSNorm: x / rms(x) * (1 + weight), multiplied in float32 before the cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x32 * (1.0 + self.weight.float())).type_as(x)


class Qwen3NextRMSNormGated(nn.Module):
    """The DeltaNet's output norm, per value head: weight * x / rms(x), times silu(gate) in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * x32.to(dtype) * F.silu(gate.float())).to(dtype)


class Qwen3NextAttention(Attention):
    """Gated attention: q_proj gives [query, gate] per head; per-head q/k norms; partial rotary; the output scaled by
    sigmoid(gate) before o_proj."""

    def __init__(self, config: Qwen3NextConfig, layer_idx: int):
        super().__init__(config, layer_idx, qkv_bias=config.attention_bias, o_bias=config.attention_bias)
        n, d = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, 2 * n * d, bias=config.attention_bias)
        self.q_norm = Qwen3NextRMSNorm(d, eps=config.rms_norm_eps)
        self.k_norm = Qwen3NextRMSNorm(d, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.head_dim
        q, gate = self.q_proj(x).view(b, t, -1, 2 * d).chunk(2, dim=-1)  # [B, T, N, D] each
        q = q.transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        q, k = apply_rotary_qk(q, k, ctx.cos, ctx.sin, (self.q_norm, self.k_norm))
        k_all, v_all = ctx.cache.update(self.layer_idx, k, v, ctx)
        out = attend(q, k_all, v_all, ctx, self.scaling).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out * torch.sigmoid(gate.reshape(b, t, -1)))


class Qwen3NextGatedDeltaNet(nn.Module):
    """The linear-attention layer (module doc). Checkpoint names: in_proj_qkvz, in_proj_ba, conv1d.weight [C, 1, K],
    dt_bias, A_log, norm.weight, out_proj."""

    def __init__(self, config: Qwen3NextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = self.num_k_heads * self.head_k_dim, config.value_dim
        h, kernel = config.hidden_size, config.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(config.conv_dim, config.conv_dim, kernel, groups=config.conv_dim, bias=False)
        self.in_proj_qkvz = nn.Linear(h, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(h, 2 * self.num_v_heads, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads), requires_grad=False)
        self.norm = Qwen3NextRMSNormGated(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, h, bias=False)

    def split(self, qkvz: torch.Tensor, ba: torch.Tensor):
        """The projections, laid out per key head as [q, k, v..., z...] and [b..., a...] (each key head with its
        value heads), -> q, k [B, T, Hk, dk], v, z [B, T, Hv, dv], b, a [B, T, Hv]."""
        bsz, t, _ = qkvz.shape
        per = self.num_v_heads // self.num_k_heads
        qkvz = qkvz.view(bsz, t, self.num_k_heads, -1)
        q, k, v, z = qkvz.split([self.head_k_dim, self.head_k_dim, per * self.head_v_dim, per * self.head_v_dim], -1)
        b, a = ba.view(bsz, t, self.num_k_heads, 2 * per).split([per, per], -1)
        v, z = (x.reshape(bsz, t, self.num_v_heads, self.head_v_dim) for x in (v, z))
        return q, k, v, z, b.reshape(bsz, t, -1), a.reshape(bsz, t, -1)

    def project(self, x: torch.Tensor):
        """x [B, T, H] -> q, k [B, T, Hk, dk], v, z [B, T, Hv, dv], b, a [B, T, Hv]."""
        return self.split(self.in_proj_qkvz(x), self.in_proj_ba(x))

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        bsz, t, _ = x.shape
        q, k, v, z, b, a = self.project(x)
        mixed = torch.cat([y.reshape(bsz, t, -1) for y in (q, k, v)], dim=-1).transpose(1, 2)  # [B, C, T]
        state = ctx.cache.state(self.layer_idx)
        rows = ctx.index.rows_t.to(state["conv"].device)
        # a row at position 0 starts a sequence: it reads zeros, whatever its slot held before
        fresh = (ctx.index.starts_t.to(rows.device) == 0)[:, None, None]
        conv_in = state["conv"].index_select(0, rows).masked_fill(fresh, 0)
        mixed, conv_out = causal_conv(mixed, conv_in, self.conv1d.weight[:, 0])
        state["conv"].index_copy_(0, rows, conv_out.to(state["conv"].dtype))
        q, k, v = mixed.transpose(1, 2).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(bsz, t, self.num_k_heads, self.head_k_dim)
        k = k.reshape(bsz, t, self.num_k_heads, self.head_k_dim)
        v = v.reshape(bsz, t, self.num_v_heads, self.head_v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        s0 = state["recurrent"].index_select(0, rows).masked_fill(fresh[..., None], 0)
        rule = delta_rule_step if t == 1 else delta_rule_chunked
        out, s1 = rule(q, k, v, g, beta, s0)
        state["recurrent"].index_copy_(0, rows, s1)
        out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(out.reshape(bsz, t, -1))


class Qwen3NextDecoderLayer(DecoderLayer):
    """A linear-attention layer (`linear_attn`) or a gated attention one (`self_attn`), then the MoE block or, in
    `mlp_only_layers` / off `decoder_sparse_step`, a dense MLP."""

    linear_class: ClassVar[type[nn.Module]] = Qwen3NextGatedDeltaNet

    def __init__(self, config: Qwen3NextConfig, layer_idx: int):
        linear = config.layer_types[layer_idx] == "linear_attention"
        mixer = self.linear_class(config, layer_idx) if linear else Qwen3NextAttention(config, layer_idx)
        if config.is_sparse(layer_idx):
            mlp: nn.Module = Qwen2MoeSparseMoeBlock(config)  # Qwen3NextSparseMoeBlock: the same block
        else:
            mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        super().__init__(config, mixer, mlp, norm_class=Qwen3NextRMSNorm)
        if linear:  # the checkpoint's name for it
            del self.self_attn
            self.linear_attn = mixer

    def attention_residual(self, hidden_states: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        mixer = self.linear_attn if "linear_attn" in self._modules else self.self_attn
        return hidden_states + mixer(self.input_layernorm(hidden_states), ctx)


class Qwen3NextModel(DecoderModel):
    decoder_layer_class: ClassVar[type[nn.Module]] = Qwen3NextDecoderLayer

    def __init__(self, config: Qwen3NextConfig):
        # the rotary tables have int(head_dim * partial_rotary_factor) features, the rotary part of each head
        super().__init__(config, self.decoder_layer_class, norm_class=Qwen3NextRMSNorm)


class Qwen3NextForCausalLM(CausalLM):
    pads_prompts = False  # a padded position would flow into the linear layers' state

    def __init__(self, config: Qwen3NextConfig):
        super().__init__(config, Qwen3NextModel(config))

    def new_cache(self, max_length: int, dtype: torch.dtype, device: torch.device, batch: int = 1) -> HybridCache:
        """Keys and values for the attention layers, a state per slot for the linear ones."""
        c = self.config
        return HybridCache(
            c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_length, dtype, device,
            c.linear_layers, (c.conv_dim, c.linear_conv_kernel_dim - 1),
            (c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim),
        )  # fmt: skip
