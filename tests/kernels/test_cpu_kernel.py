"""The fused CPU MoE kernel (cadenza.kernels.cpu_moe) against the exact reference.

Reference: the engine's own `run_experts`, in fp32, on the weights the packed layer really holds (`dequantize`),
or, for the plain layout (`plain_layer`: the stacked bf16 tensors read in place), on those bf16 weights.
Bounds, relative Frobenius error of the layer output y [T, H]:
- kernel vs reference, every format and both layouts: 2e-5 (fp32 sums in another order; bf16 and int4 with
  AVX512_BF16 multiply each fp32 activation as two bf16 halves, 16 bits: measured ~6e-6);
- PyTorch fallback vs reference: 1e-6; "mm" route (bf16 weights and activations into torch.mm): 2e-2;
- quantization, int8 / int4 layer output vs the same layer with bf16 weights (mixtral-tiny shapes, measured
  1.2% / 16%): int8 < 2.5%, int4 (group 64) < 20%.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cadenza.kernels import cpu_moe
from cadenza.models.common import glu_fn
from cadenza.moe.experts import expert_order, run_experts

E, H, INTER = 8, 96, 80  # H, INTER: not multiples of the vector width or of the 128-column padding
EXACT, FALLBACK, MM = 2e-5, 1e-6, 2e-2

needs_kernel = pytest.mark.skipif(not cpu_moe.available(), reason="the CPU kernel does not build or run here")


def weights(e=E, h=H, i=INTER, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(e, i, h, generator=g) * h**-0.5 for _ in range(2))
    return gate, up, torch.randn(e, h, i, generator=g) * i**-0.5


def routing(t, k, e=E, seed=1, h=None):
    g = torch.Generator().manual_seed(seed + 100 * t + k)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k).long()
    x = torch.randn(t, h or (H if e == E else 256), generator=g)
    return x, ids, torch.rand(t, k, generator=g)


def reference(gate, up, down, x, ids, w, experts=None, act="silu"):
    """fp32 run_experts over the given experts (None: all)."""
    y = torch.zeros(x.shape[0], gate.shape[2])
    counts = torch.bincount(ids.reshape(-1), minlength=gate.shape[0]).tolist()
    chosen = [e for e in (range(gate.shape[0]) if experts is None else experts) if counts[e]]
    fn = glu_fn(act)
    run_experts(
        x.float(), ids.shape[1], w, expert_order(ids), counts, chosen, lambda e: (gate[e], up[e], down[e]), fn, y
    )
    return y


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def layers():
    gate, up, down = weights()
    out = {}
    for fmt, group in (
        ("bf16", None),
        ("int8", 0),
        ("int8", 32),
        ("int8", 128),
        ("int4", 32),
        ("int4", 64),
        ("int4", 128),
    ):
        packed = cpu_moe.pack_layer(gate, up, down, fmt, group)
        out[fmt, packed.group] = packed, cpu_moe.dequantize(packed)
    return out


def test_layout_holds_the_weights(layers):
    gate, up, down = weights()
    _, (g, u, d) = layers["bf16", 0]
    for a, b in ((g, gate), (u, up), (d, down)):
        assert torch.equal(a, b.bfloat16().float())
    for key in (("int8", 0), ("int8", 32), ("int4", 32), ("int4", 128)):
        packed, deq = layers[key]
        for a, b in zip(deq, (gate, up, down), strict=True):
            assert a.shape == b.shape
            levels = 127 if key[0] == "int8" else 7.5
            step = b.abs().max() / levels  # a bound on the scale of any group
            assert (a - b).abs().max() <= step / 2 + 1e-6


@needs_kernel
@pytest.mark.parametrize("key", [("bf16", 0), ("int8", 0), ("int8", 32), ("int4", 64), ("int4", 32), ("int4", 128)])
def test_kernel_equals_reference(layers, key):
    packed, (g, u, d) = layers[key]
    for t in (1, 2, 7, 64, 300):
        for k in (1, 2, 6):
            x, ids, w = routing(t, k)
            for experts in (None, [0, 2, 3, 5]):
                ref = reference(g, u, d, x, ids, w, experts)
                for threads in (1, 2):
                    y = cpu_moe.moe_forward(packed, x, ids, w, experts, "silu", threads, route="kernel")
                    assert y.dtype == torch.float32 and y.shape == (t, H)
                    assert rel(y, ref) < EXACT, (key, t, k, experts, threads, rel(y, ref))


@needs_kernel
@pytest.mark.parametrize("key", [("bf16", 0), ("int8", 32), ("int4", 64)])
def test_kernel_bits_do_not_depend_on_threads(layers, key):
    """The threads take chunks of units from a counter (a preempted thread holds up one chunk): whichever thread
    computes an output, it computes it in one order, so any thread count gives the same bits."""
    packed, _ = layers[key]
    for t, k in ((1, 2), (7, 2), (64, 6)):
        x, ids, w = routing(t, k)
        one = cpu_moe.moe_forward(packed, x, ids, w, None, "silu", 1, route="kernel")
        for threads in (2, 3, 5):
            y = cpu_moe.moe_forward(packed, x, ids, w, None, "silu", threads, route="kernel")
            assert torch.equal(y, one), (key, t, k, threads)


@needs_kernel
@pytest.mark.parametrize("key", [("bf16", 0), ("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_kernel_bf16_inputs_and_int4_paths(layers, key):
    """x in bf16 (the engine's dtype: int4 then skips the low half), and int4 on fp32 lanes (CPUs without
    AVX512_BF16) where this CPU has it."""
    packed, (g, u, d) = layers[key]
    for t in (1, 7, 64):
        x, ids, w = routing(t, 2)
        xb = x.bfloat16()
        ref = reference(g, u, d, xb, ids, w)
        for bf16_dot in (False, True) if cpu_moe.has_bf16_dot() else (False,):
            for xi in (xb, x):
                y = cpu_moe.moe_forward(packed, xi, ids, w, route="kernel", threads=2, bf16_dot=bf16_dot)
                want = ref if xi is xb else reference(g, u, d, x, ids, w)
                assert rel(y, want) < EXACT, (key, t, bf16_dot, xi.dtype)


@needs_kernel
@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu", "relu"])
def test_kernel_activations(layers, act):
    packed, (g, u, d) = layers["int8", 0]
    x, ids, w = routing(7, 2)
    y = cpu_moe.moe_forward(packed, x, ids, w, act=act, route="kernel")
    assert rel(y, reference(g, u, d, x, ids, w, act=act)) < EXACT


@pytest.mark.parametrize("key", [("bf16", 0), ("int8", 0), ("int4", 64)])
def test_fallback_and_mm_routes(layers, key):
    packed, (g, u, d) = layers[key]
    for t, k, experts in ((1, 2, None), (7, 6, [1, 4, 7]), (300, 2, None)):
        x, ids, w = routing(t, k)
        ref = reference(g, u, d, x, ids, w, experts)
        assert rel(cpu_moe.moe_forward(packed, x, ids, w, experts, route="torch"), ref) < FALLBACK
        assert rel(cpu_moe.moe_forward(packed, x, ids, w, experts, route="mm"), ref) < MM


@needs_kernel
def test_auto_route_splits_by_token_count(layers):
    """Experts with many tokens go to torch.mm, the rest to the kernel, in one call."""
    packed, (g, u, d) = layers["int4", 64]
    x, ids, w = routing(64, 2)
    counts = torch.bincount(ids.view(-1), minlength=E)
    limit = int(counts.float().median())
    assert counts.min() < limit <= counts.max()  # a real split
    y = cpu_moe.moe_forward(packed, x, ids, w, route="auto", mm_min_tokens=limit)
    assert rel(y, reference(g, u, d, x, ids, w)) < MM


def test_quantization_error_bounds():
    """int8 / int4 layer outputs vs the same layer with bf16 weights (the bounds the README quotes)."""
    gate, up, down = (w.bfloat16().float() for w in weights(e=4, h=256, i=512, seed=3))
    x, ids, w = routing(64, 2, e=4)
    ref = reference(gate, up, down, x, ids, w)
    route = "kernel" if cpu_moe.available() else "torch"
    errors = {}
    for fmt, bound in (("int8", 0.025), ("int4", 0.20)):
        packed = cpu_moe.pack_layer(gate, up, down, fmt)
        errors[fmt] = rel(cpu_moe.moe_forward(packed, x, ids, w, route=route), ref)
        assert errors[fmt] < bound, (fmt, errors[fmt])
    assert errors["int8"] < errors["int4"] / 5
    print(f"layer output error vs bf16 weights: {errors}")


@needs_kernel
def test_edge_cases(layers):
    packed, _ = layers["int8", 0]
    x, ids, w = routing(5, 2)
    missing = [e for e in range(E) if e not in ids.view(-1).tolist()]
    assert torch.count_nonzero(cpu_moe.moe_forward(packed, x, ids, w, missing, route="kernel")) == 0
    assert cpu_moe.moe_forward(packed, x, ids, w, [], route="kernel").abs().sum() == 0
    assert cpu_moe.moe_forward(packed, x[:0], ids[:0], w[:0], route="kernel").shape == (0, H)
    with pytest.raises(ValueError, match="features"):
        cpu_moe.moe_forward(packed, torch.zeros(1, H + 1), ids[:1], w[:1])
    with pytest.raises(ValueError, match="route"):
        cpu_moe.moe_forward(packed, x, ids, w, route="gpu")


def test_pack_inputs_and_errors():
    gate, up, down = weights(e=2)
    a = cpu_moe.pack_layer(gate, up, down, "int4")
    b = cpu_moe.pack_layer(list(gate), list(up), list(down.bfloat16()), "int4")  # per-expert tensors, any dtype
    assert torch.equal(a.gate_up, b.gate_up)
    assert a.expert_bytes == a.nbytes // 2 and a.group == 64
    with pytest.raises(ValueError, match="format"):
        cpu_moe.pack_layer(gate, up, down, "int3")
    with pytest.raises(ValueError, match="group"):
        cpu_moe.pack_layer(gate, up, down, "int4", 16)
    with pytest.raises(ValueError, match="shapes"):
        cpu_moe.pack_layer(gate, up, down.transpose(1, 2), "bf16")


def test_unavailable_kernel_falls_back_with_one_notice():
    code = (
        "import torch\n"
        "from cadenza.kernels import cpu_moe\n"
        "assert not cpu_moe.available() and not cpu_moe.available()\n"
        "p = cpu_moe.pack_layer(torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 16, 8), 'int8')\n"
        "y = cpu_moe.moe_forward(p, torch.randn(3, 16), torch.tensor([[0], [1], [0]]), torch.ones(3, 1))\n"
        "assert y.shape == (3, 16)\n"
    )
    env = {**os.environ, "CADENZA_CPU_KERNEL": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    notices = [line for line in out.stderr.splitlines() if "cadenza:" in line]
    assert len(notices) == 1 and "PyTorch" in notices[0], out.stderr


# --- the plain layout: a bf16 model's stacked tensors, read in place ------------------------------------------------

PLAIN_SHAPES = {"tails": (E, H, INTER), "pow2": (E, 256, 512), "odd": (3, 97, 33)}  # odd: I odd, H % 4 != 0


@pytest.fixture(scope="module")
def plain_layers():
    out = {}
    for name, (e, h, i) in PLAIN_SHAPES.items():
        gate, up, down = (w.bfloat16() for w in weights(e, h, i, seed=5))
        out[name] = cpu_moe.plain_layer(gate, up, down), (gate.float(), up.float(), down.float())
    return out


@needs_kernel
@pytest.mark.parametrize("shape", ["tails", "pow2", "odd"])
def test_plain_equals_reference(plain_layers, shape):
    layer, (g, u, d) = plain_layers[shape]
    e, h, _ = PLAIN_SHAPES[shape]
    dots = (False, True) if cpu_moe.has_bf16_dot() else (False,)
    for t in (1, 2, 7, 64, 300):
        for k in (1, 2, 6) if e >= 6 else (1, 2, 3):
            x, ids, w = routing(t, k, e=e, h=h)
            for experts in (None, [0, 2, 3, 5] if e > 5 else [0, 2]):
                for xi in (x, x.bfloat16()):
                    ref = reference(g, u, d, xi, ids, w, experts)
                    for threads in (1, 2):
                        for bf16_dot in dots:
                            y = cpu_moe.moe_forward(
                                layer, xi, ids, w, experts, "silu", threads, route="kernel", bf16_dot=bf16_dot
                            )
                            assert y.dtype == torch.float32 and y.shape == (t, h)
                            err = rel(y, ref)
                            assert err < EXACT, (shape, t, k, experts, xi.dtype, threads, bf16_dot, err)


@needs_kernel
def test_plain_matches_tiled_and_reads_in_place(plain_layers):
    """The same bf16 weights give the same y in both layouts; the plain layer holds the caller's tensors (no copy),
    so the kernel sees a change made to them afterwards."""
    layer, _ = plain_layers["tails"]
    packed = cpu_moe.pack_layer(layer.gate, layer.up, layer.down, "bf16")
    x, ids, w = routing(7, 2)
    y_plain = cpu_moe.moe_forward(layer, x, ids, w, route="kernel")
    assert rel(y_plain, cpu_moe.moe_forward(packed, x, ids, w, route="kernel")) < 1e-6
    gate, up, down = (m.clone() for m in (layer.gate, layer.up, layer.down))
    mine = cpu_moe.PlainExperts.of(gate, up, down)
    assert mine.gate is gate and mine.up is up and mine.down is down
    assert mine.expert_bytes == 3 * H * INTER * 2 == mine.nbytes // E
    assert (mine.fmt, mine.num_experts, mine.hidden, mine.intermediate) == ("bf16", E, H, INTER)
    down.mul_(2)  # in place: the kernel reads it
    assert rel(cpu_moe.moe_forward(mine, x, ids, w, route="kernel"), 2 * y_plain) < 1e-6


@needs_kernel
def test_plain_activations_and_edges(plain_layers):
    layer, (g, u, d) = plain_layers["tails"]
    x, ids, w = routing(7, 2)
    for act in ("gelu_pytorch_tanh", "gelu", "relu"):
        y = cpu_moe.moe_forward(layer, x, ids, w, act=act, route="kernel")
        assert rel(y, reference(g, u, d, x, ids, w, act=act)) < EXACT
    missing = [e for e in range(E) if e not in ids.view(-1).tolist()]
    assert torch.count_nonzero(cpu_moe.moe_forward(layer, x, ids, w, missing, route="kernel")) == 0
    assert cpu_moe.moe_forward(layer, x, ids, w, [], route="kernel").abs().sum() == 0
    assert cpu_moe.moe_forward(layer, x[:0], ids[:0], w[:0], route="kernel").shape == (0, H)
    with pytest.raises(ValueError, match="features"):
        cpu_moe.moe_forward(layer, torch.zeros(1, H + 1), ids[:1], w[:1])
    with pytest.raises(ValueError, match="out of range"):
        cpu_moe.moe_forward(layer, x, ids, w, [E], route="kernel")


@pytest.mark.parametrize("shape", ["tails", "odd"])
def test_plain_fallback_mm_and_auto_routes(plain_layers, shape):
    layer, (g, u, d) = plain_layers[shape]
    e, h, _ = PLAIN_SHAPES[shape]
    for t, k, experts in ((1, 2, None), (7, 3, [1, 2]), (300, 2, None)):
        x, ids, w = routing(t, k, e=e, h=h)
        ref = reference(g, u, d, x, ids, w, experts)
        assert rel(cpu_moe.moe_forward(layer, x, ids, w, experts, route="torch"), ref) < FALLBACK
        assert rel(cpu_moe.moe_forward(layer, x, ids, w, experts, route="mm"), ref) < MM
    if cpu_moe.available():
        x, ids, w = routing(64, 2, e=e, h=h)
        counts = torch.bincount(ids.view(-1), minlength=e)
        limit = int(counts.float().median())
        y = cpu_moe.moe_forward(layer, x, ids, w, route="auto", mm_min_tokens=limit)
        assert rel(y, reference(g, u, d, x, ids, w)) < MM


def test_plain_layer_errors():
    gate, up, down = (w.bfloat16() for w in weights(e=2))
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_moe.plain_layer(gate.float(), up, down)
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_moe.PlainExperts.of(gate, up, down.half())
    with pytest.raises(ValueError, match="contiguous"):
        cpu_moe.plain_layer(gate, up.transpose(1, 2).contiguous().transpose(1, 2), down)  # column-major rows
    with pytest.raises(ValueError, match="contiguous"):
        cpu_moe.plain_layer(gate[:, ::2], up[:, ::2], down[:, :, ::2])
    with pytest.raises(ValueError, match="shapes"):
        cpu_moe.plain_layer(gate, up, down.transpose(1, 2).contiguous())
    with pytest.raises(ValueError, match="shapes"):
        cpu_moe.plain_layer(gate, up[:1], down)
    with pytest.raises(ValueError, match="stacked"):
        cpu_moe.plain_layer(gate[0], up[0], down[0])
    with pytest.raises(ValueError, match="stacked"):
        cpu_moe.plain_layer(list(gate), up, down)
    with pytest.raises(ValueError, match="CPU"):
        cpu_moe.plain_layer(gate.to("meta"), up, down)
    bad = cpu_moe.PlainExperts(gate.float(), up, down)  # built without the check: moe_forward checks too
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_moe.moe_forward(bad, torch.zeros(1, H), torch.zeros(1, 1).long(), torch.ones(1, 1))
    with pytest.raises(ValueError, match="PlainExperts"):
        cpu_moe.moe_forward((gate, up, down), torch.zeros(1, H), torch.zeros(1, 1).long(), torch.ones(1, 1))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_read_spans_reads_every_line_once(layers, threads):
    """The benchmark's read ceiling (cadenza_read_spans) touches exactly the chosen experts' tiles, each line once
    over however many threads: its xor equals the bytes' xor computed here."""
    packed, _ = layers["int4", 32]
    experts = [3, 0, 5]
    words = torch.cat([m[e].reshape(-1) for e in experts for m in (packed.gate_up, packed.down)]).view(torch.int64)
    want = 0
    for v in words.tolist():
        want ^= v
    assert cpu_moe.read_spans(packed, experts, threads) == want % (1 << 64)
    assert cpu_moe.read_spans(packed, [1], threads) != cpu_moe.read_spans(packed, [2], threads)


