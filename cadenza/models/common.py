"""Pieces every family shares: RMSNorm, the dense MLP, the softmax top-k MoE block, the pre-norm decoder layer, and
the decoder stack that runs them (attention: cadenza.models.attention; rotary embeddings: cadenza.models.rope).

Shape legend: B batch, T new tokens, S tokens in the cache (past + new), H hidden size, N query heads, K key/value
heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.kv_cache import Cache, KVCache
from cadenza.models.attention import AttentionContext, RowIndex
from cadenza.models.rope import RotaryEmbedding
from cadenza.moe.routing import softmax_topk

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def act_fn(name: str):
    if name not in ACTIVATIONS:
        raise CadenzaError(
            f"config.json asks for the activation {name!r}, which cadenza does not implement "
            f"(it knows {', '.join(sorted(ACTIVATIONS))}). Check that the config belongs to a supported model."
        )
    return ACTIVATIONS[name]


# gpt-oss's expert activation: gate clamped above, up clamped both sides at `limit`, glu = gate * sigmoid(alpha
# gate), out = (up + 1) * glu. Its name carries the two constants, so every path that takes an activation by name
# (kernels, the GPU side's layout) computes the same function.
CLAMPED_SWIGLU = "clamped_swiglu"


def clamped_swiglu_name(alpha: float, limit: float) -> str:
    return f"{CLAMPED_SWIGLU}:{float(alpha)!r}:{float(limit)!r}"


@cache  # the executors look it up by name per layer call
def glu_fn(name: str):
    """The gated unit of an expert or MLP by activation name: h = glu(gate_out, up_out). Plain activations give
    act(gate_out) * up_out; `clamped_swiglu_name(alpha, limit)` gives gpt-oss's clamped form."""
    if name.startswith(CLAMPED_SWIGLU + ":"):
        _, alpha_s, limit_s = name.split(":")
        alpha, limit = float(alpha_s), float(limit_s)

        def clamped(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            gate = gate.clamp(min=None, max=limit)
            up = up.clamp(min=-limit, max=limit)
            return (up + 1) * (gate * torch.sigmoid(gate * alpha))

        return clamped
    act = act_fn(name)
    return lambda gate, up: act(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the compute dtype, as the reference does; on a GPU in one fused kernel.
        if x.is_cuda:
            from cadenza.kernels import gpu_fused  # imports Triton: only where a GPU computes

            out = gpu_fused.rms_norm(x, self.weight, self.variance_epsilon)
            if out is not None:
                return out
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(dtype)

    def add_then_norm(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + r, self(x + r)): a residual sum and this norm of it, on a GPU in one fused kernel."""
        if x.is_cuda:
            from cadenza.kernels import gpu_fused

            out = gpu_fused.add_rms_norm(x, r, self.weight, self.variance_epsilon)
            if out is not None:
                return out
        s = x + r
        return s, self(s)


class MLP(nn.Module):
    """The dense SwiGLU MLP (dense layers, shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = act_fn(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """A layer's routed experts: the router `gate` picks each token's experts, the seam `experts(x, topk_ids,
    topk_weights, shared)` runs them. The default route is softmax over every expert in fp32, top-k, renormalised
    when `norm_topk_prob` says so (Mixtral always, Qwen-MoE and OLMoE by config); families with another router
    override `route`, families with always-on experts `shared_output`."""

    top_k: int
    norm_topk_prob: bool = True
    # transformers' OLMoE and Qwen MoE routers round the top-k weights to the compute dtype (a no-op in fp32);
    # Mixtral's keep them float32
    rounds_weights: ClassVar[bool] = False

    def __init__(
        self,
        config,
        num_experts: int,
        intermediate_size: int,
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
        gate: nn.Module | None = None,
    ):
        """config: the family's ModelArgs (hidden_size, hidden_act); names: the experts' three weights as the
        checkpoint names them; gate: the router module (default a bias-free linear layer [E, H])."""
        # imported here, not at the top: cadenza.moe.experts imports this module (act_fn)
        from cadenza.moe.experts import Experts

        super().__init__()
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False) if gate is None else gate
        self.experts = Experts(num_experts, config.hidden_size, intermediate_size, config.hidden_act, names=names)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_weights [T, k] float32, topk_ids [T, k]."""
        router_logits = self.gate(x)  # [T, E]
        topk_weights, topk_ids = softmax_topk(router_logits, self.top_k, norm_topk_prob=self.norm_topk_prob)
        if self.rounds_weights:
            topk_weights = topk_weights.to(router_logits.dtype).float()
        return topk_weights, topk_ids

    def shared_output(self, x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
        """The always-on experts' output for x ([T, H]) as a callable the seam runs on the GPU while the CPU works on
        routed experts; None: the family has none."""
        return None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)  # [B*T, H]
        topk_weights, topk_ids = self.route(x)  # [B*T, k]
        return self.experts(x, topk_ids, topk_weights, shared=self.shared_output(x)).reshape(b, t, h)


class DecoderLayer(nn.Module):
    """The pre-norm decoder layer: hidden + self_attn(input_layernorm(hidden)), then
    hidden + mlp(post_attention_layernorm(hidden)). The feed-forward (dense MLP or MoE block) is registered under
    `mlp_name`, the name its checkpoint tensors carry."""

    mlp_name: ClassVar[str] = "mlp"

    def __init__(self, config, self_attn: nn.Module, mlp: nn.Module, norm_class: type[nn.Module] = RMSNorm):
        """config: the family's ModelArgs (hidden_size, rms_norm_eps); norm_class: RMSNorm or a family's own."""
        super().__init__()
        self.self_attn = self_attn
        setattr(self, self.mlp_name, mlp)
        self.input_layernorm = norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = norm_class(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        norm = self.post_attention_layernorm
        if type(norm) is not RMSNorm:  # a family's own norm: its forward, as written
            return self.ffn_residual(self.attention_residual(hidden_states, ctx))
        attn = self.self_attn(self.input_layernorm(hidden_states), ctx)
        hidden_states, normed = norm.add_then_norm(hidden_states, attn)  # the residual sum and the norm: one launch
        return hidden_states + getattr(self, self.mlp_name)(normed)

    def attention_residual(self, hidden_states: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return hidden_states + self.self_attn(self.input_layernorm(hidden_states), ctx)

    def ffn_residual(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The feed-forward half: per token, so tokens of several passes may go through it as one (`forward_mixed`)."""
        return hidden_states + getattr(self, self.mlp_name)(self.post_attention_layernorm(hidden_states))


# --- the decoder stack ------------------------------------------------------------------------------------------


@dataclass
class StaticStep:
    """A decode step in capture: its rows and positions as device tensors, its cache views' end, and, where the
    layers are split over several GPUs, how tensors cross between blocks (`crossing(device)`: a context manager
    giving move(tensor) -> its copy on the device; cadenza.graphs.Recorder.crossing)."""

    index: RowIndex
    end: int
    crossing: Callable | None = None


class DecoderModel(nn.Module):
    """embed -> layers -> norm. A family's *Model subclasses this, naming its decoder layer (called as
    layer(hidden_states, ctx)) and, where they differ from the usual, its norm and rotary embedding."""

    sliding_window: int | None = None
    # per layer, where layers differ (gpt-oss's windows, Llama-4's chunks); else sliding_window. Each distinct value
    # gets its context from `layer_context`
    layer_windows: list[int | None] | None = None
    # per layer, the device that holds it where the layers are split over several GPUs (cadenza.layer_split); the
    # embeddings, the final norm and the LM head stay on the first, where tokens enter and logits leave
    layer_devices: list[torch.device] | None = None
    layer_blocks: list[int] | None = None  # per layer, its block of the split (a block: one device's run of layers)

    def __init__(
        self,
        config,
        layer_class: Callable[..., nn.Module],
        norm_class: type[nn.Module] = RMSNorm,
        rotary_class: type[RotaryEmbedding] = RotaryEmbedding,
        rotary_dim: int | None = None,
    ):
        """config: the family's ModelArgs; layer_class(config, layer_idx) builds a layer; rotary_dim: the features
        of each head that turn (default head_dim)."""
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm_class(config.hidden_size, eps=config.rms_norm_eps)
        dim = config.head_dim if rotary_dim is None else rotary_dim
        self.rotary_emb = rotary_class(config.rope, dim, config.max_position_embeddings)

    def forward(
        self, input_ids: torch.Tensor, cache: Cache, rows: list[int] | None = None, static: StaticStep | None = None
    ) -> torch.Tensor:
        """input_ids: [B, T] -> hidden states [B, T, H]; row b appends T positions to cache slot rows[b]
        (default: slot b). static: a one-token step being captured as a CUDA graph (rows and positions in its
        device tensors; the caller advances the cache's lengths)."""
        b, t = input_ids.shape
        h = self.embed_tokens(input_ids)
        if static is not None:
            window = self.sliding_window
            ctx = AttentionContext.static(cache, static.index, static.end, self.rotary_emb, h.dtype, window)
        else:
            rows = list(range(b)) if rows is None else list(rows)
            ctx = AttentionContext.build(cache, rows, t, self.rotary_emb, h.dtype, self.sliding_window)
        if self.layer_devices is not None:
            crossing = None if static is None else static.crossing
            (h,) = self._run_split([h], [ctx], lambda layer, hs, cs: [layer(hs[0], cs[0])], crossing)
        elif self.layer_windows is None:
            for layer in self.layers:
                h = layer(h, ctx)
        else:  # one context per distinct window: masks are built once per pass
            contexts = {self.sliding_window: ctx}
            for layer, window in zip(self.layers, self.layer_windows, strict=True):
                if window not in contexts:
                    contexts[window] = self.layer_context(ctx, window)
                h = layer(h, contexts[window])
        if static is None:
            cache.advance(rows, t)
        return self.norm(h)

    def forward_mixed(self, parts: list[tuple[torch.Tensor, list[int]]], cache: Cache) -> list[torch.Tensor]:
        """Several passes as one: parts[i] = (input_ids [B_i, T_i], cache rows) on disjoint rows -> hidden states
        [B_i, T_i, H] each, equal to `forward` on each part. Each part's attention runs on its own (its own
        positions and mask); the feed-forward halves take every part's tokens together, so a layer's experts are
        fetched once for all of them (a decode step and a prompt's prefill: cadenza.engine's mixed step)."""
        hs = [self.embed_tokens(ids) for ids, _ in parts]
        ctxs = [
            AttentionContext.build(cache, rows, ids.shape[1], self.rotary_emb, h.dtype, self.sliding_window)
            for (ids, rows), h in zip(parts, hs, strict=True)
        ]

        def mixed_layer(layer, hs, own):
            hs = [layer.attention_residual(h, c) for h, c in zip(hs, own, strict=True)]
            flat = layer.ffn_residual(torch.cat([h.reshape(-1, h.shape[-1]) for h in hs])[None])[0]
            return [
                part.view(h.shape)
                for part, h in zip(flat.split([h.shape[0] * h.shape[1] for h in hs]), hs, strict=True)
            ]

        if self.layer_devices is not None:
            hs = self._run_split(hs, ctxs, mixed_layer)
        else:
            windows = self.layer_windows or [self.sliding_window] * len(self.layers)
            contexts = [{self.sliding_window: c} for c in ctxs]
            for layer, window in zip(self.layers, windows, strict=True):
                for own, c in zip(contexts, ctxs, strict=True):
                    if window not in own:
                        own[window] = self.layer_context(c, window)
                hs = mixed_layer(layer, hs, [own[window] for own in contexts])
        for ids, rows in parts:
            cache.advance(rows, ids.shape[1])
        return [self.norm(h) for h in hs]

    def _run_split(
        self, hs: list[torch.Tensor], ctxs: list[AttentionContext], run_layer, crossing: Callable | None = None
    ) -> list[torch.Tensor]:
        """The layers block by block (`layer_blocks`: each a run of consecutive layers on one device), each block
        with its device current (Triton launches on the current device); the hidden states [B, T, H] and the
        contexts the block's layers read cross at each boundary (a few small copies at decode) and the hidden
        states come back to the pass's device. run_layer(layer, hs, contexts) -> hs. crossing: StaticStep's (a
        captured step: each crossing cuts the step's graphs), default plain copies."""
        home = hs[0].device
        windows = self.layer_windows or [self.sliding_window] * len(self.layers)
        blocks = self.layer_blocks or self.layer_devices
        # per pass, each window's context, made on the pass's device before the first block (in a captured step:
        # inside its first graph, as the masks depend on the step's positions)
        base = [{w: c if w == self.sliding_window else self.layer_context(c, w) for w in set(windows)} for c in ctxs]
        i = 0
        while i < len(self.layers):
            device, stop = self.layer_devices[i], i + 1
            while stop < len(self.layers) and blocks[stop] == blocks[i]:
                stop += 1
            wanted = {windows[j] for j in range(i, stop)}
            with _crossing(crossing if i else None, device) as move:  # (the first block is on the pass's device)
                hs = [move(h) for h in hs]
                own = [{w: made[w].to(device, move) for w in wanted} for made in base]
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                for j in range(i, stop):
                    hs = run_layer(self.layers[j], hs, [o[windows[j]] for o in own])
            i = stop
        with _crossing(crossing, home) as move:
            return [move(h) for h in hs]

    def layer_context(self, ctx: AttentionContext, window: int | None) -> AttentionContext:
        """The context of the layers whose `layer_windows` entry is `window` (ctx: the pass's, for
        sliding_window): by default the causal mask narrowed to the last `window` positions."""
        return ctx.for_window(window)


def _crossing(crossing: Callable | None, device: torch.device):
    """A block boundary: crossing(device) in a captured step, else plain copies to `device`."""
    return crossing(device) if crossing is not None else contextlib.nullcontext(lambda t: t.to(device))


def last_positions(h: torch.Tensor, last_only: bool, last: torch.Tensor | None) -> torch.Tensor:
    """h [B, T, H] -> the positions whose logits are asked for: all, the last, or row b's position last[b] (rows
    of a padded pass, cadenza.engine's grouped prefill) -> [B, 1, H]."""
    if last is not None:
        return h[torch.arange(h.shape[0], device=h.device), last][:, None]
    return h[:, -1:] if last_only else h


class CausalLM(nn.Module):
    """A decoder model and its LM head. `forward` returns float32 logits."""

    # Whether prompts of different lengths may be prefilled together, right-padded to the longest: true where a
    # position's result depends on the positions before it only (causal attention, per-token experts).
    pads_prompts = True

    def __init__(self, config, model: DecoderModel, lm_head_bias: bool = False):
        """config: the family's ModelArgs; model: its DecoderModel, built from config."""
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=lm_head_bias)

    def new_cache(self, max_length: int, dtype: torch.dtype, device: torch.device, batch: int = 1) -> KVCache:
        """A KV cache for this model's attention (families with another cache layout override this)."""
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_length, dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache,
        last_only: bool = False,
        rows: list[int] | None = None,
        static: StaticStep | None = None,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only, or at row b's position last[b]
        with `last`); rows: the cache slots (default 0..B-1); static: see DecoderModel.forward."""
        h = self.model(input_ids, cache, rows) if static is None else self.model(input_ids, cache, static=static)
        return self.lm_head(last_positions(h, last_only, last)).float()

    @property
    def mixes_passes(self) -> bool:
        """Whether `forward_mixed` computes what `forward` does for each part (families that override `forward`,
        e.g. Phi-MoE's LongRoPE switch, do not take mixed passes)."""
        return type(self).forward is CausalLM.forward and isinstance(self.model, DecoderModel)

    def forward_mixed(
        self, parts: list[tuple[torch.Tensor, list[int], torch.Tensor | None]], cache: Cache
    ) -> list[torch.Tensor]:
        """parts[i] = (input_ids [B_i, T_i], rows, last: row b's position whose logits are wanted, None: the last
        position) -> logits [B_i, V] float32 each (DecoderModel.forward_mixed)."""
        hs = self.model.forward_mixed([(ids, rows) for ids, rows, _ in parts], cache)
        out = [last_positions(h, True, last)[:, 0] for h, (_, _, last) in zip(hs, parts, strict=True)]
        sizes = [o.shape[0] for o in out]
        return list(self.lm_head(torch.cat(out)).float().split(sizes))
