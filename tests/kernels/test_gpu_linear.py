"""Dense layers kept in a GGUF file's blocks (cadenza.kernels.gpu_linear.BlockLinear) against gguf-py's dequantized
weights: the Triton decode product and the dequantize-then-matmul route (through Triton's interpreter on CPU-only
machines, as tests/kernels/test_gpu_moe.py), and the PyTorch reference route."""

import pytest
import torch

from tests.interpreted import DEVICE, kernels_module, run_file_interpreted
from tests.kernels.block_data import random_blocks, reference

gpu_linear, _SUBPROCESS = kernels_module("gpu_linear")
KERNELS = gpu_linear.available(DEVICE)
needs_kernels = pytest.mark.skipif(not KERNELS, reason="the Triton kernels cannot run here (see test_gpu_moe.py)")

TYPES = ["Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]


def _layer(qtype: str, n: int, k: int, seed: int):
    raw = random_blocks(qtype, n, k, seed)
    return gpu_linear.BlockLinear.from_gguf(qtype, raw, n, k), reference(qtype, raw)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [10, 12])  # 10: the last tile padded (numpy's path); 12: repack.cpp's
def test_tiles_hold_the_files_weights_and_fewer_bytes(qtype, rows):
    layer, w = _layer(qtype, rows, 512, 3)
    assert torch.equal(layer.weight, w)
    nbytes = layer.tiles.numel()
    assert nbytes == gpu_linear.BlockLinear.nbytes_of(qtype, rows, 512) and nbytes < rows * 512 * 2 * 0.75


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("tokens", [1, 3, 12])  # 12: past DECODE_MAX_TOKENS, the dequantize route
def test_kernel_routes_equal_dequantized_weights(qtype, tokens):
    n, k = 36, 512
    layer, w = _layer(qtype, n, k, 5)
    layer = layer.to(DEVICE)
    x = torch.randn(tokens, k, dtype=torch.float32, device=DEVICE)
    want = (x.double() @ w.double().to(DEVICE).T).float()
    y = layer(x)
    assert y.shape == (tokens, n) and y.dtype == torch.float32
    assert ((y - want).norm() / want.norm()).item() < 1e-5
    xb = x.bfloat16()  # bf16 activations (a bf16 model): one rounding of the output
    yb = layer(xb[None])[0]
    assert yb.dtype == torch.bfloat16
    wantb = (xb.double() @ w.double().to(DEVICE).T).float()
    assert ((yb.float() - wantb).norm() / wantb.norm()).item() < 6e-3


def test_reference_route_and_bias():
    layer, w = _layer("Q4_K", 8, 256, 9)
    layer.bias = torch.nn.Parameter(torch.randn(8), requires_grad=False)
    x = torch.randn(2, 5, 256)
    y = gpu_linear.BlockLinear.forward(layer, x) if not KERNELS else layer(x)
    torch.testing.assert_close(y, x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)


def test_wrong_tiles_are_refused():
    layer, _ = _layer("Q8_0", 8, 256, 1)
    with pytest.raises(ValueError, match="tiles"):
        gpu_linear.BlockLinear("q8_0", 256, 12, layer.tiles)


@pytest.mark.skipif(not _SUBPROCESS, reason="the kernels are tested in this process")
def test_kernels_under_the_interpreter_in_a_subprocess():
    run_file_interpreted(__file__)
