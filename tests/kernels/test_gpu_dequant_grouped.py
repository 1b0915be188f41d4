"""Big steps whose pairs per expert the host knows (cadenza.kernels.gpu_grouped's dequantize-first path: a chunk of
experts dequantized by `gpu_moe.dequantize_rows`, then matrix products) against the exact reference and the
grouped kernel: without CUDA through Triton's interpreter on CPU tensors, with CUDA compiled; full-size shapes and
the engine in the `gpu` tests."""

import pytest
import torch

from cadenza.kernels.layout import dequantize, pack_layer
from tests.interpreted import DEVICE, kernels_module
from tests.kernels.test_gpu_moe import BF16, FP32, block_layer, experts, on, reference, rel, routing
from tests.test_graphs import families  # noqa: F401 (the fixture)

grouped, _SUBPROCESS = kernels_module("gpu_grouped")
KERNELS = grouped.available(DEVICE) and not _SUBPROCESS
needs_kernels = pytest.mark.skipif(not KERNELS, reason="Triton's interpreter (or a GPU) runs these kernels")
needs_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on the device)"),
]


def counts_of(rows: torch.Tensor, r: int) -> list[int]:
    flat = rows.reshape(-1).cpu()
    return [int((flat == j).sum()) for j in range(r)]


def test_chunks_are_runs_of_rows_with_pairs_at_both_ends():
    counts = [0, 3, 0, 2, 5, 0, 0, 1, 0]
    assert grouped._chunks(counts, 2) == [(1, 2), (3, 5), (7, 8)]
    assert grouped._chunks(counts, 9) == [(1, 8)]
    assert grouped._chunks(counts, 1) == [(1, 2), (3, 4), (4, 5), (7, 8)]
    assert grouped._chunks([0, 0], 4) == []


def test_dequantizes_only_with_many_pairs_an_expert(monkeypatch):
    from cadenza.kernels import gpu_grouped as package

    x = torch.zeros(2, 4)
    monkeypatch.delenv(package.DEQUANT_ENV, raising=False)
    assert package.dequant_pairs() == package.DEQUANT_PAIRS == 64
    assert not package.dequantizes(None, x)  # counts unknown: the grouped kernel, no read-back
    assert package.dequantizes([0, 70, 60, 0], x)  # 65 an active expert
    assert not package.dequantizes([0, 70, 50, 0], x)
    assert not package.dequantizes([0, 0], x)
    monkeypatch.setenv(package.DEQUANT_ENV, "0")
    assert not package.dequantizes([500, 500], x)
    monkeypatch.setenv(package.DEQUANT_ENV, "8")
    assert package.dequantizes([10, 0], x)
    for bad in ("many", "-3", "1.5"):
        monkeypatch.setenv(package.DEQUANT_ENV, bad)
        with pytest.raises(ValueError, match="CADENZA_DEQUANT_PAIRS"):
            package.dequant_pairs()


