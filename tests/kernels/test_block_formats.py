"""Block formats (cadenza.kernels.blocks): GGUF's blocks moved into tiles read back as gguf-py dequantizes them,
bit for bit; sizes per weight as the table in blocks.py says."""

import numpy as np
import pytest
import torch

from cadenza.kernels import blocks, layout
from tests.kernels.block_data import random_blocks, reference

pytest.importorskip("gguf")

SHAPES = [(256, 512), (384, 768), (100, 256)]  # hidden, intermediate (100: rows padded past the matrix)


def _layer(gu_type: str, dn_type: str, h: int, i: int, experts: int = 2, seed: int = 0):
    fmt = blocks.BY_GGUF[gu_type] + ("" if gu_type == dn_type else "+" + blocks.BY_GGUF[dn_type])
    out = layout.empty_packed(fmt, None, experts, h, i)
    want = []
    for e in range(experts):
        raws = [
            random_blocks(gu_type, i, h, seed + 3 * e),
            random_blocks(gu_type, i, h, seed + 3 * e + 1),
            random_blocks(dn_type, h, i, seed + 3 * e + 2),
        ]
        types = (gu_type, gu_type, dn_type)
        cols = (h, h, i)
        mats = [blocks.from_gguf(t, r, c) for t, r, c in zip(types, raws, cols, strict=True)]
        layout.write_block_expert(out, e, *mats)
        want.append([reference(t, r) for t, r in zip(types, raws, strict=True)])
    return out, want


@pytest.mark.parametrize(
    "gu_type,dn_type", [("Q4_0", "Q4_0"), ("Q4_K", "Q6_K"), ("MXFP4", "MXFP4"), ("Q6_K", "Q4_K"), ("Q8_0", "Q8_0")]
)
@pytest.mark.parametrize("h,i", [(256, 512), (512, 256)])
def test_tiles_read_back_as_gguf_dequantizes(gu_type, dn_type, h, i):
    packed, want = _layer(gu_type, dn_type, h, i)
    gate, up, down = layout.dequantize(packed)
    for e, (g, u, d) in enumerate(want):
        assert torch.equal(gate[e], g) and torch.equal(up[e], u) and torch.equal(down[e], d)


@pytest.mark.parametrize("types, h, i", [(("Q8_0", "Q8_0"), 160, 96), (("Q4_K", "Q6_K"), 256, 512)])
def test_a_run_of_experts_writes_as_each_alone(types, h, i):
    """write_block_expert on several experts' rows at once (the GGUF loader's runs) equals one expert at a time,
    padded rows and columns included (160 x 96 pad to 256 x 128)."""
    gu, dn = types
    one, _ = _layer(gu, dn, h, i, experts=3, seed=11)
    raws = [[random_blocks(t, r, c, 11 + 3 * e + m) for m, (t, r, c) in enumerate(((gu, i, h), (gu, i, h), (dn, h, i)))]
            for e in range(3)]  # fmt: skip
    run = layout.empty_packed(one.fmt, None, 3, h, i)
    mats = [
        blocks.from_gguf(t, np.concatenate([r[m] for r in raws]), c)
        for m, (t, c) in enumerate(((gu, h), (gu, h), (dn, i)))
    ]
    layout.write_block_expert(run, 0, *mats)
    assert torch.equal(run.gate_up, one.gate_up) and torch.equal(run.down, one.down)


def test_padding_rows_and_columns_read_as_zero():
    # MXFP4 rows of 2880 columns (gpt-oss) pad to 2944; rows 90 pad to 128
    raw_g, raw_u = random_blocks("MXFP4", 90, 2880, 1), random_blocks("MXFP4", 90, 2880, 2)
    raw_d = random_blocks("MXFP4", 2880, 96, 3)
    out = layout.empty_packed("mxfp4", None, 1, 2880, 90 + 6)
    layout.write_block_expert(
        out,
        0,
        blocks.from_gguf("MXFP4", raw_g, 2880),
        blocks.from_gguf("MXFP4", raw_u, 2880),
        blocks.from_gguf("MXFP4", raw_d, 96),
    )
    gate, up, down = layout.dequantize(out)
    assert torch.equal(gate[0][:90], reference("MXFP4", raw_g)) and torch.equal(down[0], reference("MXFP4", raw_d))
    assert not gate[0][90:].any()
    full = layout.dequantize_tiles(out.gate_up[0], "mxfp4", 32, out.hidden_pad)
    assert not full[:, 2880:].any()  # padded columns


