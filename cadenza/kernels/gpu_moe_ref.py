"""The pure-torch reference of cadenza.kernels.gpu_moe, and its fallback where the Triton kernels do not run:
per (token, slot) pair the expert in fp32, the tiled formats dequantized as `layout.dequantize_tiles` does (a
"gate_up+down" layer's matrices each in its format)."""

import torch

from cadenza.kernels.layout import PAD, _round_up, dequantize_tiles, matrix_formats
from cadenza.models.common import glu_fn


def _expert_fp32(mats, e, fmt, group, hidden, intermediate):
    """One expert row's fp32 gate, up [I, H] and down [H, I] (e: a 0-dim index tensor, no host sync)."""
    if fmt is None:
        return tuple(m.index_select(0, e.view(1))[0].float() for m in mats)
    return _dequant_torch(
        mats[0].index_select(0, e.view(1))[0], mats[1].index_select(0, e.view(1))[0], fmt, group, hidden, intermediate
    )


def _decode_torch(x, rows, topk_weights, mats, act, fmt, group, hidden, intermediate, biases=(None, None, None)):
    """The reference: per pair, the expert in fp32 (dequantized as layout.dequantize_tiles), its biases (gate [R, I],
    up [R, I], down [R, H], each or all None) added in fp32, masked by row >= 0."""
    t, k = rows.shape
    glu = glu_fn(act)
    flat = rows.reshape(-1).long()
    live = flat >= 0
    wts = torch.where(live, topk_weights.reshape(-1).float(), 0.0)
    y_pair = []
    for p in range(t * k):
        e = flat[p].clamp(min=0)
        gate, up, down = _expert_fp32(mats, e, fmt, group, hidden, intermediate)
        gb, ub, db = (0.0 if b is None else b.index_select(0, e.view(1))[0].float() for b in biases)
        xp = x[p // k].float()
        yp = down @ glu(gate @ xp + gb, up @ xp + ub) + db
        y_pair.append(torch.where(live[p], yp * wts[p], 0.0))
    return torch.stack(y_pair).view(t, k, -1).sum(1).to(x.dtype)


def _dequant_torch(gate_up, down, fmt, group, hidden, intermediate):
    """One expert's fp32 gate, up [I, H] and down [H, I], each matrix read in its own format ("q4_k+q6_k")."""
    hp, ip = _round_up(hidden, PAD), _round_up(intermediate, PAD)
    (gf, gg), (df, dg) = matrix_formats(fmt, group)
    gu = dequantize_tiles(gate_up, gf, gg, hp).view(ip // 2, 2, 2, hp)
    gate = gu[:, 0].reshape(ip, hp)[:intermediate, :hidden]
    up = gu[:, 1].reshape(ip, hp)[:intermediate, :hidden]
    return gate, up, dequantize_tiles(down, df, dg, ip)[:hidden, :intermediate]