def test_dequant_workspace_is_a_chunk_or_one_expert(monkeypatch):
    from types import SimpleNamespace

    from cadenza.kernels import gpu_grouped as package
    from cadenza.moe.offload.planning import workspace_bytes

    one = 3 * 4096 * 14336 * 2  # Mixtral's expert in bf16: larger than a chunk
    assert package.dequant_workspace(4096, 14336, 2, 8) == one
    small = 3 * 2048 * 768 * 2  # Qwen3-30B-A3B's: as many as fit
    assert package.dequant_workspace(2048, 768, 2, 128) == (package.DEQUANT_BYTES // small) * small
    assert package.dequant_workspace(64, 32, 2, 4) == 4 * 3 * 64 * 32 * 2  # a tiny model: its 4 experts
    assert package._chunk_rows([0, 9, 0, 9, 9], 3 * 64 * 32 * 2) == 3  # no wider than the rows with pairs
    assert package._chunk_rows([9] * 128, small) == package.DEQUANT_BYTES // small
    cfg = SimpleNamespace(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, vocab_size=1000,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128)  # fmt: skip
    gpu, cpu = (workspace_bytes(cfg, torch.bfloat16, 64, 16, m, 128) for m in (100, 0))
    assert gpu - cpu - 100 == package.dequant_workspace(2048, 768, 2, 128)  # on a real GPU only (the margin)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_rows_equals_one_expert_at_a_time(dtype):
    """A stack of slots (rows further apart than an expert's bytes, as the fetch slots' views): each expert of a
    slice equal to its own dequantization, and to PyTorch's."""
    h, i, r = 256, 136, 5
    packed = pack_layer(*experts(r, h, i), "int4", 32)

    def slots(m):  # [r, ...] views into rows 96 bytes wider than an expert
        big = torch.zeros(r, m[0].numel() + 96, dtype=torch.uint8)
        big[:, : m[0].numel()] = m.reshape(r, -1)
        return big[:, : m[0].numel()].view(r, *m.shape[1:])

    gu, dn = on(slots(packed.gate_up), slots(packed.down))
    outs = [torch.empty(3, *s, dtype=dtype, device=DEVICE) for s in ((i, h), (i, h), (h, i))]
    grouped.dequantize_rows(gu[1:4], dn[1:4], "int4", 32, h, i, *outs)
    gate, up, down = dequantize(packed)
    for j in range(3):
        want = grouped.dequantize_rows(gu[1 + j : 2 + j], dn[1 + j : 2 + j], "int4", 32, h, i,
                                       *[torch.empty_like(o[:1]) for o in outs], route="torch")  # fmt: skip
        assert want is None
        for o, ref in zip(outs, (gate, up, down), strict=True):
            assert rel(o[j], ref[1 + j].to(dtype)) == 0.0
    with pytest.raises(ValueError, match="contiguous rows"):
        grouped.dequantize_rows(gu[1:4], dn[1:4], "int4", 32, h, i, outs[0].transpose(1, 2), *outs[1:])


GPT_OSS_ACT = "clamped_swiglu:1.702:7.0"  # models.common.clamped_swiglu_name(1.702, 7.0): gpt-oss's experts
CASES = [  # (fmt, group, H, I, x dtype, experts a chunk, activation)
    ("int4", 64, 256, 256, torch.float32, 6, "silu"),
    ("int4", 32, 200, 136, torch.float32, 1, "silu"),  # H, I not multiples of 128; a chunk an expert (Mixtral's)
    ("q4_k+q6_k", 0, 512, 256, torch.float32, 2, "silu"),
    ("int8", 32, 256, 128, torch.bfloat16, 3, "silu"),  # bf16: torch._grouped_mm where it runs
    ("mxfp4", 0, 256, 160, torch.float32, 4, GPT_OSS_ACT),  # gpt-oss: MXFP4 blocks, biases, the clamped SwiGLU
]


@needs_kernels
@pytest.mark.parametrize("fmt, group, h, i, dtype, per, act", CASES)
def test_dequantized_products_equal_the_grouped_kernel(monkeypatch, fmt, group, h, i, dtype, per, act):
    """With the counts known and many pairs an expert, the chunked dequantize-and-multiply path gives the grouped
    kernel's sums (and the exact reference's, for SiLU), with biases, skipped pairs and a stack row without pairs."""
    monkeypatch.setenv(grouped.DEQUANT_ENV, "1")
    monkeypatch.setattr(grouped, "DEQUANT_BYTES", per * 3 * h * i * dtype.itemsize)
    r, t, k = 6, 23, 2
    block = "+" in fmt or fmt == "mxfp4"
    packed = block_layer(fmt, r, h, i) if block else pack_layer(*experts(r, h, i), fmt, group)
    x, rows, w = routing(t, k, r, h)
    rows = torch.where(rows == 2, -1, rows)  # row 2: no pairs (inside a chunk where chunks hold 3+ rows)
    g = torch.Generator().manual_seed(3)
    biases = tuple(on(*(torch.randn(r, n, generator=g) for n in (i, i, h))))
    kw = dict(fmt=fmt, group=packed.group, hidden=h, intermediate=i)
    args = (*on(x.to(dtype), rows, w), on(packed.gate_up, packed.down), act)
    calls = []
    real = grouped._dequantized
    monkeypatch.setattr(grouped, "_dequantized", lambda *a: calls.append(1) or real(*a))
    counts = counts_of(rows, r)
    y = grouped.moe_grouped(*args, **kw, biases=biases, row_counts=counts)
    assert calls, "the dequantize-first path did not run"
    y_kernel = grouped.moe_grouped(*args, **kw, biases=biases)
    assert len(calls) == 1 and y.dtype == dtype
    assert rel(y, y_kernel) < (FP32 if dtype == torch.float32 else 2 * BF16)
    if act == "silu":
        plain = grouped.moe_grouped(*args, **kw, row_counts=counts)
        tol = FP32 if dtype == torch.float32 else 2 * BF16
        assert rel(plain, reference(x, rows, w, *dequantize(packed), "silu")) < tol


@needs_kernels
def test_row_counts_must_be_the_pairs_of_each_row():
    h, i, r, t, k = 256, 128, 4, 9, 2
    packed = pack_layer(*experts(r, h, i), "int4", 64)
    x, rows, w = routing(t, k, r, h)
    kw = dict(fmt="int4", group=64, hidden=h, intermediate=i)
    args = (*on(x, rows, w), on(packed.gate_up, packed.down), "silu")
    counts = counts_of(rows, r)
    for bad, extra in (([*counts, 0], {}), ([-1, *counts[1:]], {}), (counts, {"pairs": sum(counts) - 1})):
        with pytest.raises(ValueError, match="row_counts"):
            grouped.moe_grouped(*args, **kw, row_counts=bad, **extra)


@needs_kernels
@pytest.mark.skipif(DEVICE.type != "cpu", reason="emulates the GPU side on CPU tensors (the gpu test below: CUDA)")
def test_engine_big_steps_dequantize_first(families, monkeypatch):  # noqa: F811
    """The emulated GPU side with the grouped products on and every big step dequantizing first (the interpreted
    module standing in for the package's): some experts resident, the rest fetched; the tokens of the per-expert
    products, and the path ran for residents and fetch slots both."""
    import cadenza.kernels.gpu_grouped as package_grouped
    from cadenza import LLM, SamplingParams
    from cadenza.moe.gpu_side import ExpertLayout
    from cadenza.moe.offload.policy import fetch_slots

    path = families["mixtral"]
    kw = dict(device="cpu", dtype="float32", experts="int4", max_context=64, max_batch=12)
    probe = LLM(path, gpu_memory="8GiB", **kw)
    p = probe.placement
    probe.close()
    slots = fetch_slots("fetch", 2, 0, 12, p.num_experts, p.expert_bytes)
    kw |= dict(offload_policy="fetch", gpu_memory=p.always_bytes + p.kv_bytes + p.workspace_bytes
               + (slots + 3) * p.expert_bytes)  # fmt: skip
    prompts = [list(range(3, 3 + 1 + i % 5)) for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    stacks, real = [], grouped._dequantized

    def spy(x, src, srow, row_counts, mats, *a):
        stacks.append(len(row_counts))
        return real(x, src, srow, row_counts, mats, *a)

    tokens = []
    for on_ in (False, True):
        if on_:
            monkeypatch.setenv(grouped.DEQUANT_ENV, "1")
            monkeypatch.setattr(grouped, "_dequantized", spy)
            monkeypatch.setattr(ExpertLayout, "grouped", lambda self, device: not self.plain)
            monkeypatch.setattr(package_grouped, "moe_grouped", grouped.moe_grouped)
        llm = LLM(path, **kw)
        try:
            assert 0 < llm.placement.resident_count < llm.placement.total_experts
            num_slots = llm.orchestra.cache.num_slots
            tokens.append([r.token_ids for r in llm.generate(prompts, params)])
        finally:
            llm.close()
    assert tokens[0] == tokens[1]
    assert stacks and max(stacks) == num_slots and min(stacks) < num_slots, stacks  # the slots' and residents' stacks


@pytest.mark.parametrize(
    "fmt, group, h, i, r, t, k",
    [
        ("int4", 64, 4096, 14336, 8, 2150, 2),  # T1's mixed passes: Mixtral, ~540 pairs an expert
        ("q4_k+q6_k", 0, 4096, 14336, 8, 512, 2),  # a Mixtral GGUF's prefill
        ("int4", 64, 2048, 768, 128, 1024, 8),  # Qwen3-30B-A3B: chunks of 27 experts through torch._grouped_mm
    ],
)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
def test_gpu_dequantized_full_size(fmt, group, h, i, r, t, k):
    """Full-size shapes, bf16 x: the dequantize-first path equal to the per-expert products (dequantize, then
    cuBLAS) to bf16 rounding, and to the grouped kernel."""
    from cadenza.kernels.gpu_moe import expert_forward

    packed = block_layer(fmt, r, h, i) if "+" in fmt else pack_layer(*experts(r, h, i), fmt, group)
    x, rows, w = routing(t, k, r, h, skip=False)
    x, rows, w = x.cuda().bfloat16(), rows.cuda(), w.cuda()
    mats = (packed.gate_up.cuda(), packed.down.cuda())
    kw = dict(fmt=fmt, group=packed.group, hidden=h, intermediate=i)
    y = grouped.moe_grouped(x, rows, w, mats, "silu", **kw, row_counts=counts_of(rows, r))
    want = torch.zeros(t, h, dtype=torch.float32, device="cuda")
    for e in range(r):
        tok, slot = (rows == e).nonzero(as_tuple=True)
        if tok.numel():
            ye = expert_forward(x[tok], mats[0][e], mats[1][e], fmt, packed.group, h, i, "silu")
            want.index_add_(0, tok, ye * w[tok, slot, None])
    assert rel(y, want) < 2e-2
    assert rel(y, grouped.moe_grouped(x, rows, w, mats, "silu", **kw)) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
def test_gpu_engine_dequantizing_gives_the_per_expert_tokens(families, monkeypatch):  # noqa: F811
    """A batch of 19 decoding together, int4 experts, some resident and the rest fetched, fp32: every big step
    dequantizing first (CADENZA_DEQUANT_PAIRS=1) gives the tokens of the grouped kernel and of the per-expert
    products."""
    from cadenza import LLM, SamplingParams
    from tests.conftest import budget_for

    path = families["mixtral"]
    gpu = budget_for(path, 2, 2, device="cuda", max_context=96, max_batch=20, experts="int4")
    kw = dict(device="cuda", dtype="float32", experts="int4", gpu_memory=gpu, max_context=96, max_batch=20)
    prompts = [list(range(3, 3 + 1 + i % 7)) for i in range(19)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tokens = []
    for grouped_flag, dequant in (("0", "0"), ("1", "0"), ("1", "1")):
        monkeypatch.setenv(grouped.ENV, grouped_flag)
        monkeypatch.setenv(grouped.DEQUANT_ENV, dequant)
        llm = LLM(path, **kw)
        try:
            tokens.append([r.token_ids for r in llm.generate(prompts, params)])
        finally:
            llm.close()
    assert tokens[0] == tokens[1] == tokens[2]
