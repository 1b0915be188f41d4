"""GPT-OSS (gpt-oss-20b, gpt-oss-120b), following transformers/models/gpt_oss/modeling_gpt_oss.py (same class and
parameter names, except that the experts are stacked per matrix as everywhere in cadenza).

What sets it apart:
- attention sinks: a learned logit per head joins every query's softmax and takes its share of the probability
  without contributing a value (`attend_with_sinks`); attention biases;
- sliding-window layers (window 128) alternating with full ones (`layer_types`), YaRN rope;
- a router with a bias, top-4, softmax over the chosen logits;
- experts with biases and a clamped SwiGLU (`alpha`, `limit`, out = (up + 1) * gate * sigmoid(alpha gate)) whose
  gate and up outputs are interleaved in one fused checkpoint tensor `gate_up_proj` [E, H, 2I];
- the published experts in MXFP4 (`*_blocks`, `*_scales`: 4-bit e2m1 values in blocks of 32 sharing an e8m0
  exponent), kept so in memory and dequantized per use (`GptOssExperts`, `mxfp4.py`).

Shape legend: B batch, T new tokens, S cached tokens, H hidden size, N query heads, K key/value heads, D head dim,
E experts, I expert intermediate size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.models.args import ModelArgs
from cadenza.models.attention import Attention, AttentionContext, host_attention, reads_host_cache
from cadenza.models.common import CausalLM, DecoderLayer, DecoderModel, clamped_swiglu_name
from cadenza.models.rope import apply_rotary_qk
from cadenza.moe.experts import Experts

log = logging.getLogger(__name__)

LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' default rope for the family when config.json names none
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


@dataclass
class GptOssConfig(ModelArgs):
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    sliding_window: int | None = 128
    layer_types: list[str] = field(default_factory=list)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    mxfp4: bool = False  # the checkpoint's experts are MXFP4 blocks and scales
    # the checkpoint's experts are transformers' fused tensors; False: one tensor per expert and matrix, as a GGUF
    # file stores them (cadenza.formats.gguf_arch writes this key into the config it derives)
    fused_experts: bool = True

    DEFAULT_ROPE_THETA: ClassVar[float] = 150000.0

    @classmethod
    def from_hf(cls, cfg: dict) -> GptOssConfig:
        cfg = dict(cfg)
        if not (cfg.get("rope_parameters") or cfg.get("rope_scaling")):
            cfg["rope_parameters"] = {**DEFAULT_ROPE, "rope_theta": cfg.get("rope_theta", cls.DEFAULT_ROPE_THETA)}
        fields: dict[str, Any] = cls.common_fields(cfg)
        layers = fields["num_hidden_layers"]
        types = cfg.get("layer_types") or [LAYER_TYPES[(i + 1) % 2 == 0] for i in range(layers)]
        quant = cfg.get("quantization_config") or {}
        config = cls(
            **fields,
            num_local_experts=cls.require(cfg, "num_local_experts"),
            num_experts_per_tok=cls.require(cfg, "num_experts_per_tok"),
            sliding_window=cfg.get("sliding_window"),
            layer_types=list(types),
            swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
            attention_bias=bool(cfg.get("attention_bias", True)),
            mxfp4=isinstance(quant, dict) and quant.get("quant_method") == "mxfp4",
            fused_experts=bool(cfg.get("fused_experts", True)),
        )
        config.check()
        return config

    def check(self) -> None:
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if len(self.layer_types) != self.num_hidden_layers or bad:
            raise CadenzaError(
                f"config.json's layer_types has {len(self.layer_types)} entries {sorted(set(bad)) or ''} for "
                f"{self.num_hidden_layers} layers; it must name each layer {' or '.join(LAYER_TYPES)}. Correct "
                "config.json (or remove layer_types for the family's alternating default)."
            )
        if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) > 0:
            raise CadenzaError(
                f"config.json has sliding-attention layers but sliding_window={self.sliding_window!r}; it must be a "
                "positive number of tokens (gpt-oss: 128). Correct config.json."
            )
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise CadenzaError(
                f"config.json routes each token to num_experts_per_tok={self.num_experts_per_tok} of "
                f"num_local_experts={self.num_local_experts} experts; it must be between 1 and num_local_experts."
            )
        if self.mxfp4 and (self.hidden_size % 32 or self.intermediate_size % 32):
            raise CadenzaError(
                f"MXFP4 experts come in blocks of 32 weights, but hidden_size={self.hidden_size} and "
                f"intermediate_size={self.intermediate_size} are not both multiples of 32: config.json does not match "
                "the weights."
            )

    def window_of(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None


# --- attention ----------------------------------------------------------------------------------------------------

# queries per chunk of the eager attention: bounds the [B, N, T, S] float32 scores of a long prefill
_QUERY_CHUNK = 256


def attend_with_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, scale: float, sinks: torch.Tensor
) -> torch.Tensor:
    """q [B, N, T, D], k and v [B, K, S, D], sinks [N] -> [B, N, T, D]: softmax over the scores and each head's sink
    logit together, the sink's share dropped. In float32, queries in chunks; the G = N / K query heads that share a
    key/value head are multiplied with it together (no copy of the cache per query head). A host cache: where
    `host_attention` puts the work."""
    if not reads_host_cache(q, ctx):
        return _attend_with_sinks(q, k, v, ctx.mask, scale, sinks)
    return host_attention(lambda *a: _attend_with_sinks(*a, scale, sinks), q, k, v, ctx.mask, scale, sinks)


def _attend_with_sinks(q, k, v, mask: torch.Tensor | None, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    b, n, t, d = q.shape
    kv = k.shape[1]
    g = n // kv
    k32, v32 = k.float(), v.float()  # (no copy when the cache is float32)
    s = k.shape[2]
    if mask is None and t > 1:  # plain causal from position 0 (`is_causal`)
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    sink = sinks.to(q.device).float().view(1, kv, g, 1, 1)
    q5 = q.view(b, kv, g, t, d)
    out = []
    for t0 in range(0, t, _QUERY_CHUNK):
        tc = min(t, t0 + _QUERY_CHUNK) - t0
        qc = q5[:, :, :, t0 : t0 + tc].float().reshape(b, kv, g * tc, d)
        scores = ((qc @ k32.transpose(-1, -2)) * scale).view(b, kv, g, tc, s)
        if mask is not None:  # [T, S] or [B, 1, T, S] -> broadcast over the heads of a group
            scores = scores.masked_fill(~mask[..., t0 : t0 + tc, :].unsqueeze(-3), float("-inf"))
        combined = torch.cat((scores, sink.expand(b, kv, g, tc, 1)), dim=-1)
        probs = torch.softmax(combined - combined.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
        out.append((probs.reshape(b, kv, g * tc, s) @ v32).view(b, n, tc, d))
    return torch.cat(out, dim=2).to(v.dtype)


class GptOssAttention(Attention):
    """Grouped-query attention with biases, per-head sinks, and this layer's window (None: full)."""

    def __init__(self, config: GptOssConfig, layer_idx: int):
        super().__init__(
            config,
            layer_idx,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
        )
        self.sliding_window = config.window_of(layer_idx)
        self.sinks = nn.Parameter(torch.empty(config.num_attention_heads), requires_grad=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q, k = apply_rotary_qk(q, k, ctx.cos, ctx.sin)
        k_all, v_all = ctx.cache.update(self.layer_idx, k, v, ctx)  # [B, K, S, D]
        out = attend_with_sinks(q, k_all, v_all, ctx, self.scaling, self.sinks)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


# --- experts ------------------------------------------------------------------------------------------------------


class GptOssExperts(Experts):
    """The routed experts, stacked gate / up [E, I, H] and down [E, H, I] with their biases, filled from the
    checkpoint's fused tensors: `gate_up_proj` [E, H, 2I] (gate and up outputs interleaved: column 2j is gate row j,
    2j + 1 up row j) with `gate_up_proj_bias` [E, 2I], `down_proj` [E, I, H] with `down_proj_bias` [E, H]; in an
    MXFP4 checkpoint `{gate_up,down}_proj_blocks` [E, rows, cols / 32, 16] and `_scales` [E, rows, cols / 32] instead
    (rows: output features, gate/up interleaved the same way). A GGUF's experts come one per expert and matrix
    (`{e}.gate_proj.weight` [I, H], `{e}.gate_bias` [I], ...), as the base class reads them.

    MXFP4 experts stay MXFP4 in memory (`storage` "mxfp4"): the stacks are each matrix's blocks [E, rows, cols / 32,
    16] and scales [E, rows, cols / 32] (uint8, the checkpoint's bytes, gate and up rows de-interleaved), 0.53 bytes a
    weight wherever they are (host, GPU residents, fetch slots), and each use dequantizes its expert
    (`cadenza.moe.experts.expert_ffn`): exact, at the cost of that dequantization until MXFP4 kernels exist."""

    PARTS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    MXFP4_STACKS = ("gate_blocks", "gate_scales", "up_blocks", "up_scales", "down_blocks", "down_scales")

    def __init__(self, config: GptOssConfig):
        super().__init__(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
            clamped_swiglu_name(config.swiglu_alpha, config.swiglu_limit),
            bias=True,
        )
        self.mxfp4, self.fused = config.mxfp4, config.fused_experts
        self.storage = "mxfp4" if self.mxfp4 else "plain"
        self._parts: set[str] = set()
        self._pending: dict[str, torch.Tensor] = {}  # MXFP4 blocks waiting for their scales, or scales for blocks
        if self.mxfp4:  # the blocks replace the plain stacks, which would never be filled
            e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
            for name in (self.gate_name, self.up_name, self.down_name):
                del self._parameters[name]
            for name, rows, cols in (("gate", i, h), ("up", i, h), ("down", h, i)):
                blocks = torch.empty(e, rows, cols // 32, 16, dtype=torch.uint8)
                self.register_parameter(f"{name}_blocks", nn.Parameter(blocks, requires_grad=False))
                scales = torch.empty(e, rows, cols // 32, dtype=torch.uint8)
                self.register_parameter(f"{name}_scales", nn.Parameter(scales, requires_grad=False))

    def loaded(self, on_host: bool) -> None:
        if on_host and self.mxfp4 and self.packed is None and self.complete:
            self.pack_blocks()

    def pack_blocks(self) -> None:
        """The MXFP4 stacks (on the host) -> the kernels' mxfp4 tiles (cadenza.kernels.blocks: the same bits,
        rearranged; 0.53 bytes a weight, rows and columns padded to 128), the stacks dropped: from then on the CPU
        kernel and the packed layouts' GPU kernels compute these experts, biases and clamped SwiGLU included."""
        from cadenza.kernels.blocks import from_hf_mxfp4
        from cadenza.kernels.layout import empty_packed, write_block_expert

        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        out = empty_packed("mxfp4", None, e, h, i)
        for x in range(e):
            mats = [
                from_hf_mxfp4(getattr(self, f"{n}_blocks")[x], getattr(self, f"{n}_scales")[x])
                for n in ("gate", "up", "down")
            ]
            write_block_expert(out, x, *mats)
        self.set_packed(out)

    def stack_names(self) -> tuple[str, ...]:
        if self.mxfp4:
            return self.MXFP4_STACKS + ("gate_bias", "up_bias", "down_bias")
        return super().stack_names()

    def expert_nbytes_as(self, fmt: str, group: int | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
        # host MXFP4 experts become mxfp4 tiles at load (`pack_blocks`): that size, with the biases
        return super().expert_nbytes_as("mxfp4" if self.mxfp4 and fmt == "bf16" else fmt, group, dtype)

    def checkpoint_shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        if not self.fused:  # one tensor per expert and stack (a GGUF's), named after the stack
            shapes = {n: tuple(getattr(self, n.removesuffix(".weight")).shape[1:]) for n in self._row_names()}
            return {f"{prefix}{x}.{n}": shape for x in range(e) for n, shape in shapes.items()}
        out = {f"{prefix}gate_up_proj_bias": (e, 2 * i), f"{prefix}down_proj_bias": (e, h)}
        if self.mxfp4:
            for name, rows, cols in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
                out[f"{prefix}{name}_blocks"] = (e, rows, cols // 32, 16)
                out[f"{prefix}{name}_scales"] = (e, rows, cols // 32)
        else:
            out.update({f"{prefix}gate_up_proj": (e, h, 2 * i), f"{prefix}down_proj": (e, i, h)})
        return out

    def load_checkpoint_tensor(self, rest, tensor, device, dtype, alloc=None) -> bool:
        if self.packed is not None and not rest.endswith("_bias"):  # a GGUF's kept blocks: its biases come after
            raise ValueError(f"expert tensor {rest} arrived after the layer was packed")
        if not self.fused:
            return self._load_row(rest, tensor, device, dtype, alloc)
        if rest.endswith(("_blocks", "_scales")):
            base, _, kind = rest.rpartition("_")
            other = f"{base}_{'scales' if kind == 'blocks' else 'blocks'}"
            if other not in self._pending:
                self._pending[rest] = tensor
                return False
            pair = (tensor, self._pending.pop(other))
            blocks, scales = pair if kind == "blocks" else pair[::-1]
            self._fill_mxfp4(base, blocks, scales, device)
        else:
            self._fill(rest, tensor, device, dtype, alloc)
        return self.complete

    def _fill_mxfp4(self, part: str, blocks: torch.Tensor, scales: torch.Tensor, device) -> None:
        """An MXFP4 part's blocks and scales into their stacks as they are (gate_up's rows split into gate and up)."""
        halves = {"gate_up_proj": (("gate", 0, 2), ("up", 1, 2)), "down_proj": (("down", 0, 1),)}[part]
        for name, first, step in halves:
            for kind, src in (("blocks", blocks), ("scales", scales)):
                stacked = getattr(self, f"{name}_{kind}")
                if stacked.is_meta:
                    stacked = nn.Parameter(torch.empty(stacked.shape, dtype=torch.uint8, device=device), False)
                    self.register_parameter(f"{name}_{kind}", stacked)
                stacked.data.copy_(src[:, first::step])
        self._parts.add(part)

    def _fill(self, part, tensor, device, dtype, alloc) -> None:
        """One checkpoint part into the stacks, expert by expert."""
        targets = {
            "gate_up_proj": (self.gate_name, self.up_name),
            "gate_up_proj_bias": ("gate_bias", "up_bias"),
            "down_proj": (self.down_name,),
            "down_proj_bias": ("down_bias",),
        }[part]
        stacks = []
        for name in targets:
            stacked = getattr(self, name)
            if stacked.is_meta:
                data = (alloc or _empty)(stacked.shape, dtype, device)
                stacked = nn.Parameter(data, requires_grad=False)
                self.register_parameter(name, stacked)
            stacks.append(stacked.data)
        for e in range(self.num_experts):  # one expert at a time: the transposed temporaries stay small
            w = tensor[e]
            if part == "gate_up_proj":  # [H, 2I]: gate and up columns interleaved
                stacks[0][e].copy_(w.T[0::2])
                stacks[1][e].copy_(w.T[1::2])
            elif part == "gate_up_proj_bias":
                stacks[0][e].copy_(w[0::2])
                stacks[1][e].copy_(w[1::2])
            elif part == "down_proj":  # [I, H]
                stacks[0][e].copy_(w.T)
            else:
                stacks[0][e].copy_(w)
        self._parts.add(part)

    def _row_names(self) -> list[str]:
        """A GGUF's per-expert tensor names (after `{e}.`): the plain matrices keep the HF `.weight` suffix."""
        plain = (self.gate_name, self.up_name, self.down_name)
        return [f"{n}.weight" if n in plain else n for n in self.stack_names()]

    def _load_row(self, rest, tensor, device, dtype, alloc) -> bool:
        """One expert's matrix (`{e}.{name}.weight`), MXFP4 blocks or scales (`{e}.gate_blocks`, ...) or bias
        (`{e}.gate_bias`, ...), into row e of its stack."""
        e_str, _, name = rest.partition(".")
        name = name.removesuffix(".weight")
        stacked = getattr(self, name)
        if stacked.is_meta:
            kind = torch.uint8 if name.endswith(("_blocks", "_scales")) else dtype
            stacked = nn.Parameter((alloc or _empty)(stacked.shape, kind, device), requires_grad=False)
            self.register_parameter(name, stacked)
        stacked.data[int(e_str)].copy_(tensor)
        self._filled.add((int(e_str), name))
        return self.complete

    @property
    def complete(self) -> bool:
        if not self.fused:
            return self.packed is not None or len(self._filled) == len(self.stack_names()) * self.num_experts
        return self.packed is not None or len(self._parts) == len(self.PARTS)


def _empty(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class GptOssTopKRouter(nn.Module):
    """logits = W x + b [T, E]; the top-k logits, softmaxed among themselves, weight the chosen experts."""

    def __init__(self, config: GptOssConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(config.num_local_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_weights [T, k] (x's dtype), topk_ids [T, k]."""
        router_logits = F.linear(x, self.weight, self.bias)
        top_values, topk_ids = torch.topk(router_logits, self.top_k, dim=-1)
        return torch.softmax(top_values, dim=1, dtype=top_values.dtype), topk_ids


class GptOssMLP(nn.Module):
    def __init__(self, config: GptOssConfig):
        super().__init__()
        self.router = GptOssTopKRouter(config)
        self.experts = GptOssExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        topk_weights, topk_ids = self.router(x)
        return self.experts(x, topk_ids, topk_weights.float()).reshape(b, t, h)


class GptOssDecoderLayer(DecoderLayer):
    def __init__(self, config: GptOssConfig, layer_idx: int):
        super().__init__(config, GptOssAttention(config, layer_idx), GptOssMLP(config))


class GptOssModel(DecoderModel):
    def __init__(self, config: GptOssConfig):
        super().__init__(config, GptOssDecoderLayer)
        self.layer_windows = [config.window_of(i) for i in range(config.num_hidden_layers)]


class GptOssForCausalLM(CausalLM):
    reads_mxfp4 = True  # the loader lets an MXFP4 quantization_config through: these experts read the blocks

    def __init__(self, config: GptOssConfig):
        super().__init__(config, GptOssModel(config))
