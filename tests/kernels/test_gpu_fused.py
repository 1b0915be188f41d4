"""The fused decode kernels (cadenza.kernels.gpu_fused) against PyTorch's spelling in cadenza.models.common / rope.

On CPU-only machines the Triton kernels run through Triton's interpreter (tests/interpreted.py); with CUDA the
compiled kernels run. RMSNorm's reference is computed on the CPU from the same inputs; it sums its squares in another
order: fp32 within 2e-6 relative, bf16 / fp16 at most two steps of the output dtype apart (the normalised value is
rounded, then the product). Rotary is compared bit for bit with PyTorch's own arithmetic on the same device (on a GPU
its CUDA kernels: what the model would compute without the fused launch), in every dtype.
"""

import pytest
import torch

from cadenza.models.common import RMSNorm
from cadenza.models.rope import apply_rotary
from tests.interpreted import DEVICE, kernels_module, run_file_interpreted

gpu_fused, _SUBPROCESS = kernels_module("gpu_fused")
KERNELS = gpu_fused.available(DEVICE)
needs_kernels = pytest.mark.skipif(
    not KERNELS, reason="Triton is not importable here, or was imported before its interpreter could be switched on"
)


def _ulp(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 96), (2, 3, 200), (5, 1000)])
def test_rms_norm_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(len(shape) * 7 + shape[-1])
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    norm = RMSNorm(shape[-1], eps=1e-5)
    norm.weight.data = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    want = norm(x)  # CPU: PyTorch's spelling
    got = gpu_fused.rms_norm(x.to(DEVICE), norm.weight.to(DEVICE), 1e-5).cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 2e-6 if dtype == torch.float32 else 2 * _ulp(dtype)  # n rounded, then the product: a step each
    err = ((got.float() - want.float()).abs() / want.float().abs().clamp(min=1e-3)).max().item()
    assert err <= tol * 1.01, err


@needs_kernels
def test_rms_norm_strided_rows_and_mixed_weight_dtype():
    x = torch.randn(4, 2, 64)[:, 1]  # rows with a stride of 128
    w = torch.randn(64)  # fp32 weight on bf16 x: the result is fp32, as PyTorch promotes
    norm = RMSNorm(64)
    norm.weight.data = w
    xb = x.to(torch.bfloat16)
    got = gpu_fused.rms_norm(xb.to(DEVICE), w.to(DEVICE), norm.variance_epsilon).cpu()
    want = norm(xb)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_rms_norm_equals_the_sum_then_rms_norm(dtype):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 3, 200, generator=g) * 3).to(dtype).to(DEVICE)
    r = (torch.randn(2, 3, 200, generator=g) * 3).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(200, generator=g)).to(dtype).to(DEVICE)
    s, normed = gpu_fused.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, x + r)  # the residual sum exactly as PyTorch's
    assert torch.equal(normed, gpu_fused.rms_norm(x + r, w, 1e-5))  # and the norm as the norm kernel alone
    assert s.shape == normed.shape == x.shape
    assert gpu_fused.add_rms_norm(x, r.float() if dtype != torch.float32 else r.half(), w, 1e-5) is None


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 8, 200), (1, 5, 3000), (4, 1, 7)])
def test_sum_middle_sums_in_order_then_casts(dtype, shape):
    part = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])).to(DEVICE) * 100
    want = part[:, 0]
    for s in range(1, shape[1]):
        want = want + part[:, s]  # fp32, in slot order
    got = gpu_fused.sum_middle(part, dtype)
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))