def test_hf_mxfp4_equals_the_ggml_blocks():
    from cadenza.models.mxfp4 import dequantize_mxfp4

    g = torch.randint(0, 256, (64, 8, 16), dtype=torch.uint8)
    s = torch.randint(115, 125, (64, 8), dtype=torch.uint8)
    rows, fields = blocks.from_hf_mxfp4(g, s)
    header = torch.zeros(16, layout._header_bytes("mxfp4", 32, 256), dtype=torch.uint8)
    header[:, : 4 * 8] = fields[0].reshape(16, 32)
    got = blocks.dequantize_rows("mxfp4", header, rows, 256)
    assert torch.equal(got, dequantize_mxfp4(g, s))


@pytest.mark.parametrize(
    "fmt,bytes_per_weight",
    [
        ("q4_0", 0.5625),
        ("q4_k", 0.578125),
        ("mxfp4", 0.53125),
        ("q6_k", 210 / 256),  # 6-bit codes: as the GGUF file
        ("q8_0", 1.0625),
        ("q5_k", 180 / 256),  # 5-bit codes (160 / 256) and q4_k's header (20 / 256)
    ],
)
def test_bytes_per_weight(fmt, bytes_per_weight):
    h, i = 4096, 14336  # Mixtral: headers pad to 64 bytes per tile, a small share
    got = layout.expert_nbytes(fmt, None, h, i) / (3 * h * i)
    assert got == pytest.approx(bytes_per_weight, rel=2e-3)