@needs_kernel
def test_bench_thread_sweep_rows(tmp_path):
    """`cpu_kernel --thread-sweep`: kernel and read rows at each thread count, for the same bytes per call."""
    import json

    from cadenza.bench import cpu_kernel

    out = tmp_path / "k.json"
    argv = ["--model", "mixtral-tiny", "--formats", "int4", "--tokens", "1", "--layouts", "tiled", "--seconds", "0.05"]
    argv += ["--prefill-tokens", "0", "--no-torch", "--dram-gib", "0.05", "--threads", "2", "--thread-sweep", "1,2"]
    before = os.environ.get(cpu_moe.ACTIVATIONS_ENV)
    assert cpu_kernel.main([*argv, "--prefetch", "0", "--rotate-gb", "0.01", "--out", str(out)]) == 0
    # the activations switch it sets per format is given back (a later `cadenza info` in the process inherited it)
    assert os.environ.get(cpu_moe.ACTIVATIONS_ENV) == before
    rows = json.loads(out.read_text())["results"]
    got = {(r["route"], r["threads"]) for r in rows}
    assert {("kernel", 1), ("kernel", 2), ("read", 1), ("read", 2)} <= got
    assert len({r["weight_bytes_per_call"] for r in rows}) == 1
    assert all(r["ms_median"] > 0 for r in rows)