@needs_kernels
@pytest.mark.parametrize("dtype,tables", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                          (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_rotary_qk_equals_pytorch_bit_for_bit(dtype, tables, partial, per_row):
    b, n, kh, t, d_head = 2, 6, 2, 5, 128
    d = 64 if partial else d_head
    g = torch.Generator().manual_seed(3 + 2 * partial + per_row)
    # q and k as the attention makes them: [B, T, heads, D] projections viewed as [B, heads, T, D] (not contiguous)
    q = (torch.randn(b, t, n, d_head, generator=g) * 4).to(dtype).to(DEVICE).transpose(1, 2)
    k = (torch.randn(b, t, kh, d_head, generator=g) * 4).to(dtype).to(DEVICE).transpose(1, 2)
    ang = torch.rand(b if per_row else 1, 1, t, d // 2, generator=g) * 3000  # positions up to ~3000
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos().to(tables).to(DEVICE), emb.sin().to(tables).to(DEVICE)
    if not per_row:
        cos, sin = cos[0, 0], sin[0, 0]  # [T, d]
    got_q, got_k = gpu_fused.rotary_qk(q, k, cos, sin)
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    assert got_q.dtype == want_q.dtype and got_q.shape == want_q.shape and got_k.shape == want_k.shape
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("partial", [False, True])
def test_rotary_qk_with_head_norms_equals_norm_then_rotary(dtype, partial):
    """Qwen3's / GLM-4.5's q and k norms folded into the launch: as RMSNorm then rotary, the norm being the norm
    kernel's arithmetic (its sum of squares in another order than PyTorch's: a bf16 step at most here)."""
    b, n, kh, t, d_head = 1, 8, 2, 3, 128
    d = 64 if partial else d_head
    g = torch.Generator().manual_seed(5 + partial)
    q = (torch.randn(b, t, n, d_head, generator=g) * 4).to(dtype).to(DEVICE).transpose(1, 2)
    k = (torch.randn(b, t, kh, d_head, generator=g) * 4).to(dtype).to(DEVICE).transpose(1, 2)
    norms = []
    for _ in range(2):
        norm = RMSNorm(d_head, eps=1e-6)
        norm.weight.data = (1 + 0.2 * torch.randn(d_head, generator=g)).to(dtype)
        norms.append(norm.to(DEVICE))
    emb = torch.rand(t, d // 2, generator=g) * 100
    emb = torch.cat((emb, emb), dim=-1)
    cos, sin = emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)
    weights = (norms[0].weight, norms[1].weight, 1e-6)
    got_q, got_k = gpu_fused.rotary_qk(q, k, cos, sin, weights)
    for got, x, norm in ((got_q, q, norms[0]), (got_k, k, norms[1])):
        normed = gpu_fused.rms_norm(x, norm.weight, 1e-6)  # the norm kernel, then PyTorch's rotary
        want = apply_rotary(normed, cos, sin)
        assert got.shape == want.shape and got.dtype == want.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        else:  # the factor may differ in its last bit: an element a bf16 step away at most
            step = (want.float().abs() * 2.0**-7).clamp(min=2.0**-30)
            assert ((got.float() - want.float()).abs() <= step * 1.01).all()
            assert (got == want).float().mean() > 0.99
    # a norm weight wider than q's dtype is declined (the norm's output dtype would change)
    if dtype == torch.bfloat16:
        assert gpu_fused.rotary_qk(q, k, cos, sin, (weights[0].float(), weights[1], 1e-6)) is None


@needs_kernels
def test_rotary_qk_declines_what_it_does_not_cover():
    q = torch.randn(1, 2, 3, 8, device=DEVICE)
    cos = torch.randn(3, 8, device=DEVICE)
    assert gpu_fused.rotary_qk(q, torch.randn(1, 2, 4, 8, device=DEVICE), cos, cos) is None  # k of other tokens
    assert gpu_fused.rotary_qk(q, q, torch.randn(3, 7, device=DEVICE), cos[:, :7]) is None  # an odd rotated width
    assert gpu_fused.rotary_qk(q.double(), q.double(), cos, cos) is None


def test_kernels_decline_what_they_do_not_cover():
    x = torch.randn(2, 8, dtype=torch.float64)
    assert gpu_fused.rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-6) is None


@pytest.mark.skipif(not _SUBPROCESS, reason="the kernels are tested in this process")
def test_kernels_under_the_interpreter_in_a_subprocess():
    run_file_interpreted(__file__)
