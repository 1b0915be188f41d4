"""The CPU kernel's int8-activation path for K-quant tiles (cadenza/kernels/cpu_moe_q8.h): exact against a reference
that quantizes the activations the same way (x and h to int8 per 256 columns, the weights gguf-py's dequantized
blocks); its error against the exact path is the activations' 8 bits, bounded and printed."""

import pytest
import torch

from cadenza.kernels import cpu_moe, layout
from tests.kernels.test_block_formats import layers_of
from tests.kernels.test_cpu_kernel import EXACT, needs_kernel, rel, routing
from tests.kernels.test_cpu_kernel import reference as exact_reference

pytest.importorskip("gguf")
needs_int8 = pytest.mark.skipif(not cpu_moe.has_int8_dot(), reason="the CPU lacks AVX512-VNNI / AVX512_VBMI")


def q8(x: torch.Tensor) -> torch.Tensor:
    """The kernel's staging (cpu_moe_q8.h, q8_quantize) of fp32 rows [n, K], K a multiple of 256, dequantized:
    per 256 columns q = round(x * (127 / max |x|)) to nearest even, value q * (max |x| / 127); a block whose max is
    below 1e-30 is zeros."""
    n, k = x.shape
    blocks = x.float().reshape(n, k // 256, 256)
    amax = blocks.abs().amax(-1, keepdim=True)
    live = amax >= 1e-30
    inv = torch.where(live, torch.tensor(127.0) / amax, torch.zeros(()))
    d = torch.where(live, amax / 127.0, torch.zeros(()))
    return (torch.round(blocks * inv).clamp(-127, 127) * d).reshape(n, k)


def q8_reference(gate, up, down, x, ids, w, experts=None, q8_gate_up=True, q8_down=True):
    """fp64 sums of the dequantized weights against int8-staged activations: x quantized for gate/up, h (fp32,
    act(gate x) * up x) quantized for down, where those matrices take int8 activations."""
    t, k = ids.shape
    h_cols = gate.shape[2]
    pad = lambda v, n: torch.nn.functional.pad(v, (0, n - v.shape[-1]))  # noqa: E731
    xs = q8(pad(x.float(), -(-h_cols // 256) * 256))[:, :h_cols] if q8_gate_up else x.float()
    y = torch.zeros(t, down.shape[1], dtype=torch.float64)
    for i in range(t):
        for s in range(k):
            e = int(ids[i, s])
            if experts is not None and e not in experts:
                continue
            g = (gate[e].double() @ xs[i].double()).float()
            u = (up[e].double() @ xs[i].double()).float()
            h = torch.nn.functional.silu(g) * u
            if q8_down:
                h = q8(pad(h[None], -(-h.shape[0] // 256) * 256))[0, : h.shape[0]]
            y[i] += float(w[i, s]) * (down[e].double() @ h.double())
    return y.float()


# A staged h can differ from the reference's in an element that sits at a rounding boundary (its fp32 sums differ
# in the last bits), one step of its block: ~1e-4 of y. Far below the activations' own error (~1e-2), far above fp32's.
BOUND = 1e-3
LAYERS = [
    ("Q4_K", "Q6_K"), ("Q5_K", "Q6_K"), ("Q6_K", "Q4_K"), ("Q4_K", "Q5_K"), ("Q8_0", "Q4_K"), ("Q4_K", "Q4_0"),
    ("Q8_0", "Q8_0"), ("MXFP4", "Q8_0"),
]  # fmt: skip


@pytest.fixture(scope="module")
def block_layers():
    return layers_of(LAYERS, seed=11)


@needs_kernel
@needs_int8
@pytest.mark.parametrize("types", LAYERS)
def test_int8_activations_equal_their_reference(block_layers, types):
    packed, (g, u, d) = block_layers[types]
    gu_q8, dn_q8 = (fmt in ("Q4_K", "Q5_K", "Q6_K", "Q8_0") for fmt in types)
    worst = 0.0
    for t in (1, 2, 3, 5, 64):  # every micro-kernel token count, and token blocks
        for k in (1, 2):
            x, ids, w = routing(t, k, e=6, h=256)
            for experts in (None, [0, 2, 5]):
                for xi in (x, x.bfloat16()):
                    want = q8_reference(g, u, d, xi, ids, w, experts, gu_q8, dn_q8)
                    y = cpu_moe.moe_forward(packed, xi, ids, w, experts, "silu", 2, route="kernel", activations="int8")
                    assert rel(y, want) < BOUND, (types, t, k, experts, xi.dtype, rel(y, want))
                    worst = max(worst, rel(y, exact_reference(g, u, d, xi, ids, w, experts)))
    # the activations' 8 bits on random blocks (their scales and mins drawn at random: harsher than a model's)
    print(f"{types}: int8 activations vs exact, worst relative error {worst:.4f}")
    assert worst < 0.15


@needs_kernel
@needs_int8
def test_int8_job_equals_the_call(block_layers):
    packed, _ = block_layers["Q4_K", "Q6_K"]
    x, ids, w = routing(3, 2, e=6, h=256)
    want = cpu_moe.moe_forward(packed, x, ids, w, None, "silu", 2, route="kernel", activations="int8")
    y = torch.zeros(3, 256)
    mask = torch.ones(6, dtype=torch.uint8)
    stats = torch.zeros(8 + 6 + 2, dtype=torch.int64)
    ptr = cpu_moe.job_new(packed, x, ids, w, mask, "silu", 2, y, stats, 1, activations="int8")
    try:
        cpu_moe.job_run(ptr)
    finally:
        cpu_moe.job_free(ptr)
    assert torch.equal(y, want)


@needs_kernel
@needs_int8
def test_the_environment_chooses_the_default(block_layers, monkeypatch):
    packed, (g, u, d) = block_layers["Q4_K", "Q6_K"]
    x, ids, w = routing(2, 2, e=6, h=256)
    xb = x.bfloat16()
    exact, exact_b = exact_reference(g, u, d, x, ids, w), exact_reference(g, u, d, xb, ids, w)
    quant, quant_b = q8_reference(g, u, d, x, ids, w), q8_reference(g, u, d, xb, ids, w)
    monkeypatch.delenv(cpu_moe.ACTIVATIONS_ENV, raising=False)  # auto: int8 for bf16 activations, exact for fp32
    assert rel(cpu_moe.moe_forward(packed, x, ids, w, route="kernel"), exact) < EXACT
    assert rel(cpu_moe.moe_forward(packed, xb, ids, w, route="kernel"), quant_b) < BOUND
    monkeypatch.setenv(cpu_moe.ACTIVATIONS_ENV, "int8")
    assert rel(cpu_moe.moe_forward(packed, x, ids, w, route="kernel"), quant) < BOUND
    monkeypatch.setenv(cpu_moe.ACTIVATIONS_ENV, "exact")
    assert rel(cpu_moe.moe_forward(packed, xb, ids, w, route="kernel"), exact_b) < EXACT
    packed8 = cpu_moe.pack_layer(*(m.float() for m in (g, u, d)), "int8", group=32)  # auto: int8 tiles stay exact
    g8, u8, d8 = layout.dequantize(packed8)
    monkeypatch.delenv(cpu_moe.ACTIVATIONS_ENV)
    y8 = cpu_moe.moe_forward(packed8, xb, ids, w, route="kernel")
    assert rel(y8, exact_reference(g8, u8, d8, xb, ids, w)) < EXACT
    assert cpu_moe.activations_label(torch.bfloat16) == "int8 for K-quant tiles"
    assert cpu_moe.activations_label(torch.float32) == "exact"
    monkeypatch.setenv(cpu_moe.ACTIVATIONS_ENV, "int4")
    with pytest.raises(ValueError, match="CADENZA_CPU_ACTIVATIONS='int4': use auto, exact or int8"):
        cpu_moe.moe_forward(packed, x, ids, w, route="kernel")


def test_q8_staging_reference():
    """The reference's staging: zeros stay zeros, the block max maps to 127, values within half a step."""
    x = torch.randn(3, 512)
    x[1, :256] = 0.0
    v = q8(x)
    assert torch.equal(v[1, :256], torch.zeros(256))
    step = x.reshape(3, 2, 256).abs().amax(-1) / 127
    assert ((v - x).reshape(3, 2, 256).abs() <= step[..., None] / 2 + 1e-7).all()


@needs_kernel
@needs_int8
@pytest.mark.parametrize("group", [0, 32, 64, 128])
def test_int8_experts_take_int8_activations(group):
    """cadenza's own int8 experts (`--experts int8`, a scale per row or per group): the same reference."""
    from tests.kernels.test_cpu_kernel import weights

    gate, up, down = weights(h=256, i=512)  # (columns a multiple of 256: else the exact path runs, test below)
    packed = cpu_moe.pack_layer(gate, up, down, "int8", group=group)
    g, u, d = layout.dequantize(packed)
    e, h = gate.shape[0], gate.shape[2]
    for t in (1, 2, 5, 40):
        x, ids, w = routing(t, 2, e=e, h=h)
        y = cpu_moe.moe_forward(packed, x, ids, w, None, "silu", 2, route="kernel", activations="int8")
        assert rel(y, q8_reference(g, u, d, x, ids, w)) < BOUND, (group, t)
        assert rel(y, exact_reference(g, u, d, x, ids, w)) < 0.05


@needs_kernel
@needs_int8
def test_rows_not_a_multiple_of_256_stay_exact():
    """A matrix whose (padded) columns are not a multiple of 256 keeps the exact products, int8 asked or not."""
    from tests.kernels.test_cpu_kernel import weights

    gate, up, down = weights()  # H 96, I 80: padded to 128
    packed = cpu_moe.pack_layer(gate, up, down, "int8", group=32)
    g, u, d = layout.dequantize(packed)
    x, ids, w = routing(3, 2, e=gate.shape[0], h=gate.shape[2])
    y = cpu_moe.moe_forward(packed, x, ids, w, None, "silu", 2, route="kernel", activations="int8")
    assert rel(y, exact_reference(g, u, d, x, ids, w)) < EXACT
