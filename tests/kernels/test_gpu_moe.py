"""The GPU routed-expert kernels (cadenza.kernels.gpu_moe) against the exact reference.

Without CUDA the Triton kernels run through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set below
before triton is first imported; if something imported it earlier, one test reruns this file in a subprocess);
with CUDA the same tests run the compiled kernels on the GPU, and the `gpu` tests add full-size shapes and CUDA
graphs. Reference: the
weights the layout really holds (`layout.dequantize`, or the plain tensors) in float64, y[t] = sum over pairs
with row >= 0 of w * down(act(gate x) * up x). Bounds, relative Frobenius error of y [T, H]:
- fp32 x and weights: 1e-5 (fp32 sums in another order; measured ~5e-7), kernels and the PyTorch fallback alike;
- bf16 x (output rounded once to bf16, 2^-9 relative per element): 6e-3 against the reference, and 6e-3 between
  kernel and fallback (the same fp32 value up to sum order, then rounded: at most one bf16 step apart);
- dequantize_expert: exactly the reference in fp32, and exactly its one rounding in bf16 / fp16.
Interpreter tests pass large blocks (few programs: seconds, not minutes); one case runs the default blocks.
"""

import pytest
import torch

from cadenza.errors import CadenzaError
from cadenza.kernels import blocks as block_formats
from cadenza.kernels.layout import dequantize, dequantize_tiles, empty_packed, pack_layer, write_block_expert
from cadenza.models.common import act_fn
from tests.interpreted import DEVICE, kernels_module, run_file_interpreted  # noqa: E402

gpu_moe, _SUBPROCESS = kernels_module("gpu_moe")

from cadenza.bench.gpu_kernel import random_plain, random_tiled  # noqa: E402
from tests.kernels.block_data import random_blocks  # noqa: E402

FP32, BF16 = 1e-5, 6e-3
BIG = gpu_moe.Blocks(128, 256, 128, 256)  # few programs: fast under the interpreter

KERNELS = gpu_moe.available(DEVICE)
WHY = (
    "the kernel tests run in a subprocess (triton was imported before its interpreter could be switched on)"
    if _SUBPROCESS
    else "Triton is not importable: the kernels are checked through its interpreter on the CPU (pip install triton)"
)
needs_kernels = pytest.mark.skipif(not KERNELS, reason=WHY)


def experts(r, h, i, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(r, i, h, generator=g) * h**-0.5 for _ in range(2))
    return gate, up, torch.randn(r, h, i, generator=g) * i**-0.5


def routing(t, k, r, h, seed=1, skip=True):
    """x [t, h], rows [t, k] (distinct per token; with skip, every third pair -1), weights [t, k]."""
    g = torch.Generator().manual_seed(seed + 10 * t + k)
    rows = torch.stack([torch.randperm(r, generator=g)[:k] for _ in range(t)])
    if skip:
        rows.view(-1)[1::3] = -1
    return torch.randn(t, h, generator=g), rows, torch.rand(t, k, generator=g)


