"""The fused decode kernel (cadenza.kernels.gpu_fused) against PyTorch's spelling in cadenza.models.common.

On CPU-only machines the Triton kernels run through Triton's interpreter (tests/interpreted.py); with CUDA the
compiled kernels run, and the reference is computed on the CPU from the same inputs. RMSNorm sums its squares
in another order: fp32 within 2e-6 relative, bf16 / fp16 at most two steps of the output dtype apart (the
normalised value is rounded, then the product).
"""

import pytest
import torch

from cadenza.models.common import RMSNorm
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


def test_kernels_decline_what_they_do_not_cover():
    x = torch.randn(2, 8, dtype=torch.float64)
    assert gpu_fused.rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-6) is None


@pytest.mark.skipif(not _SUBPROCESS, reason="the kernels are tested in this process")
def test_kernels_under_the_interpreter_in_a_subprocess():
    run_file_interpreted(__file__)
