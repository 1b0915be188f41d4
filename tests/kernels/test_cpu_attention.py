"""cadenza's CPU decode attention (cadenza.kernels.cpu_attention), the host cache's: one query a row over a cache's
strided views, grouped-query heads, a visible run of positions per row, gpt-oss's sinks; against fp32 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cadenza.kernels import cpu_attention
from cadenza.models.gpt_oss import _attend_with_sinks

needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="the CPU attention kernel does not build here")


def views(b, kv, s, d, dv, dtype, seed):
    """k, v as a cache holds them: rows of a larger buffer (a slot offset, spare capacity past s)."""
    g = torch.Generator().manual_seed(seed)
    kb = torch.randn(b + 2, kv, s + 5, d, generator=g).to(dtype)
    vb = torch.randn(b + 2, kv, s + 5, dv, generator=g).to(dtype)
    return kb[1 : b + 1, :, :s], vb[1 : b + 1, :, :s]


def run_mask(b, s, seed):
    """Each row sees one run of positions [lo, hi) (a window's start, a shorter row's end)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    for r in range(b):
        lo = int(torch.randint(0, max(1, s // 3), (1,), generator=g))
        hi = int(torch.randint(lo + 1, s + 1, (1,), generator=g))
        mask[r, ..., lo:hi] = True
    return mask


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "kv", "d", "dv", "s"),
    [(32, 8, 128, 128, 70), (12, 2, 40, 24, 37), (6, 6, 16, 16, 9), (16, 1, 64, 64, 50), (24, 2, 8, 8, 33),
     (4, 2, 20, 20, 1)],
)  # fmt: skip
def test_decode_equals_fp32_attention(dtype, n, kv, d, dv, s):
    b = 5
    k, v = views(b, kv, s, d, dv, dtype, seed=n + s)
    q = torch.randn(b, n, 1, d, generator=torch.Generator().manual_seed(3))
    scale = d**-0.5
    for mask in (None, run_mask(b, s, seed=s)):
        out = cpu_attention.decode(q, k, v, mask, scale)
        want = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=True)
        assert out.dtype == torch.float32 and out.shape == (b, n, 1, dv)
        assert (out - want).abs().max().item() < 2e-6 * max(1.0, want.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_with_sinks_equals_the_sinks_reference(dtype):
    b, n, kv, s, d = 3, 16, 4, 29, 32
    k, v = views(b, kv, s, d, d, dtype, seed=1)
    q = torch.randn(b, n, 1, d, generator=torch.Generator().manual_seed(4))
    sinks = torch.randn(n, generator=torch.Generator().manual_seed(5)) * 3
    mask = run_mask(b, s, seed=2)
    out = cpu_attention.decode(q, k, v, mask, 0.2, sinks)
    want = _attend_with_sinks(q, k.float(), v.float(), mask, 0.2, sinks)
    assert (out - want).abs().max().item() < 2e-6


def test_masks_it_does_not_take_leave_it_to_torch():
    b, s = 2, 8
    holes = torch.ones(b, 1, 1, s, dtype=torch.bool)
    holes[1, ..., 3] = False  # not one run of positions
    assert cpu_attention.visible_ranges(holes, b, s) is None
    empty = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    assert cpu_attention.visible_ranges(empty, b, s) is None
    lo, hi = cpu_attention.visible_ranges(torch.tensor([[False, True, True, False]]), 3, 4)
    assert lo.tolist() == [1, 1, 1] and hi.tolist() == [3, 3, 3]
    lo, hi = cpu_attention.visible_ranges(None, 2, 6)
    assert lo.tolist() == [0, 0] and hi.tolist() == [6, 6]
    q = torch.randn(b, 4, 1, 8)
    k = v = torch.randn(b, 2, s, 8)
    assert cpu_attention.decode(q, k, v, holes, 1.0) is None
    assert cpu_attention.decode(torch.randn(b, 4, 2, 8), k, v, None, 1.0) is None  # two queries a row: not decode
    assert cpu_attention.decode(q, k.half(), v.half(), None, 1.0) is None  # fp16 cache: torch's
