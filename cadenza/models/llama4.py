"""Llama-4 text (the language model of Llama-4 Scout and Maverick), following
transformers/models/llama4/modeling_llama4.py (same class and parameter names, except that the experts are stacked
per matrix as everywhere in cadenza).

What sets it apart:
- two kinds of layers by `no_rope_layers` (1: rope, 0: NoPE; default every 4th layer NoPE). Rope layers rotate q/k
  as complex numbers, i.e. interleaved pairs (x0, x1), (x2, x3)..., in float32 (`apply_rotary_interleaved`), then
  under `use_qk_norm` L2-normalise each head's q and k (no weight); with `attention_chunk_size` they attend only
  within fixed chunks of absolute positions (`layer_types` "chunked_attention": key k is visible to query q when
  k <= q and k // chunk == q // chunk). NoPE layers attend to every earlier position and, under
  `attn_temperature_tuning`, scale their queries by log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1;
- dense layers (an MLP of `intermediate_size_mlp`) interleaved with MoE layers (`moe_layers`, default every
  `interleave_moe_layer_step`-th layer);
- the MoE: a shared expert (an MLP of intermediate_size) plus routed experts; the router takes the top-k logits and
  their sigmoids scale each expert's INPUT (expert(x * s), not s * expert(x): the expert is nonlinear). On the seam
  each (token, slot) pair becomes its own row x * s routed to its one expert with weight 1 (`Llama4TextMoe`);
- the checkpoint's experts fused: `gate_up_proj` [E, H, 2I] (gate the first I columns, up the last I: a chunk, not
  an interleave) and `down_proj` [E, I, H], both x @ W (`Llama4TextExperts`).

The hub's config.json is the multimodal `Llama4ForConditionalGeneration` with the text model's keys in
`text_config` and its tensors under `language_model.`: `Llama4ForConditionalGeneration` here builds the text model
under that prefix and never reads the vision tower's tensors.

Shape legend: B batch, T new tokens, S cached tokens, H hidden size, N query heads, K key/value heads, D head dim,
E experts, I expert intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.models.args import ModelArgs
from cadenza.models.attention import Attention, AttentionContext, attend
from cadenza.models.common import MLP, CausalLM, DecoderLayer, DecoderModel
from cadenza.models.rope import RotaryEmbedding, apply_rotary_interleaved
from cadenza.moe.experts import Experts

LAYER_TYPES = ("chunked_attention", "full_attention")


@dataclass
class Llama4TextConfig(ModelArgs):
    intermediate_size_mlp: int = 16384
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: list[int] = field(default_factory=list)
    use_qk_norm: bool = True
    no_rope_layers: list[int] = field(default_factory=list)  # per layer: 1 rope, 0 NoPE
    attention_chunk_size: int | None = 8192
    layer_types: list[str] = field(default_factory=list)
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False

    DEFAULT_ROPE_THETA: ClassVar[float] = 500000.0
    # transformers' Llama4TextConfig defaults, for keys a config.json leaves out (or sets to null). Shapes are not
    # here: a config without them is incomplete, and says so.
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        hidden_act="silu",
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-5,
        intermediate_size_mlp=16384,
        num_local_experts=16,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        use_qk_norm=True,
        no_rope_layer_interval=4,
        attn_temperature_tuning=True,
        floor_scale=8192,
        attn_scale=0.1,
        attention_bias=False,
    )

    @classmethod
    def from_hf(cls, cfg: dict) -> Llama4TextConfig:
        cfg = dict(cfg)
        if "text_config" in cfg:  # the multimodal config.json: the text model's keys live in text_config
            cfg = dict(cfg["text_config"] or {})
        for key, value in cls.DEFAULTS.items():
            if cfg.get(key) is None:
                cfg[key] = value
        fields = cls.common_fields(cfg)
        layers = fields["num_hidden_layers"]
        interval = int(cfg["no_rope_layer_interval"])
        if interval < 1 and not cfg.get("no_rope_layers"):
            raise CadenzaError(
                f"config.json has no_rope_layer_interval={interval}; it must be at least 1 (Llama-4: 4). Fix "
                "config.json."
            )
        no_rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
        step = int(cfg["interleave_moe_layer_step"])
        moe_layers = cfg.get("moe_layers")
        if moe_layers is None:
            if step < 1:
                raise CadenzaError(
                    f"config.json has interleave_moe_layer_step={step}; it must be at least 1 (every step-th layer "
                    "has experts). Fix config.json."
                )
            moe_layers = list(range(step - 1, layers, step))
        chunk = cfg.get("attention_chunk_size", 8192)
        types = cfg.get("layer_types") or [
            "chunked_attention" if r and chunk is not None else "full_attention" for r in no_rope
        ]
        config = cls(
            **fields,
            intermediate_size_mlp=int(cfg["intermediate_size_mlp"]),
            num_local_experts=int(cfg["num_local_experts"]),
            num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            moe_layers=[int(i) for i in moe_layers],
            use_qk_norm=bool(cfg["use_qk_norm"]),
            no_rope_layers=[int(r) for r in no_rope],
            attention_chunk_size=None if chunk is None else int(chunk),
            layer_types=list(types),
            attn_temperature_tuning=bool(cfg["attn_temperature_tuning"]),
            floor_scale=cfg["floor_scale"],
            attn_scale=float(cfg["attn_scale"]),
            attention_bias=bool(cfg["attention_bias"]),
        )
        config.check()
        return config

    def check(self) -> None:
        """Values transformers would crash on (or silently misread), reported as the config mistake they are."""
        n = self.num_hidden_layers
        if len(self.no_rope_layers) < n or any(r not in (0, 1) for r in self.no_rope_layers):
            raise CadenzaError(
                f"config.json's no_rope_layers has {len(self.no_rope_layers)} entries for {n} layers; it needs one per "
                "layer, 1 for a rope layer and 0 for a NoPE layer. Fix config.json (or remove no_rope_layers for "
                "the default: every no_rope_layer_interval-th layer NoPE)."
            )
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if len(self.layer_types) < n or bad:
            raise CadenzaError(
                f"config.json's layer_types has {len(self.layer_types)} entries {sorted(set(bad)) or ''} for {n} "
                f"layers; it must name each layer {' or '.join(LAYER_TYPES)}. Fix config.json (or remove layer_types "
                "for the default derived from no_rope_layers)."
            )
        if "chunked_attention" in self.layer_types[:n] and not (self.attention_chunk_size or 0) > 0:
            raise CadenzaError(
                f"config.json has chunked-attention layers but attention_chunk_size={self.attention_chunk_size!r}; it "
                "must be a positive number of tokens (Llama-4: 8192). Fix config.json."
            )
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise CadenzaError(
                f"config.json routes each token to num_experts_per_tok={self.num_experts_per_tok} of "
                f"num_local_experts={self.num_local_experts} experts; it must be between 1 and num_local_experts."
            )
        wrong = [i for i in self.moe_layers if not 0 <= i < n]
        if wrong:
            raise CadenzaError(
                f"config.json's moe_layers names layers {wrong}, but the model has {n} layers (0..{n - 1}). Fix "
                "config.json."
            )
        if self.attn_temperature_tuning and not (self.floor_scale or 0) > 0:
            raise CadenzaError(
                f"config.json has floor_scale={self.floor_scale!r} with attn_temperature_tuning on; it must be a "
                "positive number of tokens (Llama-4: 8192). Fix config.json."
            )

    def chunk_of(self, layer_idx: int) -> int | None:
        """The attention chunk of layer `layer_idx` (None: full causal attention)."""
        return self.attention_chunk_size if self.layer_types[layer_idx] == "chunked_attention" else None


# --- attention ----------------------------------------------------------------------------------------------------


def for_chunk(ctx: AttentionContext, chunk: int | None) -> AttentionContext:
    """`ctx` with the causal mask narrowed to the query's own chunk of `chunk` absolute positions: key k is visible
    to query q when k <= q and k // chunk == q // chunk (transformers' create_chunked_causal_mask). None: ctx."""
    if chunk is None:
        return ctx
    device = ctx.cache.device
    if ctx.start is not None:
        s = ctx.start + ctx.t
        if s <= chunk:  # every position in the first chunk: plain causal
            return ctx
        q = torch.arange(ctx.start, s, device=device)[:, None]
        k = torch.arange(0, s, device=device)[None, :]
    else:
        q = ctx.index.starts_t[:, None, None, None]  # [B, 1, T=1, 1]
        k = torch.arange(ctx.end, device=device)
    mask = (k <= q) & (torch.div(k, chunk, rounding_mode="floor") == torch.div(q, chunk, rounding_mode="floor"))
    return replace(ctx, mask=mask, is_causal=False)


