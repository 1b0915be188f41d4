"""Grouped-query attention with an explicit mask (batched decode of rows at different lengths, chunked prefill): the
folded form CUDA uses (each KV head's query heads as extra query rows) equals expanding the KV heads."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cadenza.models.attention import AttentionContext, _attend, attend_folded


def expanded(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def case(b, n, kv, t, s, d, mask_dims, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, n, d, generator=gen).transpose(1, 2)  # non-contiguous, as the model's views are
    k, v = torch.randn(b, kv, s, d, generator=gen), torch.randn(b, kv, s, d, generator=gen)
    lengths = torch.randint(t, s + 1, (b,), generator=gen)  # each row's cache length; its queries the last t
    pos = torch.arange(s)
    qpos = lengths[:, None] - t + torch.arange(t)[None, :]  # [B, T]
    mask = pos[None, None, :] <= qpos[:, :, None]  # [B, T, S]
    mask = mask[:, None] if mask_dims == 4 else mask[0]
    return [x.to(device, dtype) for x in (q, k, v)] + [mask.to(device)]


@pytest.mark.parametrize(("n", "kv", "t", "mask_dims"), [(8, 2, 1, 4), (8, 2, 3, 4), (6, 3, 5, 2), (4, 1, 1, 2)])
def test_folded_equals_expanded(n, kv, t, mask_dims):
    q, k, v, mask = case(3, n, kv, t, 17, 16, mask_dims)
    got = attend_folded(q, k, v, mask, 0.25)
    assert got.shape == (3, n, t, 16)
    torch.testing.assert_close(got, expanded(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "kv", "t", "mask_dims"), [(8, 2, 1, 4), (6, 3, 5, 2), (4, 4, 2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_pass_mask_made_once_equals_the_bool_mask_each_call(n, kv, t, mask_dims, dtype):
    """AttentionContext.sdpa_mask (what a GPU's layers share in a pass): tiled for the query heads and additive,
    the same attention as SDPA on the bool mask, made once a context and anew for a replaced one."""
    q, k, v, mask = case(3, n, kv, t, 17, 16, mask_dims, dtype=dtype)
    ctx = AttentionContext(SimpleNamespace(device=torch.device("cpu")), [0, 1, 2], [0, 0, 0], None, None, mask, t=t)
    g = n // kv
    made = ctx.sdpa_mask(g, dtype)
    assert made is ctx.sdpa_mask(g, dtype) and made.dtype == dtype
    if g > 1:
        got, want = attend_folded(q, k, v, made, 0.25, folded=True), attend_folded(q, k, v, mask, 0.25)
    else:
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=made, scale=0.25)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
    assert torch.equal(got, want)
    assert replace(ctx, mask=~mask)._gpu_masks == {}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("t", "mask_dims"), [(1, 4), (4, 4), (7, 2)])
def test_cuda_attend_with_mask_equals_cpu(t, mask_dims, dtype):
    q, k, v, mask = case(4, 8, 2, t, 64, 64, mask_dims, dtype=dtype)
    want = expanded(*(x.float() for x in (q, k, v)), mask, 0.125)
    got = _attend(*(x.cuda() for x in (q, k, v)), mask.cuda(), False, 0.125).float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
