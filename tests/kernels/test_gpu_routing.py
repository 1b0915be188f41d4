"""The fused softmax top-k router (cadenza.kernels.gpu_fused.softmax_topk) against cadenza.moe.routing.softmax_topk's
PyTorch arithmetic (through Triton's interpreter on CPU-only machines, as tests/kernels/test_gpu_moe.py)."""

import pytest
import torch

from cadenza.moe import routing
from tests.interpreted import DEVICE, kernels_module, run_file_interpreted

gpu_fused, _SUBPROCESS = kernels_module("gpu_fused")
needs_kernels = pytest.mark.skipif(
    not gpu_fused.available(DEVICE), reason="the Triton kernels cannot run here (see test_gpu_moe.py)"
)


def _torch_softmax_topk(logits, k, norm):
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    return (w / w.sum(dim=-1, keepdim=True) if norm else w), ids


@needs_kernels
@pytest.mark.parametrize("experts,k", [(8, 2), (60, 4), (128, 8), (64, 1), (3, 3)])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_router_equals_the_pytorch_arithmetic(experts, k, norm, dtype):
    g = torch.Generator().manual_seed(experts * 10 + k)
    logits = (torch.randn(5, experts, generator=g) * 2).to(dtype).to(DEVICE)
    w, ids = gpu_fused.softmax_topk(logits, k, norm)
    want_w, want_ids = _torch_softmax_topk(logits, k, norm)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == ids.shape == (5, k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=2e-6, atol=1e-7)
    if norm:
        torch.testing.assert_close(w.sum(-1), torch.ones(5, device=DEVICE), rtol=1e-6, atol=1e-6)


@needs_kernels
def test_equal_probabilities_go_lower_expert_first_and_a_strided_view_is_read():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0, 0.0]], device=DEVICE)
    w, ids = gpu_fused.softmax_topk(logits, 3, True)
    assert ids.tolist() == [[1, 2, 4]]
    torch.testing.assert_close(w, torch.full((1, 3), 1 / 3, device=DEVICE))
    wide = torch.randn(4, 16, device=DEVICE)
    view = wide[:, ::2]  # rows of 8 with stride 2 between columns
    w2, ids2 = gpu_fused.softmax_topk(view, 2, True)
    want_w, want_ids = _torch_softmax_topk(view, 2, True)
    assert torch.equal(ids2, want_ids)
    torch.testing.assert_close(w2, want_w, rtol=2e-6, atol=1e-7)


def test_fits_only_what_the_kernel_takes():
    x = torch.zeros(2, 8, device=DEVICE)
    on = gpu_fused.available(DEVICE)
    assert gpu_fused.topk_fits(x, 2) == on
    assert not gpu_fused.topk_fits(x, 9) and not gpu_fused.topk_fits(x, 0)
    assert not gpu_fused.topk_fits(torch.zeros(0, 8, device=DEVICE), 2)
    assert not gpu_fused.topk_fits(torch.zeros(2, gpu_fused.MAX_EXPERTS + 1, device=DEVICE), 2)
    assert not gpu_fused.topk_fits(torch.zeros(2, 3, 8, device=DEVICE), 2)


def test_routing_takes_the_pytorch_path_off_the_gpu():
    logits = torch.randn(3, 8)
    w, ids = routing.softmax_topk(logits, 2)
    want_w, want_ids = _torch_softmax_topk(logits, 2, True)
    assert torch.equal(ids, want_ids) and torch.equal(w, want_w)


@pytest.mark.skipif(not _SUBPROCESS, reason="the kernels are tested in this process")
def test_kernels_under_the_interpreter_in_a_subprocess():
    run_file_interpreted(__file__)
