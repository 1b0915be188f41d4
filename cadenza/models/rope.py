"""Rotary position embeddings and their scaling variants (default, linear, dynamic NTK, Llama 3, YaRN, LongRoPE),
read from a config the way transformers defines them.

Shape legend: B batch, T new tokens, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cadenza.errors import CadenzaError


@dataclass
class RopeParameters:
    """`rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (the hub's config.json), unified."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    extra: dict | None = None  # factor, original_max_position_embeddings, beta_fast, short_factor, ...

    @classmethod
    def from_config(cls, cfg: dict, default_theta: float = 10000.0) -> RopeParameters:
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        # Some configs nest per layer type ({"full_attention": {...}}); the families here use one dict.
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        if rope_type == "su":  # Phi-3's old name for longrope
            rope_type = "longrope"
        theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or default_theta
        partial = params.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor") or 1.0
        if rope_type in ("llama3", "yarn", "longrope"):
            if cfg.get("original_max_position_embeddings") is not None:
                params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
            params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        known = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
        if rope_type not in known:
            raise CadenzaError(
                f"config.json asks for rope scaling of type {rope_type!r}, which cadenza does not implement "
                f"(it knows {', '.join(known)}). Remove or correct rope_scaling in config.json."
            )
        return cls(rope_type, float(theta), float(partial), params)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; the scaling variants follow the definitions transformers uses."""

    def __init__(self, rope: RopeParameters, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.rope = rope
        self.dim = int(head_dim * rope.partial_rotary_factor)
        self.max_position_embeddings = max_position_embeddings
        self.extra = rope.extra or {}
        # dynamic NTK recomputes its frequencies as the sequence grows past what it has cached
        self.max_seq_len_cached = max_position_embeddings
        with torch.device("cpu"):  # tables are small; the model around them may be built on the meta device
            inv_freq, self.attention_scaling = self._compute(None)
        self.original_inv_freq = inv_freq
        self.inv_freq = inv_freq
        self.long_inv_freq: torch.Tensor | None = None
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None  # (inv_freq, its copy on the device)

    @property
    def grows(self) -> bool:
        """Whether the frequencies depend on how long the sequence is (dynamic NTK, LongRoPE): then each pass reads
        the longest position back to the host, and a decode step cannot be a CUDA graph."""
        return self.rope.rope_type in ("dynamic", "longrope")

    def _base_inv_freq(self, base: float) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float() / self.dim
        return 1.0 / (base**exponents)

    def _compute(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        kind, base, x = self.rope.rope_type, self.rope.rope_theta, self.extra
        if kind == "default":
            return self._base_inv_freq(base), 1.0
        if kind == "linear":
            return self._base_inv_freq(base) / x["factor"], 1.0
        if kind == "dynamic":
            factor, m = x["factor"], self.max_position_embeddings
            seq_len = max(seq_len or m, m)
            base = base * ((factor * seq_len / m) - (factor - 1)) ** (self.dim / (self.dim - 2))
            return self._base_inv_freq(base), 1.0
        if kind == "llama3":
            inv = self._base_inv_freq(base)
            factor, lo, hi = x["factor"], x["low_freq_factor"], x["high_freq_factor"]
            old = x["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / hi) & (wavelen <= old / lo)
            return torch.where(medium, smoothed, scaled), 1.0
        if kind == "yarn":
            return self._yarn()
        if kind == "longrope":
            orig = x["original_max_position_embeddings"]
            factor = x.get("factor") or self.max_position_embeddings / orig
            scaling = x.get("attention_factor")
            if scaling is None:
                scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
            ext = x["long_factor"] if seq_len and seq_len > orig else x["short_factor"]
            ext = torch.tensor(ext, dtype=torch.float32, device="cpu")
            exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float() / self.dim
            return 1.0 / (ext * base**exponents), float(scaling)
        raise AssertionError(kind)

    def _yarn(self) -> tuple[torch.Tensor, float]:
        x, base, dim = self.extra, self.rope.rope_theta, self.dim
        orig = x["original_max_position_embeddings"]
        factor = x.get("factor") or self.max_position_embeddings / orig

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        scaling = x.get("attention_factor")
        if scaling is None:
            if x.get("mscale") and x.get("mscale_all_dim"):
                scaling = mscale(factor, x["mscale"]) / mscale(factor, x["mscale_all_dim"])
            else:
                scaling = mscale(factor)
        beta_fast, beta_slow = x.get("beta_fast") or 32, x.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if x.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        keep = 1 - ramp  # share of the unscaled (extrapolated) frequency per dimension
        return interpolation * (1 - keep) + extrapolation * keep, float(scaling)

    def _update(self, seq_len: int) -> None:
        kind = self.rope.rope_type
        if kind == "dynamic":
            if seq_len > self.max_seq_len_cached:
                self.inv_freq, self.attention_scaling = self._compute(seq_len)
                self.max_seq_len_cached = seq_len
            if seq_len < self.max_position_embeddings < self.max_seq_len_cached:
                self.inv_freq = self.original_inv_freq
                self.max_seq_len_cached = self.max_position_embeddings
        elif kind == "longrope":
            orig = self.extra["original_max_position_embeddings"]
            if seq_len > orig:
                if self.long_inv_freq is None:
                    self.long_inv_freq, _ = self._compute(orig + 1)
                self.inv_freq = self.long_inv_freq
            else:
                self.inv_freq = self.original_inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [...] -> cos, sin: [..., dim] in `dtype`. Reads nothing back from the device unless the
        frequencies depend on the sequence's length (`grows`)."""
        if self.grows:
            self._update(int(positions.max()) + 1)
        cached = self._on_device
        if cached is None or cached[0] is not self.inv_freq or cached[1].device != positions.device:
            cached = self._on_device = (self.inv_freq, self.inv_freq.to(positions.device))
        inv = cached[1]
        freqs = positions[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos, sin: [T, d] or [B, 1, T, d] with d <= D (partial rotary leaves the rest as is)."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def apply_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norms: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary of an attention's queries and keys, after norms = (q_norm, k_norm) over each head's features
    where given (Qwen3's, GLM-4.5's); on a GPU in one fused launch (PyTorch spells it as ten small kernels, and the
    norms two more: each a launch gap in a decode step's graph)."""
    if q.is_cuda:
        from cadenza.kernels import gpu_fused  # imports Triton: only where a GPU computes
        from cadenza.models.common import RMSNorm

        if norms is None:
            out = gpu_fused.rotary_qk(q, k, cos, sin)
        elif all(type(m) is RMSNorm for m in norms) and norms[0].variance_epsilon == norms[1].variance_epsilon:
            out = gpu_fused.rotary_qk(q, k, cos, sin, (norms[0].weight, norms[1].weight, norms[0].variance_epsilon))
        else:  # a family's own norm: its forward, below
            out = None
        if out is not None:
            return out
    if norms is not None:
        q, k = norms[0](q), norms[1](k)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1), (x2, x3), ... -> (-x1, x0), (-x3, x2), ...: rotate_half for features laid out as interleaved pairs."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary for heads whose rotary features come as interleaved pairs (x0, x1), (x2, x3)... (ERNIE-4.5): pair
    i turns by frequency i. cos, sin are the usual tables ([T, d] or [B, 1, T, d], the d / 2 frequencies twice); each
    frequency is repeated for its pair here, as transformers' ERNIE does. The arithmetic runs in the tables' dtype (a
    family that keeps them float32 rotates in float32, as its reference) and the result has x's dtype. The features
    past d pass through. Keys land in the cache in the checkpoint's layout, not regrouped."""
    d = cos.shape[-1]
    cos = cos[..., : d // 2].repeat_interleave(2, dim=-1)
    sin = sin[..., : d // 2].repeat_interleave(2, dim=-1)
    rot = x[..., :d]
    out = (rot.to(cos.dtype) * cos + rotate_pairs(rot).to(cos.dtype) * sin).to(x.dtype)
    return out if d == x.shape[-1] else torch.cat((out, x[..., d:]), dim=-1)