def test_q6_k_tiles_take_six_bits_a_code():
    """q6_k keeps 6 bits a code: 96 code bytes per 128 columns of a row, plus the header (d f16 per 256, sc i8 per
    16: 18 bytes per 256) padded to 64 bytes a tile; 210 / 256 bytes a weight where the header needs no padding."""
    for k in (256, 768, 4096, 14336):
        header = -(-4 * (k // 256 * 2 + k // 16) // 64) * 64
        assert layout._tile_bytes("q6_k", 16, k) == header + 4 * 96 * k // 128
    assert layout._tile_bytes("q6_k", 16, 4096) / (4 * 4096) == 210 / 256
    assert blocks.code_row_bytes("q6_k", 4096) == 3072


def test_q5_k_tiles_take_five_bits_a_code():
    """q5_k keeps 5 bits a code: 80 code bytes per 128 columns of a row (64 of nibbles, 16 of 5th bits), plus the
    header (d, dmin f16 per 256, sc, m u8 per 32: 20 bytes per 256) padded to 64 bytes a tile."""
    for k in (256, 768, 4096, 14336):
        header = -(-4 * (k // 256 * 4 + k // 16) // 64) * 64
        assert layout._tile_bytes("q5_k", 32, k) == header + 4 * 80 * k // 128
    assert layout._tile_bytes("q5_k", 32, 4096) / (4 * 4096) == 180 / 256
    assert blocks.code_row_bytes("q5_k", 4096) == 2560
    assert blocks.chunk_pieces("q5_k") == (64, 16)


def test_unknown_gguf_type_is_refused():
    with pytest.raises(ValueError, match="no block format keeps GGUF Q3_K"):
        blocks.from_gguf("Q3_K", np.zeros((1, 110), np.uint8), 256)


# --- the CPU kernel on block-format layers (AVX-512 machines; the torch routes everywhere) -------------------------

from cadenza.kernels import cpu_moe  # noqa: E402
from tests.kernels.test_cpu_kernel import EXACT, FALLBACK, MM, needs_kernel, rel, routing  # noqa: E402
from tests.kernels.test_cpu_kernel import reference as layer_reference  # noqa: E402

LAYERS = [
    ("Q4_0", "Q4_0"), ("Q4_K", "Q6_K"), ("MXFP4", "MXFP4"), ("Q6_K", "Q6_K"), ("Q6_K", "Q4_K"), ("Q8_0", "Q4_K"),
    ("Q5_K", "Q6_K"), ("Q4_K", "Q5_K"),
]  # fmt: skip


def layers_of(pairs, seed: int) -> dict:
    """(gate/up type, down type) -> (packed layer of 6 experts, 256 x 512, its dequantized matrices)."""
    out = {}
    for gu, dn in pairs:
        packed, _ = _layer(gu, dn, 256, 512, experts=6, seed=seed)
        out[gu, dn] = packed, layout.dequantize(packed)
    return out


@pytest.fixture(scope="module")
def block_layers():
    return layers_of(LAYERS, seed=7)


@needs_kernel
@pytest.mark.parametrize("types", LAYERS)
def test_cpu_kernel_equals_reference(block_layers, types):
    packed, (g, u, d) = block_layers[types]
    for t in (1, 2, 5, 64):
        for k in (1, 2):
            x, ids, w = routing(t, k, e=6, h=256)
            for experts in (None, [0, 2, 5]):
                ref = layer_reference(g, u, d, x, ids, w, experts)
                for xi in (x, x.bfloat16()):
                    want = ref if xi is x else layer_reference(g, u, d, xi, ids, w, experts)
                    for dot in (False, True) if cpu_moe.has_bf16_dot() else (False,):  # fp32 lanes, vdpbf16ps
                        y = cpu_moe.moe_forward(  # (the exact products: int8 activations, test_cpu_int8.py)
                            packed, xi, ids, w, experts, "silu", 2, route="kernel", bf16_dot=dot, activations="exact"
                        )
                        assert rel(y, want) < EXACT, (types, t, k, experts, xi.dtype, dot, rel(y, want))


@pytest.mark.parametrize("types", LAYERS)
def test_cpu_fallback_and_mm_routes(block_layers, types):
    packed, (g, u, d) = block_layers[types]
    for t, k in ((1, 2), (40, 2)):
        x, ids, w = routing(t, k, e=6, h=256)
        ref = layer_reference(g, u, d, x, ids, w)
        assert rel(cpu_moe.moe_forward(packed, x, ids, w, route="torch"), ref) < FALLBACK
        assert rel(cpu_moe.moe_forward(packed, x, ids, w, route="mm"), ref) < MM


# --- gpt-oss's experts: biases and the clamped SwiGLU, on every route -----------------------------------------------

GPT_OSS_ACT = "clamped_swiglu:1.702:7.0"


def _biased_reference(g, u, d, biases, x, ids, w, act):
    from cadenza.models.common import glu_fn
    from cadenza.moe.experts import expert_order, run_experts

    y = torch.zeros(x.shape[0], g.shape[2])
    counts = torch.bincount(ids.reshape(-1), minlength=g.shape[0]).tolist()
    chosen = [e for e in range(g.shape[0]) if counts[e]]
    weights = lambda e: (g[e], u[e], d[e], *(b[e] for b in biases))  # noqa: E731
    run_experts(x.float(), ids.shape[1], w, expert_order(ids), counts, chosen, weights, glu_fn(act), y)
    return y


@pytest.mark.parametrize("types", [("MXFP4", "MXFP4"), ("Q8_0", "Q4_K")])
def test_biases_and_clamped_swiglu(block_layers, types):
    """Biases after gate, up and down and gpt-oss's clamped unit (a large scale, so the clamps bite): the kernel (both
    multiply paths), the mm and torch routes, and a job, against the engine's own expert_ffn."""
    packed, (g, u, d) = block_layers[types]
    gen = torch.Generator().manual_seed(5)
    e, i, h = g.shape
    biases = (torch.randn(e, i, generator=gen), torch.randn(e, i, generator=gen), torch.randn(e, h, generator=gen))
    for t in (1, 3, 40):
        x, ids, w = routing(t, 2, e=e, h=h)
        x = x * 40  # gate / up outputs past the clamp of 7
        ref = _biased_reference(g, u, d, biases, x, ids, w, GPT_OSS_ACT)
        fallback = cpu_moe.moe_forward(packed, x, ids, w, act=GPT_OSS_ACT, route="torch", biases=biases)
        assert rel(fallback, ref) < FALLBACK
        mm = cpu_moe.moe_forward(packed, x, ids, w, act=GPT_OSS_ACT, route="mm", biases=biases)
        assert rel(mm, ref) < MM
        if cpu_moe.available():
            for dot in (False, True) if cpu_moe.has_bf16_dot() else (False,):
                y = cpu_moe.moe_forward(
                    packed, x, ids, w, act=GPT_OSS_ACT, route="kernel", threads=2, bf16_dot=dot, biases=biases
                )
                assert rel(y, ref) < EXACT, (t, dot, rel(y, ref))
    if cpu_moe.available():  # the stream's job form: biases held by the job
        x, ids, w = routing(2, 2, e=e, h=h)
        x = x * 40
        y = torch.zeros(2, h)
        mask = torch.ones(e, dtype=torch.uint8)
        stats = torch.zeros(8 + e + 2, dtype=torch.int64)
        ptr = cpu_moe.job_new(packed, x, ids, w.float(), mask, GPT_OSS_ACT, 2, y, stats, 1, biases=biases)
        try:
            cpu_moe.job_run(ptr)
        finally:
            cpu_moe.job_free(ptr)
        assert rel(y, _biased_reference(g, u, d, biases, x, ids, w, GPT_OSS_ACT)) < EXACT