def query_positions(ctx: AttentionContext) -> torch.Tensor:
    """The new tokens' positions, shaped to scale q [B, N, T, D]: [1, 1, T, 1] or [B, 1, 1, 1] (per-row starts)."""
    device = ctx.cos.device  # the queries' (a host cache's own device is the CPU; split layers: their GPU's)
    if ctx.start is not None:
        return torch.arange(ctx.start, ctx.start + ctx.t, device=device).view(1, 1, -1, 1)
    return ctx.index.starts_t.to(device).view(-1, 1, 1, 1)


class Llama4TextL2Norm(nn.Module):
    """x / rms(x) over the last dim in float32, no weight (the q/k norm of the rope layers)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class Llama4TextAttention(Attention):
    """GQA; rope layers rotate interleaved pairs in float32 and optionally L2-normalise q/k after; NoPE layers scale
    their queries by position (temperature tuning). Which positions are visible is the context's mask."""

    def __init__(self, config: Llama4TextConfig, layer_idx: int):
        super().__init__(
            config,
            layer_idx,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
        )
        self.use_rope = bool(config.no_rope_layers[layer_idx])
        self.attn_temperature_tuning = config.attn_temperature_tuning
        self.floor_scale, self.attn_scale = config.floor_scale, config.attn_scale
        if config.use_qk_norm and self.use_rope:
            self.qk_norm = Llama4TextL2Norm(config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        if self.use_rope:
            q, k = apply_rotary_interleaved(q, ctx.cos, ctx.sin), apply_rotary_interleaved(k, ctx.cos, ctx.sin)
        if hasattr(self, "qk_norm"):
            q, k = self.qk_norm(q), self.qk_norm(k)
        if self.attn_temperature_tuning and not self.use_rope:
            positions = query_positions(ctx).float()
            scales = torch.log1p(torch.floor((positions + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scales).to(q.dtype)
        k_all, v_all = ctx.cache.update(self.layer_idx, k, v, ctx)  # [B, K, S, D]
        return self.o_proj(attend(q, k_all, v_all, ctx, self.scaling).transpose(1, 2).reshape(b, t, -1))


class Llama4TextRotaryEmbedding(RotaryEmbedding):
    """The usual tables, always float32: the reference multiplies q and k as complex float32 numbers and rounds once
    after."""

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(positions, torch.float32)


# --- experts ------------------------------------------------------------------------------------------------------


class Llama4TextExperts(Experts):
    """The routed experts, stacked gate / up [E, I, H] and down [E, H, I], filled from the checkpoint's fused
    tensors `gate_up_proj` [E, H, 2I] (x @ W; gate the first I columns, up the last I) and `down_proj` [E, I, H]."""

    PARTS = ("gate_up_proj", "down_proj")

    def __init__(self, config: Llama4TextConfig):
        super().__init__(config.num_local_experts, config.hidden_size, config.intermediate_size, config.hidden_act)
        self._parts: set[str] = set()

    def checkpoint_shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        return {f"{prefix}gate_up_proj": (e, h, 2 * i), f"{prefix}down_proj": (e, i, h)}

    def load_checkpoint_tensor(self, rest, tensor, device, dtype, alloc=None) -> bool:
        if self.packed is not None:
            raise ValueError(f"expert tensor {rest} arrived after the layer was packed")
        targets = {"gate_up_proj": (self.gate_name, self.up_name), "down_proj": (self.down_name,)}[rest]
        stacks = []
        for name in targets:
            stacked = getattr(self, name)
            if stacked.is_meta:
                data = (alloc or _empty)(stacked.shape, dtype, device)
                stacked = nn.Parameter(data, requires_grad=False)
                self.register_parameter(name, stacked)
            stacks.append(stacked.data)
        i = self.intermediate_size
        for e in range(self.num_experts):  # one expert at a time: the transposed temporaries stay small
            w = tensor[e]
            if rest == "gate_up_proj":  # [H, 2I]: gate columns, then up columns
                stacks[0][e].copy_(w[:, :i].T)
                stacks[1][e].copy_(w[:, i:].T)
            else:  # [I, H]
                stacks[0][e].copy_(w.T)
        self._parts.add(rest)
        return self.complete

    @property
    def complete(self) -> bool:
        return self.packed is not None or len(self._parts) == len(self.PARTS)


def _empty(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class Llama4TextMLP(MLP):
    """The dense layers' SwiGLU MLP (intermediate_size_mlp) and the shared expert (intermediate_size)."""


class Llama4Router(nn.Module):
    """logits = W x [T, E] (checkpoint: `feed_forward.router.weight`); the top-k logits' sigmoids are the scores."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> scores [T, k] (x's dtype, sigmoid in float32 as the reference), topk_ids [T, k]."""
        router_logits = F.linear(x, self.weight)
        top_values, topk_ids = torch.topk(router_logits, self.top_k, dim=1)
        return torch.sigmoid(top_values.float()).to(top_values.dtype), topk_ids


class Llama4TextMoe(nn.Module):
    """Shared expert + routed experts, each routed expert fed x * score. The reference runs every expert on every
    token, scaled by its score (0 for experts not chosen, whose outputs are then exactly 0); here each chosen
    (token, slot) pair is a row x * score routed to its one expert with weight 1, so the seam (and every placement
    and kernel behind it) computes the experts as they are. Top-1: T rows, the shared expert queued by the seam;
    top-k: T * k rows, the k outputs of a token summed after."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.experts = Llama4TextExperts(config)
        self.router = Llama4Router(config)
        self.shared_expert = Llama4TextMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        scores, topk_ids = self.router(x)  # [T, k]
        k = topk_ids.shape[1]
        routed_in = (x[:, None, :] * scores[..., None]).reshape(-1, h)  # [T * k, H], row t * k + j
        ids = topk_ids.reshape(-1, 1)
        ones = torch.ones(ids.shape, dtype=torch.float32, device=x.device)
        if k == 1:
            out = self.experts(routed_in, ids, ones, shared=lambda: self.shared_expert(x))
        else:
            routed = self.experts(routed_in, ids, ones).view(-1, k, h).sum(dim=1)
            out = self.shared_expert(x) + routed
        return out.reshape(b, t, h)


class Llama4TextDecoderLayer(DecoderLayer):
    mlp_name = "feed_forward"

    def __init__(self, config: Llama4TextConfig, layer_idx: int):
        is_moe_layer = layer_idx in config.moe_layers
        if is_moe_layer:
            ff: nn.Module = Llama4TextMoe(config)
        else:
            ff = Llama4TextMLP(config.hidden_size, config.intermediate_size_mlp, config.hidden_act)
        super().__init__(config, Llama4TextAttention(config, layer_idx), ff)
        self.is_moe_layer = is_moe_layer


class Llama4TextModel(DecoderModel):
    def __init__(self, config: Llama4TextConfig):
        super().__init__(config, Llama4TextDecoderLayer, rotary_class=Llama4TextRotaryEmbedding)
        self.layer_windows = [config.chunk_of(i) for i in range(config.num_hidden_layers)]  # chunks, not windows

    def layer_context(self, ctx: AttentionContext, window: int | None) -> AttentionContext:
        """layer_windows holds each layer's attention chunk: the mask keeps a query to its own chunk."""
        return for_chunk(ctx, window)


class Llama4ForCausalLM(CausalLM):
    def __init__(self, config: Llama4TextConfig):
        super().__init__(config, Llama4TextModel(config))


class Llama4ForConditionalGeneration(CausalLM):
    """The hub's multimodal checkpoint, text only: the text model under `language_model.` (its tensors
    `language_model.model.*`, `language_model.lm_head.weight`); the vision tower and projector are not built, so
    their tensors are never read. Images are not supported."""

    def __init__(self, config: Llama4TextConfig):
        nn.Module.__init__(self)  # model and lm_head are the wrapped text model's (properties below)
        if config.tie_word_embeddings:
            raise CadenzaError(
                "config.json's text_config ties the LM head to the embeddings, which no Llama-4 release does; cadenza "
                "reads the multimodal checkpoint's own language_model.lm_head.weight. Fix config.json."
            )
        self.config = config
        self.language_model = Llama4ForCausalLM(config)

    @property
    def model(self) -> Llama4TextModel:
        return self.language_model.model

    @property
    def lm_head(self) -> nn.Linear:
        return self.language_model.lm_head
