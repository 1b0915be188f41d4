"""The fused decode kernels (cadenza.kernels.gpu_fused) against PyTorch's spelling in cadenza.models.common.

On CPU-only machines the Triton kernels run through Triton's interpreter (tests/interpreted.py); with CUDA the
compiled kernels run, and the reference is computed on the CPU from the same inputs. Rotary in bf16 is bit-exact
(each product rounded where PyTorch rounds it); in fp32 the GPU compiler may fuse a product into the sum (one
rounding fewer), so there it is within 2 fp32 steps; RMSNorm sums its squares in another order: fp32 within 2e-6
relative, bf16 / fp16 at most two steps of the output dtype apart (the normalised value is rounded, then the product).
"""

import pytest
import torch

from cadenza.models.common import RMSNorm, apply_rotary
from tests.interpreted import DEVICE, kernels_module

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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_rotary_matches_reference(dtype, partial, per_row):
    b, n, t, d_head = 2, 3, 5, 64
    d = 32 if partial else d_head
    g = torch.Generator().manual_seed(1)
    # q as the attention makes it: a [B, T, N, D] projection viewed as [B, N, T, D] (not contiguous)
    x = torch.randn(b, t, n, d_head, generator=g).to(dtype).transpose(1, 2)
    ang = torch.randn(b if per_row else 1, 1, t, d // 2, generator=g)
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if not per_row:
        cos, sin = cos[0, 0], sin[0, 0]  # [T, d]
    want = apply_rotary(x, cos, sin)
    got = gpu_fused.rotary(x.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE)).cpu()
    assert got.dtype == want.dtype
    if dtype == torch.float32 and DEVICE.type == "cuda":
        torch.testing.assert_close(got, want, rtol=2.5e-7, atol=1e-7)
    else:
        assert torch.equal(got, want)


def test_kernels_decline_what_they_do_not_cover():
    x = torch.randn(2, 8, dtype=torch.float64)
    assert gpu_fused.rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-6) is None
    assert gpu_fused.rotary(torch.randn(2, 3, 4), torch.ones(3, 4), torch.ones(3, 4)) is None  # not 4-D
