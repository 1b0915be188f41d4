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


def test_k_splits_reach_the_programs_without_an_empty_split():
    # Mixtral's k_proj at one token: 256 tiles, 8 steps of K -> 64 programs unsplit, 8 splits of one step
    assert gpu_linear.k_splits(256, 8, 1, 2048) == (8, 1)
    assert gpu_linear.k_splits(1024, 8, 1, 2048) == (8, 1)  # q_proj: 256 programs
    assert gpu_linear.k_splits(8192, 8, 1, 2048) == (1, 8)  # 2048 programs already
    assert gpu_linear.k_splits(8000, 8, 1, 2048) == (2, 4)  # Mixtral's lm_head: 2000 programs, split once
    assert gpu_linear.k_splits(1024, 8, 8, 2048) == (1, 8)  # 8 tokens: 2048 programs
    assert gpu_linear.k_splits(256, 7, 1, 2048) == (7, 1)
    for tiles in (1, 3, 64, 300):
        for steps in (1, 2, 5, 7, 28):
            for programs in (1, 100, 2048):
                splits, each = gpu_linear.k_splits(tiles, steps, 1, programs)
                assert 1 <= splits <= steps and (splits - 1) * each < steps <= splits * each


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES)
def test_split_k_decode_equals_the_unsplit_one(qtype):
    n, k = 20, 2048  # 4 steps of K (q6_k's step: 512 columns; the others' 512 or 256)
    layer, w = _layer(qtype, n, k, 11)
    layer = layer.to(DEVICE)
    x = torch.randn(2, k, dtype=torch.float32, device=DEVICE)
    want = (x.double() @ w.double().to(DEVICE).T).float()
    whole = layer._decode(x, programs=1)
    assert torch.equal(layer._decode(x, torch.bfloat16, 1), whole.bfloat16())
    for programs in (4, 8, 10**6):  # 2 splits of 2 steps; 4 of 1; as many as there are steps
        y = layer._decode(x, programs=programs)
        assert ((y - want).norm() / want.norm()).item() < 1e-5
        torch.testing.assert_close(y, whole, rtol=1e-5, atol=1e-5)
        # bf16 out: the fp32 sum rounded once, in the same launch as the sum (or the product, unsplit)
        assert torch.equal(layer._decode(x, torch.bfloat16, programs), y.bfloat16())


@needs_kernels
@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q5_K", "Q4_0"), ("Q6_K",), ("Q4_K", "Q6_K")])
def test_layers_together_equal_each_alone(types):
    """An attention's q, k, v in one launch (formats mixed as a Q4_K_M file mixes them) equal the layers one by one:
    split or not, fp32 or bf16 out, and through project_together's views."""
    k, rows = 2048, (20, 8, 12)
    layers, refs = zip(*(_layer(q, rows[i], k, 20 + i) for i, q in enumerate(types)), strict=True)
    layers = [layer.to(DEVICE) for layer in layers]
    x = torch.randn(3, k, dtype=torch.float32, device=DEVICE)
    want = torch.cat([(x.double() @ w.double().to(DEVICE).T).float() for w in refs], dim=-1)
    for programs in (1, 8, 10**6):
        y = gpu_linear.decode_together(tuple(layers), x, torch.float32, programs)
        assert ((y - want).norm() / want.norm()).item() < 1e-5
        assert torch.equal(gpu_linear.decode_together(tuple(layers), x, torch.bfloat16, programs), y.bfloat16())
        alone = torch.cat([layer._decode(x, torch.float32, programs) for layer in layers], dim=-1)
        torch.testing.assert_close(y, alone, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16().view(1, 3, k)
    outs = gpu_linear.BlockLinear.project_together(tuple(layers), xb)
    assert [o.shape for o in outs] == [(1, 3, n) for n in rows[: len(types)]]
    for o, layer in zip(outs, layers, strict=True):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), layer(xb).float(), rtol=1e-2, atol=1e-2)


def test_project_together_declines_what_it_cannot_fuse():
    a, _ = _layer("Q4_K", 8, 256, 1)
    b, _ = _layer("Q4_K", 8, 512, 2)
    x = torch.randn(1, 256)
    together = gpu_linear.BlockLinear.project_together
    assert together((a, b), x) is None  # two in_features
    assert together((a, torch.nn.Linear(256, 8)), x) is None
    with_bias, _ = _layer("Q4_K", 8, 256, 3)
    with_bias.bias = torch.nn.Parameter(torch.zeros(8), requires_grad=False)
    assert together((a, with_bias), x) is None
    assert together((a,), torch.randn(gpu_linear.DECODE_MAX_TOKENS + 1, 256)) is None
    assert together((a, a, a, a), x) is None


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