def reference(x, rows, w, gate, up, down, act):
    """float64 y [T, H] from the weights the layer holds (gate, up [R, I, H], down [R, H, I])."""
    fn = act_fn(act)
    y = torch.zeros(x.shape[0], gate.shape[2], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(rows[t].tolist()):
            if e >= 0:
                xt = x[t].double()
                hv = fn(gate[e].double() @ xt) * (up[e].double() @ xt)
                y[t] += w[t, j].double() * (down[e].double() @ hv)
    return y


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def on(*ts):
    return [t.to(DEVICE) for t in ts]


# --- moe_decode ----------------------------------------------------------------------------------------------------

PLAIN_CASES = [  # (H, I, T, k, act, dtype)
    (200, 136, 7, 2, "silu", torch.float32),
    (256, 256, 1, 1, "relu", torch.float32),
    (256, 128, 2, 2, "gelu", torch.float32),
    (200, 136, 2, 2, "gelu_pytorch_tanh", torch.bfloat16),
]


@pytest.mark.parametrize("route", ["triton", "torch"])
@pytest.mark.parametrize("h, i, t, k, act, dtype", PLAIN_CASES)
def test_decode_plain(route, h, i, t, k, act, dtype):
    if route == "triton" and not KERNELS:
        pytest.skip(WHY)
    gate, up, down = (m.to(dtype) for m in experts(4, h, i))
    x, rows, w = routing(t, k, 4, h)
    x = x.to(dtype)
    y = gpu_moe.moe_decode(*on(x, rows, w), on(gate, up, down), act, blocks=BIG, route=route)
    assert y.dtype == dtype and y.shape == (t, h)
    assert rel(y, reference(x, rows, w, gate, up, down, act)) < (FP32 if dtype == torch.float32 else BF16)


TILED_CASES = [  # (fmt, group, H, I, T, k, act)
    ("bf16", 0, 200, 136, 7, 2, "silu"),
    ("bf16", 0, 256, 128, 1, 2, "gelu"),
    ("int8", 0, 200, 136, 2, 2, "relu"),
    ("int8", 32, 200, 136, 7, 2, "silu"),
    ("int8", 32, 256, 256, 1, 1, "gelu_pytorch_tanh"),
    ("int8", 128, 256, 384, 2, 1, "silu"),
    ("int4", 32, 200, 136, 7, 2, "silu"),
    ("int4", 64, 256, 256, 2, 2, "gelu"),
    ("int4", 128, 200, 136, 1, 2, "relu"),
    ("int4", 64, 384, 200, 2, 2, "gelu_new"),
    ("int4", 32, 200, 300, 1, 2, "silu"),  # Ip = 384: h zero-padded to whole steps of the down kernel
]


@pytest.mark.parametrize("route", ["triton", "torch"])
@pytest.mark.parametrize("fmt, group, h, i, t, k, act", TILED_CASES)
def test_decode_tiled(route, fmt, group, h, i, t, k, act):
    if route == "triton" and not KERNELS:
        pytest.skip(WHY)
    packed = pack_layer(*experts(5, h, i), fmt, group)
    x, rows, w = routing(t, k, 5, h)
    kw = dict(fmt=fmt, group=group, hidden=h, intermediate=i, blocks=BIG, route=route)
    y = gpu_moe.moe_decode(*on(x, rows, w), on(packed.gate_up, packed.down), act, **kw)
    assert y.dtype == torch.float32 and y.shape == (t, h)
    assert rel(y, reference(x, rows, w, *dequantize(packed), act)) < FP32


def block_layer(fmt, r, h, i, seed=0):
    """A layer of r experts in a block format (or a "gate_up+down" pair) from random GGUF blocks."""
    gf, _, df = fmt.partition("+")
    gq, dq = block_formats.BLOCK_FORMATS[gf].gguf, block_formats.BLOCK_FORMATS[df or gf].gguf
    out = empty_packed(fmt, None, r, h, i)
    for e in range(r):
        s = seed + 3 * e
        gate, up = (block_formats.from_gguf(gq, random_blocks(gq, i, h, s + j), h) for j in (0, 1))
        write_block_expert(out, e, gate, up, block_formats.from_gguf(dq, random_blocks(dq, h, i, s + 2), i))
    return out


BLOCK_CASES = [  # (fmt, H, I, T, k, act): I, H multiples of the format's blocks (32; K-quants 256)
    ("q4_0", 256, 160, 2, 2, "silu"),  # Ip = 256: rows and columns of down padded
    ("q4_k", 256, 512, 3, 2, "gelu"),
    ("mxfp4", 2880, 96, 1, 3, "silu"),  # gpt-oss's H: Hp = 2944 (columns padded, groups past H zero), Ip = 128
    ("mxfp4", 256, 160, 4, 2, "relu"),
    ("q6_k", 256, 256, 2, 2, "gelu_pytorch_tanh"),  # groups of 16
    ("q4_k+q6_k", 512, 1792, 2, 2, "silu"),  # Q4_K_M's pair, Mixtral's proportions (I = 3.5 H)
    ("q6_k+q4_k", 256, 256, 1, 2, "silu"),
    ("q8_0", 256, 160, 2, 2, "silu"),  # int8 codes, fp16 scale per 32
    ("q8_0+q4_0", 256, 256, 3, 2, "silu"),
    ("q5_k", 256, 512, 2, 2, "silu"),  # 5-bit codes with q4_k's fields
    ("q4_k+q5_k", 512, 256, 1, 2, "silu"),
]
BLOCK_BIG = gpu_moe.Blocks(128, 1024, 128, 1024)  # few programs under the interpreter
# the fallback (dequantize_tiles per matrix, as the dequantize tests check) on the small cases: nib, byte, a pair
BLOCK_ROUTES = [(*c, "triton") for c in BLOCK_CASES] + [(*c, "torch") for c in BLOCK_CASES if c[1] * c[2] <= 256 * 256]


@pytest.mark.parametrize("fmt, h, i, t, k, act, route", BLOCK_ROUTES)
def test_decode_block_formats(fmt, h, i, t, k, act, route):
    """Block-format layers (each matrix read in its own format) equal the reference: their weights as
    layout.dequantize reads them; pairs with row -1 skipped."""
    if route == "triton" and not KERNELS:
        pytest.skip(WHY)
    r = 3 if h * i > 256 * 512 else 5  # the large shapes: fewer experts to build
    packed = block_layer(fmt, r, h, i)
    x, rows, w = routing(t, k, r, h)
    kw = dict(fmt=fmt, group=packed.group, hidden=h, intermediate=i, blocks=BLOCK_BIG, route=route)
    y = gpu_moe.moe_decode(*on(x, rows, w), on(packed.gate_up, packed.down), act, **kw)
    assert y.dtype == torch.float32 and y.shape == (t, h)
    assert rel(y, reference(x, rows, w, *dequantize(packed), act)) < FP32


@needs_kernels
@pytest.mark.parametrize("fmt", ["q4_k+q6_k", "mxfp4", "q5_k+q4_k"])
def test_decode_block_formats_small_blocks_bf16_x(fmt):
    """Small blocks: 8 tiles a program, 128 columns a step (several steps, q6_k's 16-column groups across them);
    bf16 x against the reference and the fallback."""
    h, i = 256, 256
    packed = block_layer(fmt, 3, h, i, seed=4)
    x, rows, w = routing(1, 2, 3, h)
    x = x.bfloat16()
    kw = dict(fmt=fmt, group=packed.group, hidden=h, intermediate=i)
    mats = on(packed.gate_up, packed.down)
    y = gpu_moe.moe_decode(*on(x, rows, w), mats, "silu", **kw, blocks=gpu_moe.Blocks(32, 128, 32, 128, warps=2))
    fb = gpu_moe.moe_decode(*on(x, rows, w), mats, "silu", **kw, route="torch")
    assert y.dtype == torch.bfloat16
    assert rel(y, reference(x, rows, w, *dequantize(packed), "silu")) < BF16
    assert rel(y, fb) < BF16


@needs_kernels
def test_decode_q6_k_default_columns():
    """q6_k's default step (512 columns, 384 bytes of a row) over two steps of the 6-bit layout."""
    h, i = 1024, 256
    cols = gpu_moe.default_blocks("q6_k", h, i, 1).gu_cols
    assert cols == 512
    packed = block_layer("q6_k", 2, h, i, seed=3)
    x, rows, w = routing(2, 1, 2, h)
    kw = dict(fmt="q6_k", group=packed.group, hidden=h, intermediate=i, blocks=gpu_moe.Blocks(128, cols, 128, cols))
    y = gpu_moe.moe_decode(*on(x, rows, w), on(packed.gate_up, packed.down), "silu", **kw)
    assert rel(y, reference(x, rows, w, *dequantize(packed), "silu")) < FP32


# the interpreter runs this variant slowly (~1 min a case at TILED_CASES' sizes): small cases here, the rest on GPUs
_BLOCKS = [(128, 256), (8, 128)]  # (rows, columns) per program: big, small
INT4_ROWS_CASES = [(*c, *b) for c in TILED_CASES if c[0] == "int4" for b in _BLOCKS]
if DEVICE.type != "cuda":
    INT4_ROWS_CASES = [
        ("int4", 32, 136, 200, 2, 1, "silu", *_BLOCKS[0]),  # 4 groups a piece; Ip = 256, I = 200: h zero-padded
        ("int4", 128, 128, 128, 1, 2, "gelu", *_BLOCKS[1]),  # one group a piece
    ]


@needs_kernels
@pytest.mark.parametrize("fmt, group, h, i, t, k, act, gu_rows, cols", INT4_ROWS_CASES)
def test_decode_int4_rows_in_thread(fmt, group, h, i, t, k, act, gu_rows, cols):
    """The int4 loop variant that holds a tile's 4 rows per thread equals the reference, in big and small blocks."""
    packed = pack_layer(*experts(5, h, i), fmt, group)
    x, rows, w = routing(t, k, 5, h)
    blocks = gpu_moe.Blocks(gu_rows, cols, gu_rows, cols, warps=2, int4_rows=1)
    kw = dict(fmt=fmt, group=group, hidden=h, intermediate=i, blocks=blocks)
    y = gpu_moe.moe_decode(*on(x, rows, w), on(packed.gate_up, packed.down), act, **kw)
    assert rel(y, reference(x, rows, w, *dequantize(packed), act)) < FP32


@needs_kernels
def test_decode_default_blocks_int32_rows_bf16_x():
    """The default (small) blocks, int32 rows, bf16 activations and weights in bf16 (the model's dtype)."""
    h, i = 136, 100
    packed = pack_layer(*experts(3, h, i), "int4", 64)
    x, rows, w = routing(1, 1, 3, h, skip=False)
    x, rows, w = x.bfloat16(), rows.int(), w.bfloat16()
    kw = dict(fmt="int4", group=64, hidden=h, intermediate=i)
    mats = on(packed.gate_up, packed.down)
    y = gpu_moe.moe_decode(*on(x, rows, w), mats, "silu", **kw)
    fb = gpu_moe.moe_decode(*on(x, rows, w), mats, "silu", **kw, route="torch")
    assert y.dtype == torch.bfloat16
    assert rel(y, reference(x, rows, w, *dequantize(packed), "silu")) < BF16
    assert rel(y, fb) < BF16


@needs_kernels
def test_decode_small_blocks_and_fp16():
    """One tile (4 rows) per program, 128 columns per step; plain fp16."""
    h, i = 136, 100
    small = gpu_moe.Blocks(4, 128, 4, 128, warps=2)
    packed = pack_layer(*experts(3, h, i), "int8", 64)
    x, rows, w = routing(1, 1, 3, h, skip=False)
    kw = dict(fmt="int8", group=64, hidden=h, intermediate=i, blocks=small)
    y = gpu_moe.moe_decode(*on(x, rows, w), on(packed.gate_up, packed.down), "silu", **kw)
    assert rel(y, reference(x, rows, w, *dequantize(packed), "silu")) < FP32
    gate, up, down = (m.half() for m in experts(3, h, i))
    x, rows, w = routing(2, 2, 3, h)
    y = gpu_moe.moe_decode(*on(x.half(), rows, w), on(gate, up, down), "silu", blocks=gpu_moe.Blocks(8, 128, 32, 128))
    assert y.dtype == torch.float16
    assert rel(y, reference(x.half(), rows, w, gate, up, down, "silu")) < BF16


@pytest.mark.parametrize("route", ["auto", "torch"])
def test_skipped_pairs_add_nothing(route):
    h, i = 200, 136
    packed = pack_layer(*experts(3, h, i), "int4", 32)
    x, rows, w = routing(3, 2, 3, h)
    kw = dict(fmt="int4", group=32, hidden=h, intermediate=i, blocks=BIG, route=route)
    mats = on(packed.gate_up, packed.down)
    w[rows < 0] = float("nan")  # a skipped pair's weight is never read
    y = gpu_moe.moe_decode(*on(x, torch.full_like(rows, -1), w), mats, "silu", **kw)
    assert torch.equal(y.cpu(), torch.zeros(3, h))
    y = gpu_moe.moe_decode(*on(x, rows, w), mats, "silu", **kw)
    assert rel(y, reference(x, rows, w, *dequantize(packed), "silu")) < FP32
    assert gpu_moe.moe_decode(*on(x[:0], rows[:0], w[:0]), mats, "silu", **kw).shape == (0, h)


def test_decode_rejects_bad_arguments():
    h, i = 200, 136
    packed = pack_layer(*experts(2, h, i), "int8", 0)
    x, rows, w = routing(1, 2, 2, h)
    mats = (packed.gate_up, packed.down)
    with pytest.raises(ValueError, match="unknown expert format"):
        gpu_moe.moe_decode(x, rows, w, mats, "silu", fmt="int3", hidden=h, intermediate=i)
    with pytest.raises(ValueError, match="tiles for H=200"):
        gpu_moe.moe_decode(x, rows, w, mats, "silu", fmt="int8", group=32, hidden=h, intermediate=i)
    with pytest.raises(ValueError, match="hidden=100"):
        gpu_moe.moe_decode(x, rows, w, mats, "silu", fmt="int8", hidden=100, intermediate=i)
    with pytest.raises(ValueError, match="int32 or int64"):
        gpu_moe.moe_decode(x, rows.float(), w, mats, "silu", fmt="int8", hidden=h, intermediate=i)
    with pytest.raises(CadenzaError, match="activation"):
        gpu_moe.moe_decode(x, rows, w, mats, "swiglu9", fmt="int8", hidden=h, intermediate=i)
    with pytest.raises(ValueError, match="unknown route"):
        gpu_moe.moe_decode(x, rows, w, mats, "silu", fmt="int8", hidden=h, intermediate=i, route="fast")
    with pytest.raises(ValueError, match="powers of two"):
        gpu_moe.Blocks(gu_rows=12)
    if not gpu_moe.available("cpu"):
        with pytest.raises(RuntimeError, match="cannot run"):
            gpu_moe.moe_decode(x, rows, w, mats, "silu", fmt="int8", hidden=h, intermediate=i, route="triton")


# --- dequantize_expert, expert_forward -----------------------------------------------------------------------------

DEQUANT_CASES = [("bf16", 0), ("int8", 0), ("int8", 32), ("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)]


@pytest.mark.parametrize("route", ["auto", "torch"])
@pytest.mark.parametrize("fmt, group", DEQUANT_CASES)
def test_dequantize_expert_exact(route, fmt, group):
    for h, i, dtypes in ((200, 136, (torch.float32, torch.bfloat16, torch.float16)), (256, 384, (torch.float32,))):
        packed = pack_layer(*experts(2, h, i, seed=h), fmt, group)
        gu, dn = on(packed.gate_up[1], packed.down[1])
        want = [m[1] for m in dequantize(packed)]
        for dtype in dtypes:
            got = gpu_moe.dequantize_expert(gu, dn, fmt, group, h, i, dtype, route=route, block_tiles=32)
            for g, ref in zip(got, want, strict=True):
                assert g.dtype == dtype and torch.equal(g.cpu(), ref.to(dtype)), (h, i, dtype)


@pytest.mark.parametrize("route", ["triton", "torch"])
@pytest.mark.parametrize(
    "fmt, h, i",
    [
        ("q4_0", 256, 160),
        ("q4_k", 256, 512),
        ("mxfp4", 2880, 96),
        ("q6_k", 512, 256),
        ("q4_k+q6_k", 256, 768),
        ("q8_0", 256, 160),
        ("q5_k", 256, 512),
    ],  # fmt: skip
)
def test_dequantize_block_formats_exact(route, fmt, h, i):
    """The prefill path's unpacking of block formats: exactly the layer's weights in fp32, and their one rounding
    in bf16."""
    if route == "triton" and not KERNELS:
        pytest.skip(WHY)
    packed = block_layer(fmt, 2, h, i, seed=7)
    gu, dn = on(packed.gate_up[1], packed.down[1])
    want = [m[1] for m in dequantize(packed)]
    for dtype in (torch.float32, torch.bfloat16):
        got = gpu_moe.dequantize_expert(gu, dn, fmt, packed.group, h, i, dtype, route=route, block_tiles=32)
        for g, ref in zip(got, want, strict=True):
            assert g.dtype == dtype and torch.equal(g.cpu(), ref.to(dtype)), (fmt, dtype)


def test_block_format_geometry_is_checked_per_matrix():
    """A "gate_up+down" layer's tiles are checked with each matrix's own tile bytes; a pair naming a non-block
    format is refused."""
    packed = block_layer("q4_k+q6_k", 1, 256, 256)
    x, rows, w = routing(1, 1, 1, 256, skip=False)
    mats = (packed.gate_up, packed.down)
    kw = dict(group=32, hidden=256, intermediate=256, route="torch")
    with pytest.raises(ValueError, match="tiles for H=256"):
        gpu_moe.moe_decode(x, rows, w, mats, "silu", fmt="q4_k", **kw)  # down is q6_k: other tile bytes
    with pytest.raises(ValueError, match="unknown expert format"):
        gpu_moe.moe_decode(x, rows, w, mats, "silu", fmt="int4+q6_k", **kw)
    y = gpu_moe.moe_decode(x, rows, w, mats, "silu", fmt="q4_k+q6_k", **kw)
    assert rel(y, reference(x, rows, w, *dequantize(packed), "silu")) < FP32


@needs_kernels
def test_dequantize_into_strided_buffers():
    h, i = 200, 136
    packed = pack_layer(*experts(1, h, i), "int4", 64)
    big = torch.zeros(2 * i, h + 8, device=DEVICE)
    gate, up = big[:i, :h], big[i:, :h]  # rows h + 8 apart
    dn = torch.zeros(h, i, device=DEVICE)
    gpu_moe.dequantize_into(*on(packed.gate_up[0], packed.down[0]), "int4", 64, h, i, gate, up, dn)
    want = [m[0] for m in dequantize(packed)]
    for g, ref in zip((gate, up, dn), want, strict=True):
        assert torch.equal(g.cpu(), ref)
    assert not big[:, h:].any()  # nothing written past the view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_forward(dtype):
    h, i, n = 200, 136, 5
    packed = pack_layer(*experts(2, h, i), "int8", 32)
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(3)).to(dtype)
    ws = tuple(torch.empty(s, dtype=dtype, device=DEVICE) for s in ((i, h), (i, h), (h, i)))
    y = gpu_moe.expert_forward(x.to(DEVICE), *on(packed.gate_up[1], packed.down[1]), "int8", 32, h, i, "gelu", ws)
    assert y.dtype == torch.float32 and y.shape == (n, h)
    gate, up, down = (m[1] for m in dequantize(packed))
    if dtype == torch.float32:
        ref = reference(x, torch.tensor([[0]] * n), torch.ones(n, 1), *(m[None] for m in (gate, up, down)), "gelu")
        assert rel(y, ref) < FP32
    else:  # the same bf16 operations as run_experts on the dequantized bf16 weights
        g, u, d = (m.to(dtype).to(DEVICE) for m in (gate, up, down))
        xd = x.to(DEVICE)
        ref = ((act_fn("gelu")(xd @ g.T) * (xd @ u.T)) @ d.T).float()
        assert torch.equal(y, ref)


def test_dequantize_tiles_reference_matches_layout():
    """The fallback's cropping of dequantize_tiles is the layer's own dequantize."""
    h, i = 200, 136
    packed = pack_layer(*experts(1, h, i), "int4", 32)
    gate, up, down = gpu_moe.dequantize_expert(
        packed.gate_up[0], packed.down[0], "int4", 32, h, i, torch.float32, route="torch"
    )
    assert torch.equal(down, dequantize_tiles(packed.down[0], "int4", 32, 256)[:h, :i])
    assert torch.equal(gate, dequantize(packed)[0][0]) and torch.equal(up, dequantize(packed)[1][0])


@pytest.mark.skipif(not _SUBPROCESS, reason="the kernels are tested in this process")
def test_kernels_under_the_interpreter_in_a_subprocess():
    run_file_interpreted(__file__)


# --- on the GPU: full-size shapes, CUDA graphs -----------------------------------------------------------------------

GPU_SHAPES = [(4096, 14336, 3), (2048, 768, 16)]  # Mixtral 8x7B, Qwen3-30B-A3B: H, I, stacked rows


@pytest.mark.gpu
@pytest.mark.parametrize("h, i, r", GPU_SHAPES)
@pytest.mark.parametrize("fmt", [None, "bf16", "int8", "int4"])
def test_gpu_full_size_matches_fallback(h, i, r, fmt):
    dev = torch.device("cuda")
    group = {None: 0, "bf16": 0, "int8": 0, "int4": 64}[fmt]
    if fmt is None:
        mats, kw = random_plain(r, h, i, dev), {}
    else:
        mats, kw = random_tiled(r, fmt, group, h, i, dev), dict(fmt=fmt, group=group, hidden=h, intermediate=i)
    for t, k in ((1, 2), (4, 2), (3, 8 if r >= 8 else r)):
        x, rows, w = routing(t, k, r, h)
        x, rows, w = x.to(dev).bfloat16(), rows.to(dev), w.to(dev)
        fb = gpu_moe.moe_decode(x, rows, w, mats, "silu", **kw, route="torch")
        y = gpu_moe.moe_decode(x, rows, w, mats, "silu", **kw)
        y_fp32 = gpu_moe.moe_decode(x.float(), rows, w, mats, "silu", **kw)
        fb_fp32 = gpu_moe.moe_decode(x.float(), rows, w, mats, "silu", **kw, route="torch")
        assert rel(y_fp32, fb_fp32) < FP32, (t, k)
        assert rel(y, fb) < BF16, (t, k)
        assert torch.equal(y, gpu_moe.moe_decode(x, rows, w, mats, "silu", **kw))  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [None, "int4"])
def test_gpu_cuda_graph_replay(fmt):
    dev = torch.device("cuda")
    h, i, r = 2048, 768, 16
    if fmt is None:
        mats, kw = random_plain(r, h, i, dev), {}
    else:
        mats, kw = random_tiled(r, fmt, 64, h, i, dev), dict(fmt=fmt, group=64, hidden=h, intermediate=i)
    x, rows, w = (v.to(dev) for v in routing(4, 2, r, h, seed=5))
    x = x.bfloat16()
    gpu_moe.moe_decode(x, rows, w, mats, "silu", **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gpu_moe.moe_decode(x, rows, w, mats, "silu", **kw)
    for seed in (6, 7):
        x2, rows2, w2 = (v.to(dev) for v in routing(4, 2, r, h, seed=seed))
        x.copy_(x2.bfloat16())
        rows.copy_(rows2)
        w.copy_(w2)
        graph.replay()
        assert torch.equal(y, gpu_moe.moe_decode(x, rows, w, mats, "silu", **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, group", [("bf16", 0), ("int8", 0), ("int4", 64)])
def test_gpu_dequantize_full_size(fmt, group):
    dev = torch.device("cuda")
    h, i = 4096, 14336
    gu, dn = random_tiled(1, fmt, group, h, i, dev)
    got = gpu_moe.dequantize_expert(gu[0], dn[0], fmt, group, h, i, torch.bfloat16)
    want = gpu_moe.dequantize_expert(gu[0], dn[0], fmt, group, h, i, torch.bfloat16, route="torch")
    for g, ref in zip(got, want, strict=True):
        assert torch.equal(g, ref)


GPU_BLOCK_SHAPES = [  # (fmt, H, I, stacked rows): Mixtral in Q4_K_M's pair, gpt-oss in MXFP4, Qwen3 in Q4_0 / Q6_K
    ("q4_k+q6_k", 4096, 14336, 2),
    ("mxfp4", 2880, 2880, 4),
    ("q4_0", 2048, 768, 8),
    ("q6_k", 2048, 768, 8),
    ("q8_0", 2048, 768, 8),
    ("q5_k+q6_k", 2048, 768, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, h, i, r", GPU_BLOCK_SHAPES)
def test_gpu_block_formats_full_size(fmt, h, i, r):
    """Block formats at full size with the default blocks: the kernels equal the fallback (fp32 and bf16 x), and
    the dequantize kernel its values bit for bit."""
    dev = torch.device("cuda")
    packed = block_layer(fmt, r, h, i)
    mats = (packed.gate_up.to(dev), packed.down.to(dev))
    kw = dict(fmt=fmt, group=packed.group, hidden=h, intermediate=i)
    for t, k in ((1, 2), (4, 2), (3, min(r, 8))):
        x, rows, w = routing(t, k, r, h)
        x, rows, w = x.to(dev), rows.to(dev), w.to(dev)
        y = gpu_moe.moe_decode(x, rows, w, mats, "silu", **kw)
        assert rel(y, gpu_moe.moe_decode(x, rows, w, mats, "silu", **kw, route="torch")) < FP32, (t, k)
        xb = x.bfloat16()
        yb = gpu_moe.moe_decode(xb, rows, w, mats, "silu", **kw)
        assert rel(yb, gpu_moe.moe_decode(xb, rows, w, mats, "silu", **kw, route="torch")) < BF16, (t, k)
    for dtype in (torch.float32, torch.bfloat16):
        got = gpu_moe.dequantize_expert(mats[0][1], mats[1][1], fmt, packed.group, h, i, dtype)
        want = gpu_moe.dequantize_expert(mats[0][1], mats[1][1], fmt, packed.group, h, i, dtype, route="torch")
        for g, ref in zip(got, want, strict=True):
            assert torch.equal(g, ref), dtype


# --- biases and gpt-oss's clamped SwiGLU -----------------------------------------------------------------------------

GPT_OSS_ACT = "clamped_swiglu:1.702:7.0"


def random_biases(r, h, i, seed=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, i, generator=g), torch.randn(r, i, generator=g), torch.randn(r, h, generator=g)


def biased_reference(x, rows, w, gate, up, down, biases, act):
    """float64 y [T, H] = sum over live pairs of w * expert_ffn (the engine's reference for one biased expert)."""
    from cadenza.models.common import glu_fn
    from cadenza.moe.experts import expert_ffn

    _, i, h = gate.shape
    y = torch.zeros(x.shape[0], h, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(rows[t].tolist()):
            if e >= 0:
                b = [
                    torch.zeros(n).double() if v is None else v[e].double()
                    for v, n in zip(biases, (i, i, h), strict=True)
                ]
                ws = (gate[e].double(), up[e].double(), down[e].double(), *b)
                y[t] += w[t, j].double() * expert_ffn(x[t : t + 1].double(), ws, glu_fn(act))[0]
    return y


def biased_layer(fmt, r, h, i):
    """(gate_up, down, group, (gate, up, down) as the layer holds them) of an mxfp4 or int8 layer."""
    packed = block_layer(fmt, r, h, i) if fmt == "mxfp4" else pack_layer(*experts(r, h, i), fmt, 32)
    return packed.gate_up, packed.down, packed.group, dequantize(packed)


BIAS_CASES = [  # (fmt, H, I, T, k, route): I padded (Ip 256), the clamps bite (x * 40)
    ("mxfp4", 256, 160, 1, 3, "triton"),
    ("mxfp4", 256, 160, 4, 2, "triton"),
    ("mxfp4", 256, 160, 3, 2, "torch"),
    ("int8", 200, 136, 2, 2, "triton"),
    ("int8", 200, 136, 4, 2, "torch"),
]


@pytest.mark.parametrize("fmt, h, i, t, k, route", BIAS_CASES)
def test_decode_biases_and_clamped_swiglu(fmt, h, i, t, k, route):
    """Tiled experts with biases after gate, up and down and the clamped SwiGLU equal expert_ffn on the weights the
    layer holds; pairs with row -1 add nothing (not even their down bias); one bias absent."""
    if route == "triton" and not KERNELS:
        pytest.skip(WHY)
    r = 5
    gu, dn, group, held = biased_layer(fmt, r, h, i)
    biases = random_biases(r, h, i)
    x, rows, w = routing(t, k, r, h)
    x = x * 40
    g0 = torch.einsum("rih,th->tri", held[0], x) + biases[0]
    assert (g0 > 7).any() and (g0 < -7).any()  # the clamps bite
    kw = dict(fmt=fmt, group=group, hidden=h, intermediate=i, blocks=BLOCK_BIG, route=route)
    mats = on(gu, dn)
    y = gpu_moe.moe_decode(*on(x, rows, w), mats, GPT_OSS_ACT, **kw, biases=tuple(on(*biases)))
    assert y.dtype == torch.float32 and y.shape == (t, h)
    assert rel(y, biased_reference(x, rows, w, *held, biases, GPT_OSS_ACT)) < FP32
    part = (None, biases[1], biases[2])  # no gate bias; silu with up and down biases
    y = gpu_moe.moe_decode(*on(x, rows, w), mats, "silu", **kw, biases=(None, *on(*part[1:])))
    assert rel(y, biased_reference(x, rows, w, *held, part, "silu")) < FP32


@pytest.mark.parametrize("route", ["triton", "torch"])
def test_decode_plain_biases_and_clamped_swiglu(route):
    if route == "triton" and not KERNELS:
        pytest.skip(WHY)
    h, i, r = 200, 136, 4
    gate, up, down = experts(r, h, i)
    biases = random_biases(r, h, i)
    x, rows, w = routing(3, 2, r, h)
    x = x * 40
    y = gpu_moe.moe_decode(
        *on(x, rows, w), on(gate, up, down), GPT_OSS_ACT, blocks=BIG, route=route, biases=tuple(on(*biases))
    )
    assert rel(y, biased_reference(x, rows, w, gate, up, down, biases, GPT_OSS_ACT)) < FP32


@needs_kernels
def test_decode_biases_bf16_x_and_biases():
    """bf16 x and bf16 biases (the model's dtype): kernel against the fallback and the reference."""
    h, i, r = 256, 160, 3
    gu, dn, group, held = biased_layer("mxfp4", r, h, i)
    biases = tuple(b.bfloat16() for b in random_biases(r, h, i))
    x, rows, w = routing(2, 2, r, h)
    x = (x * 40).bfloat16()
    kw = dict(fmt="mxfp4", group=group, hidden=h, intermediate=i, biases=tuple(on(*biases)))
    y = gpu_moe.moe_decode(*on(x, rows, w), on(gu, dn), GPT_OSS_ACT, **kw, blocks=BLOCK_BIG)
    fb = gpu_moe.moe_decode(*on(x, rows, w), on(gu, dn), GPT_OSS_ACT, **kw, route="torch")
    assert y.dtype == torch.bfloat16
    assert rel(y, biased_reference(x, rows, w, *held, biases, GPT_OSS_ACT)) < BF16
    assert rel(y, fb) < BF16


def test_decode_rejects_bad_biases():
    h, i = 200, 136
    packed = pack_layer(*experts(2, h, i), "int8", 0)
    x, rows, w = routing(1, 2, 2, h)
    kw = dict(fmt="int8", hidden=h, intermediate=i, route="torch")
    gb, ub, db = random_biases(2, h, i)
    with pytest.raises(ValueError, match="down_bias must be"):
        gpu_moe.moe_decode(x, rows, w, (packed.gate_up, packed.down), "silu", **kw, biases=(gb, ub, gb))
    with pytest.raises(ValueError, match="biases are"):
        gpu_moe.moe_decode(x, rows, w, (packed.gate_up, packed.down), "silu", **kw, biases=(gb, ub))


@pytest.mark.parametrize("fmt", ["mxfp4", "int8"])
def test_expert_forward_biases_and_clamped_swiglu(fmt):
    h, i, n = (256, 160, 5) if fmt == "mxfp4" else (200, 136, 5)
    gu, dn, group, held = biased_layer(fmt, 2, h, i)
    biases = random_biases(2, h, i)
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(3)) * 40
    one = tuple(b[1] for b in biases)
    y = gpu_moe.expert_forward(x.to(DEVICE), *on(gu[1], dn[1]), fmt, group, h, i, GPT_OSS_ACT, biases=tuple(on(*one)))
    assert y.dtype == torch.float32 and y.shape == (n, h)
    ref = biased_reference(x, torch.ones(n, 1, dtype=torch.long), torch.ones(n, 1), *held, biases, GPT_OSS_ACT)
    assert rel(y, ref) < FP32


def test_expert_layout_biased_tiled_experts():
    """ExpertLayout.decode with 5-tensor stacks and run with 5-tensor experts (the package's own gpu_moe: the
    fallback on a CPU) equal the reference; packed experts with the clamped unit are kernel math."""
    from cadenza.moe.experts import expert_order
    from cadenza.moe.gpu_side import ExpertLayout

    h, i, r = 256, 160, 4
    gu, dn, group, held = biased_layer("mxfp4", r, h, i)
    biases = random_biases(r, h, i)
    layout = ExpertLayout("mxfp4", group, h, i, GPT_OSS_ACT)
    x, rows, w = routing(3, 2, r, h, skip=False)
    x = x * 40
    ref = biased_reference(x, rows, w, *held, biases, GPT_OSS_ACT)
    assert rel(layout.decode(x, rows, w, [gu, dn, *biases]), ref) < FP32
    y = torch.zeros(3, h)
    counts = torch.bincount(rows.reshape(-1), minlength=r).tolist()
    chosen = [e for e in range(r) if counts[e]]
    weights_of = lambda e: (gu[e], dn[e], *(b[e] for b in biases))  # noqa: E731
    layout.run(x, 2, w, expert_order(rows), counts, chosen, weights_of, y)
    assert rel(y, ref) < FP32
    y_plain = layout.decode(x, rows, w, [gu, dn])  # no biases: the unbiased expert
    assert rel(y_plain, biased_reference(x, rows, w, *held, (None, None, None), GPT_OSS_ACT)) < FP32


@pytest.mark.gpu
def test_gpu_gpt_oss_biased_full_size():
    """gpt-oss's shapes (H = I = 2880, mxfp4) with biases and the clamped unit: the kernels equal the fallback."""
    dev = torch.device("cuda")
    h, i, r = 2880, 2880, 4
    packed = block_layer("mxfp4", r, h, i)
    mats = (packed.gate_up.to(dev), packed.down.to(dev))
    for dtype in (torch.float32, torch.bfloat16):
        biases = tuple(b.to(dev, dtype) for b in random_biases(r, h, i))
        kw = dict(fmt="mxfp4", group=packed.group, hidden=h, intermediate=i, biases=biases)
        for t, k in ((1, 4), (4, 4)):
            x, rows, w = (v.to(dev) for v in routing(t, k, r, h))
            x = (x * 40).to(dtype)
            y = gpu_moe.moe_decode(x, rows, w, mats, GPT_OSS_ACT, **kw)
            fb = gpu_moe.moe_decode(x, rows, w, mats, GPT_OSS_ACT, **kw, route="torch")
            assert rel(y, fb) < (FP32 if dtype == torch.float32 else BF16), (dtype, t)
