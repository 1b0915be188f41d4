"""Attention with a KV cache, as every family but DeepSeek's MLA (cadenza.models.mla) runs it: the per-pass context
the layers share (`AttentionContext`: rows, positions, rotations, masks; a captured decode step's in device tensors),
grouped-query attention on a GPU (PyTorch's SDPA, its explicit-mask case folded) or, where the cache is in host
memory, on the CPU (cadenza's kernel), and the `Attention` module itself.

Shape legend: B batch, T new tokens, S tokens in the cache (past + new), N query heads, K key/value heads, D head
dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from cadenza.kernels import cpu_attention
from cadenza.kv_cache import Cache
from cadenza.models.rope import RotaryEmbedding, apply_rotary_qk


class RowIndex:
    """A pass's row and start indices as device tensors, made only if a cache write needs them (rows out of
    order, or rows of different lengths): a single sequence's decode step makes none, so it copies nothing to
    the GPU. Shared by the per-layer contexts `for_window` derives."""

    def __init__(self, rows: list[int], starts: list[int], device: torch.device):
        self.rows, self.starts, self.device = rows, starts, device

    @classmethod
    def static(cls, batch: int, device: torch.device) -> RowIndex:
        """Index tensors for a captured decode step: their contents (rows, positions) are written before each
        replay; the lists are placeholders."""
        index = cls(list(range(batch)), [0] * batch, device)
        index.rows_t = torch.zeros(batch, dtype=torch.int64, device=device)
        index.starts_t = torch.zeros(batch, dtype=torch.int64, device=device)
        index.local_t = torch.arange(batch, device=device)
        return index

    @cached_property
    def rows_t(self) -> torch.Tensor:
        return torch.tensor(self.rows, device=self.device)

    @cached_property
    def local_t(self) -> torch.Tensor:
        return torch.arange(len(self.rows), device=self.device)

    @cached_property
    def starts_t(self) -> torch.Tensor:
        return torch.tensor(self.starts, device=self.device)


@dataclass
class AttentionContext:
    """What every layer's attention needs for one forward pass, computed once per pass.

    The pass's B batch rows live in cache slots `rows`; row b's new tokens start at position `starts[b]`. When
    every row starts at the same position (one sequence, a prefill, beams) `start` is that position and the cache
    writes slices; otherwise (sequences of different lengths decoding together, one token each) `start` is None.
    """

    cache: Cache
    rows: list[int]
    starts: list[int]
    cos: torch.Tensor  # [T, d] (one start) or [B, 1, T, d] (per-row starts)
    sin: torch.Tensor
    mask: torch.Tensor | None  # [T, S] or [B, 1, T, S] bool, True where a query may attend; None: see is_causal
    is_causal: bool = False  # no mask and a plain causal pattern (first chunk, no window): fused kernels apply
    t: int = 1  # new tokens per row
    index: RowIndex | None = None
    static_end: int | None = None  # a captured decode step: cache views end here; rows and positions are in index
    _gpu_masks: dict = field(init=False, repr=False, compare=False)  # sdpa_mask's, per (groups, dtype)

    def __post_init__(self) -> None:
        self._gpu_masks = {}
        if self.index is None:
            self.index = RowIndex(self.rows, self.starts, self.cache.device)
        if self.static_end is not None:  # every value that changes between steps is in the index's tensors
            self.start, self.end, self.row_slice = None, self.static_end, None
            return
        self.start = self.starts[0] if len(set(self.starts)) == 1 else None
        self.end = max(self.starts) + self.t
        r0 = self.rows[0]
        self.row_slice = slice(r0, r0 + len(self.rows)) if self.rows == list(range(r0, r0 + len(self.rows))) else None

    @classmethod
    def build(
        cls, cache: Cache, rows: list[int], t: int, rotary: RotaryEmbedding, dtype: torch.dtype, window: int | None
    ) -> AttentionContext:
        starts = [cache.lengths[r] for r in rows]
        device = cache.compute_device  # the rotations apply to activations (a host cache: still on the GPU)
        if len(set(starts)) == 1:
            positions = torch.arange(starts[0], starts[0] + t, device=device)
        else:
            if t != 1:
                raise AssertionError("rows of different lengths advance one token at a time")
            positions = torch.tensor(starts, device=device)[:, None, None]  # [B, 1, T=1]
        cos, sin = rotary(positions, dtype)
        ctx = cls(cache, list(rows), starts, cos, sin, None, t=t)
        return ctx.for_window(window)

    @classmethod
    def static(
        cls, cache: Cache, index: RowIndex, end: int, rotary: RotaryEmbedding, dtype: torch.dtype, window: int | None
    ) -> AttentionContext:
        """A one-token decode step whose rows and positions are device tensors (`RowIndex.static`) and whose cache
        views end at `end` (past every row's length; the mask hides the rest): fixed shapes and no read-back, so
        the step can be captured in a CUDA graph and replayed at later positions."""
        cos, sin = rotary(index.starts_t[:, None, None], dtype)  # [B, 1, T=1, d]
        ctx = cls(cache, index.rows, index.starts, cos, sin, None, t=1, index=index, static_end=end)
        return ctx.for_window(window)

    def sdpa_mask(self, groups: int, dtype: torch.dtype) -> torch.Tensor:
        """`mask` as a GPU's attention takes it, made once a pass for every layer: rows tiled for `groups` query
        heads a KV head (attend_folded's), as the additive mask (0, -inf) in `dtype` that SDPA would make of the bool
        one in every call (the same values; in a decode step's graph ~3 small kernels a layer fewer)."""
        key = (groups, dtype)
        if key not in self._gpu_masks:
            mask = self.mask
            if groups > 1:
                mask = mask.repeat(groups, 1) if mask.dim() == 2 else mask.repeat(1, 1, groups, 1)
            additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            self._gpu_masks[key] = additive.masked_fill_(mask.logical_not(), float("-inf"))
        return self._gpu_masks[key]

    def for_window(self, window: int | None) -> AttentionContext:
        """This pass's context with the causal mask narrowed to the last `window` positions (None: no window)."""
        if self.start is not None:
            mask = attention_mask(self.start, self.t, self.cache.device, window)
        else:
            q = self.index.starts_t[:, None, None, None]  # [B, 1, T=1, 1]
            k = torch.arange(self.end, device=self.cache.device)
            mask = k <= q
            if window is not None:
                mask &= k > q - window
        return replace(self, mask=mask, is_causal=mask is None and self.t > 1)

    def to(self, device: torch.device, move: Callable[[torch.Tensor], torch.Tensor] | None = None) -> AttentionContext:
        """This pass's context for layers on another device (layers split over several GPUs): its rotations, mask
        and row index copied there, a few small tensors a pass. move(tensor) -> its copy on `device` (default
        `.to(device)`; a captured step's crossing copies between graphs, cadenza.graphs.Recorder.crossing)."""
        if self.cos.device == device:
            return self
        move = move or (lambda t: t.to(device))
        index = RowIndex(self.rows, self.starts, device)
        for name in ("rows_t", "local_t", "starts_t"):  # made already (or a captured step's): moved, not rebuilt
            made = self.index.__dict__.get(name)
            if made is not None:
                setattr(index, name, move(made))
        mask = None if self.mask is None else move(self.mask)
        return replace(self, cos=move(self.cos), sin=move(self.sin), mask=mask, index=index)


def attention_mask(start: int, t: int, device: torch.device, sliding_window: int | None) -> torch.Tensor | None:
    """Causal mask, narrowed to the last `sliding_window` positions when the model has one; None when every
    cached key is visible (one new token) or when the pattern is plain causal from position 0 (`is_causal`)."""
    s = start + t
    if (sliding_window is None or s <= sliding_window) and (t == 1 or start == 0):
        return None
    q = torch.arange(start, s, device=device)[:, None]
    k = torch.arange(0, s, device=device)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """q [B, N, T, D], k and v [B, K, S, D] -> [B, N, T, Dv]. Where the cache is in host memory (a host cache
    while q is on a GPU, or a CPU run's decode steps) `host_attention` places the work."""
    if not reads_host_cache(q, ctx):
        if q.is_cuda and ctx.mask is not None:  # the pass's mask made once for every layer (sdpa_mask)
            mask = ctx.sdpa_mask(q.shape[1] // k.shape[1], q.dtype)
            return _attend(q, k, v, mask, False, scale, folded=True)
        return _attend(q, k, v, ctx.mask, ctx.is_causal, scale)
    return host_attention(lambda *a: _attend(*a, ctx.is_causal, scale), q, k, v, ctx.mask, scale)


CPU_ATTENTION_SPAN = "cadenza.attention.cpu"


def reads_host_cache(q: torch.Tensor, ctx: AttentionContext) -> bool:
    """A host cache, or a CPU run's decode step (one query a row: cadenza's CPU kernel reads a bf16 cache at memory
    speed, ~12x torch's CPU attention on a 4k-token Mixtral layer)."""
    return ctx.cache.hosted or (q.device.type == "cpu" and q.shape[2] == 1)


def host_attention(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, sinks=None):
    """Attention where k, v (a host cache's views) are in host memory and q on a GPU; fn(q, k, v, mask) computes it
    on any one device. One query a row (decode) reads the whole cache for little arithmetic, so it runs on the CPU,
    where the cache is (cadenza's kernel, else fn there), and only q and the output cross the link; a prefill chunk's
    many queries do [T, S] work on a cache that is small next to it, which moves to the GPU. (mask: on the cache's
    device, as the pass built it.)"""
    if q.shape[2] == 1:
        with record_function(CPU_ATTENTION_SPAN):  # (a timeline's mark: cadenza.bench.timeline)
            out = cpu_attention.decode(q, k, v, mask, scale, sinks)
            if out is None:
                out = fn(q.to(k.device), k, v, mask)
        return out.to(q.device, q.dtype, non_blocking=out.is_pinned())
    dev = q.device
    return fn(q, k.to(dev), v.to(dev), None if mask is None else mask.to(dev))


def _attend(q, k, v, mask: torch.Tensor | None, is_causal: bool, scale: float, folded: bool = False) -> torch.Tensor:
    """folded: the mask is tiled for the query heads already (AttentionContext.sdpa_mask)."""
    groups = q.shape[1] // k.shape[1]
    if mask is not None and groups > 1 and q.is_cuda:
        # CUDA's fused kernels take an explicit mask only without GQA
        return attend_folded(q, k, v, mask, scale, folded)
    causal = is_causal and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=groups > 1)


def attend_folded(q, k, v, mask: torch.Tensor, scale: float, folded: bool = False) -> torch.Tensor:
    """Grouped-query attention with an explicit mask as plain attention: each KV head's G query heads become G x T
    query rows of that head (the mask's rows tiled G times), so nothing of the cache is copied. Expanding the KV
    heads instead (repeat_interleave) copied each layer's whole cache view twice a decode step: at T1's 512 rows
    x 256 positions, 2 x 1.23 ms a layer, 79 ms of a 500 ms step on the H200."""
    b, n, t, d = q.shape
    kv = k.shape[1]
    g = n // kv
    qf = q.reshape(b, kv, g * t, d)  # head n = kv head n // g (repeat_interleave's order), row g * t + t'
    mf = mask  # tiled already where folded (AttentionContext.sdpa_mask)
    if not folded:
        mf = mask.repeat(g, 1) if mask.dim() == 2 else mask.repeat(1, 1, g, 1)  # [T, S] or [B, 1, T, S]
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf, scale=scale)
    return out.reshape(b, kv, g, t, -1).reshape(b, n, t, -1)


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings and a KV cache (names as in transformers' *Attention)."""

    def __init__(self, config, layer_idx: int, qkv_bias: bool = False, o_bias: bool = False):
        """config: the family's ModelArgs (hidden_size, num_attention_heads, num_key_value_heads, head_dim)."""
        super().__init__()
        hidden_size, head_dim = config.hidden_size, config.head_dim
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q_proj(x), k_proj(x), v_proj(x) ([B, T, out] each): one decode launch where the three stay in a GGUF
        file's blocks on a GPU (gpu_linear.BlockLinear.project_together), else one by one."""
        together = getattr(self.q_proj, "project_together", None)
        out = together((self.q_proj, self.k_proj, self.v_proj), x) if together is not None else None
        return out if out is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))

    def head_norms(self) -> tuple[nn.Module, nn.Module] | None:
        """(q_norm, k_norm) over each head's features, applied after `project` and before rotary (Qwen3's,
        GLM-4.5's), or None."""
        return None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, H] -> q [B, N, T, D], k and v [B, K, T, D] (before `head_norms`)."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q, k = apply_rotary_qk(q, k, ctx.cos, ctx.sin, self.head_norms())
        k_all, v_all = ctx.cache.update(self.layer_idx, k, v, ctx)  # [B, K, S, D]
        return self.o_proj(attend(q, k_all, v_all, ctx, self.scaling).transpose(1, 2).reshape(b, t, -1))
