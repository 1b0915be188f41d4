"""The gated delta rule (Gated DeltaNet, arXiv 2412.06464): Qwen3-Next's linear-attention layers, as plain torch.

Written here rather than taken from flash-linear-attention: that package is CUDA/Triton-only and not a dependency;
these are the same equations in float32, the chunked form for prompts and the one-step form for decoding.

Per value head, with the state S [dk, dv] (keys in, values out), for each token:
    S <- exp(g) * S                       g <= 0: the decay, in log space
    u  = beta * (v - S^T k)               beta in (0, 1): how much of the error the state learns
    S <- S + k u^T                        the delta rule's update
    o  = S^T q
q and k are L2-normalised first and q scaled by dk^-0.5. Over a chunk of C tokens starting from S0, with
G_i = sum of g up to i, the updates u solve a unit lower-triangular system
    u_i + beta_i * sum_{j<i} exp(G_i - G_j) (k_i . k_j) u_j = beta_i * (v_i - exp(G_i) S0^T k_i),
after which o_i = exp(G_i) S0^T q_i + sum_{j<=i} exp(G_i - G_j) (q_i . k_j) u_j and
S_C = exp(G_C) S0 + sum_j exp(G_C - G_j) k_j u_j^T. Chunks run one after another; a chunk's work is matrix products.

Shape legend: B batch, T tokens, Hk key heads, Hv value heads (a multiple of Hk), dk / dv key / value head dims,
C chunk length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64  # tokens a chunk solves at once


def l2_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the reference's form: eps inside the root)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _heads_first(q, k, v, g, beta):
    """[B, T, H*, d] inputs -> float32 [B, Hv, T, d] (q and k repeated to the value heads, normalised, q scaled),
    g and beta [B, Hv, T]."""
    groups = v.shape[2] // k.shape[2]
    if groups > 1:  # each key head serves `groups` consecutive value heads
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))
    q, k = l2_normalise(q), l2_normalise(k)
    q = q * q.shape[-1] ** -0.5
    return q, k, v, g.transpose(1, 2).float(), beta.transpose(1, 2).float()


def delta_rule_step(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: q, k [B, 1, Hk, dk], v [B, 1, Hv, dv], g and beta [B, 1, Hv], state [B, Hv, dk, dv]
    float32 -> (o [B, 1, Hv, dv] in v's dtype, the new state)."""
    dtype = v.dtype
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    q, k, v, g, beta = q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0]  # [B, Hv, d], [B, Hv]
    s = state * g.exp()[..., None, None]
    u = (v - torch.einsum("bhkv,bhk->bhv", s, k)) * beta[..., None]
    s = s + k[..., :, None] * u[..., None, :]
    o = torch.einsum("bhkv,bhk->bhv", s, q)
    return o[:, None].to(dtype), s


def delta_rule_chunked(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T tokens per row: q, k [B, T, Hk, dk], v [B, T, Hv, dv], g and beta [B, T, Hv], state [B, Hv, dk, dv] float32
    -> (o [B, T, Hv, dv] in v's dtype, the state after the T tokens)."""
    dtype, t = v.dtype, v.shape[1]
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    pad = -t % CHUNK  # zero tokens past the end: g = 0 and beta = 0 leave the state as it is
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    b, h, n = v.shape[0], v.shape[1], (t + pad) // CHUNK
    q, k, v = (x.reshape(b, h, n, CHUNK, x.shape[-1]) for x in (q, k, v))
    big_g = g.reshape(b, h, n, CHUNK).cumsum(-1)  # [B, Hv, n, C]
    beta = beta.reshape(b, h, n, CHUNK)
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=v.device).tril()
    # exp(G_i - G_j) for j <= i, 0 above the diagonal (masked before exp: G_i - G_j > 0 there could overflow)
    decay = (big_g[..., :, None] - big_g[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    strictly = decay.masked_fill(torch.eye(CHUNK, dtype=torch.bool, device=v.device), 0.0)
    system = torch.eye(CHUNK, device=v.device) + beta[..., None] * strictly * (k @ k.transpose(-1, -2))
    qk = decay * (q @ k.transpose(-1, -2))  # [B, Hv, n, C, C]
    growth = big_g.exp()[..., None]  # exp(G_i), [B, Hv, n, C, 1]
    # the parts of the solve that do not depend on S0: A^-1 (beta v) and A^-1 (beta exp(G) k)
    solved_v = torch.linalg.solve_triangular(system, beta[..., None] * v, upper=False, unitriangular=True)
    solved_k = torch.linalg.solve_triangular(system, beta[..., None] * growth * k, upper=False, unitriangular=True)
    tail = (big_g[..., -1:] - big_g).exp()[..., None]  # exp(G_C - G_j)
    out = torch.empty_like(v)
    s = state.float()
    for c in range(n):
        u = solved_v[:, :, c] - solved_k[:, :, c] @ s  # [B, Hv, C, dv]
        out[:, :, c] = growth[:, :, c] * (q[:, :, c] @ s) + qk[:, :, c] @ u
        s = big_g[:, :, c, -1].exp()[..., None, None] * s + (tail[:, :, c] * k[:, :, c]).transpose(-1, -2) @ u
    out = out.reshape(b, h, n * CHUNK, -1)[:, :, :t]
    return out.transpose(1, 2).to(dtype), s


def causal_conv(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The depthwise causal convolution over time, continuing from the previous tokens' inputs: x [B, C, T],
    conv_state [B, C, K-1] (the last K-1 inputs before x; zeros at a sequence's start), weight [C, K] ->
    (silu(conv) [B, C, T], the new state [B, C, K-1])."""
    width = weight.shape[-1] - 1
    full = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # [B, C, K-1+T]
    out = F.conv1d(full.to(weight.dtype), weight[:, None], groups=weight.shape[0])  # [B, C, T]
    return F.silu(out).to(x.dtype), full[:, :, full.shape[-1] - width :]
