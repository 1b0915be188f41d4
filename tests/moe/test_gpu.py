"""On a real CUDA GPU (`pytest -m gpu` on the accelerator machine): the offloaded paths equal the single-device
run, and peak allocated GPU memory stays under the budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cadenza import LLM, SamplingParams
from tests.conftest import (
    budget_for,
    cuda_bf16_scores,
    make_mixtral,
    offloaded_llm,
    reference_logits,
    single_device_run,
    synced_layers,
)

pytestmark = pytest.mark.gpu
TOL = 1e-4
PROMPT = list(range(3, 43))
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, hf = make_mixtral(tmp_path_factory.mktemp("gpu-moe8"), num_local_experts=8, num_hidden_layers=3)
    return path, reference_logits(hf, PROMPT), single_device_run(path, PROMPT, 16)[1]


def budget(path, residents: int, slots: int, max_context: int | None = None) -> int:
    return budget_for(path, residents, slots, device="cuda", max_context=max_context)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
@pytest.mark.parametrize("residents", [0, 7, 24])
def test_cuda_hybrid_equals_reference(tiny, policy, residents):
    path, want, tokens = tiny
    llm = offloaded_llm(path, policy, residents, device="cuda")
    try:
        assert llm.orchestra.pinned, "host experts should be page-locked"
        assert llm.placement.resident_count == residents
        assert (llm.score(PROMPT) - want).abs().max().item() <= TOL
        out = llm.generate(PROMPT[:6], GREEDY)
        assert out.token_ids == tokens
        assert out.stats.decode_syncs == 15 * synced_layers(llm.orchestra)  # 15 decode steps
    finally:
        llm.close()


def test_cuda_bf16_hybrid_close_to_resident(tiny):
    """bf16, every expert on the host (through the fused CPU kernel where it builds) against bf16 all-resident:
    both within bf16 rounding of the fp32 reference on average (a router near-tie may flip in a later layer, so
    not elementwise), the hybrid no further off than the resident run."""
    path, want = tiny[0], tiny[1]
    resident, got = cuda_bf16_scores(path, PROMPT, 24)
    scale = want.abs().max().item()
    err_resident, err_hybrid = ((x - want).abs().mean().item() for x in (resident, got))
    assert err_resident <= 0.03 * scale and err_hybrid <= 1.2 * err_resident + 1e-3 * scale


def long_prefill_model(folder):
    """A model whose experts (1.5 GB in fp32) do not fit the tests' budgets, and a prompt of two prefill chunks."""
    path, _ = make_mixtral(
        folder,
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_hidden_layers=4,
        max_position_embeddings=8192,
    )
    return path, [3 + (i * 7) % 300 for i in range(2500)]


def test_peak_gpu_memory_under_budget(tmp_path):
    """A model whose experts (1.5 GB in fp32) do not fit the budget: peak allocated memory during a long
    prefill (two chunks) and decode stays under it, for each policy."""
    path, prompt = long_prefill_model(tmp_path / "big")
    for policy in ("cpu", "fetch", "auto"):
        gpu_memory = budget(path, 10, 0 if policy == "cpu" else 2, max_context=4096)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        llm = LLM(path, device="cuda", dtype="float32", gpu_memory=gpu_memory, offload_policy=policy, max_context=4096)
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        peak = torch.cuda.max_memory_allocated() - base
        assert peak <= gpu_memory, f"{policy}: peak {peak} > budget {gpu_memory}"
        assert llm.placement.resident_count == 10
        llm.close()
        del llm


def test_peak_gpu_memory_under_budget_with_grouped_products(tmp_path):
    """int4 experts in bf16 (a layout the grouped products take), a 2500-token prefill (a full 2048-token chunk:
    4096 pairs through the grouped products of the resident, and of each fetch wave's, experts): peak allocated
    memory stays under the budget, which counts no memory of the grouped kernel's own."""
    path, prompt = long_prefill_model(tmp_path / "big4")
    for policy in ("fetch", "auto"):
        gpu_memory = budget_for(path, 10, 2, device="cuda", max_context=4096, experts="int4", dtype="bfloat16")
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        llm = LLM(path, device="cuda", dtype="bfloat16", experts="int4", gpu_memory=gpu_memory, offload_policy=policy,
                  max_context=4096)  # fmt: skip
        assert llm.orchestra.layers[0].grouped
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        peak = torch.cuda.max_memory_allocated() - base
        assert peak <= gpu_memory, f"{policy}: peak {peak} > budget {gpu_memory}"
        llm.close()
        del llm


# --- batching, beams, prefetch and adaptive placement on the GPU ------------------------------------------------


def test_cuda_batched_and_beams_equal_cpu(tiny):
    path = tiny[0]
    cpu = LLM(path, device="cpu", dtype="float32")
    prompts = [PROMPT[:n] for n in (3, 9, 5)]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = [cpu.generate(p, sp).token_ids for p in prompts]
    beams = SamplingParams(temperature=0, max_tokens=10, num_beams=3)
    want_beam = cpu.generate(PROMPT[:6], beams).token_ids
    llm = LLM(path, device="cuda", dtype="float32", gpu_memory=budget(path, 7, 2), offload_policy="auto", max_batch=3)
    try:
        assert [r.token_ids for r in llm.generate(prompts, sp)] == want
        assert llm.generate(PROMPT[:6], beams).token_ids == want_beam  # 3 beams in the 3 reserved slots
        assert llm.generate(PROMPT[:6], SamplingParams(temperature=0, max_tokens=10, num_beams=4)).token_ids
    finally:
        llm.close()


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_cuda_prefetch_equals_reference(tiny, eviction):
    path, want, tokens = tiny
    llm = LLM(path, device="cuda", dtype="float32", gpu_memory=budget(path, 7, 2), offload_policy="fetch",
              eviction=eviction)  # fmt: skip
    try:
        out = llm.generate(PROMPT[:6], GREEDY)
        assert out.token_ids == tokens
        assert out.stats.fetch_cache["prefetch_issued"] > 0
        assert (llm.score(PROMPT) - want).abs().max().item() <= TOL
        # wrong guesses (a negated router) change nothing
        llm.orchestra.routers = [None if r is None else (-r[0], r[1]) for r in llm.orchestra.routers]
        assert llm.generate(PROMPT[:6], GREEDY).token_ids == tokens
    finally:
        llm.close()


def test_cuda_adaptive_swaps_keep_results(tiny):
    path, want, tokens = tiny
    llm = LLM(path, device="cuda", dtype="float32", gpu_memory=budget(path, 7, 0), offload_policy="cpu")
    try:
        for _ in range(2):
            llm.generate(PROMPT[:6], GREEDY)
        before = [list(r) for r in llm.placement.resident]
        llm.adapt_placement(max_bytes=4 * llm.orchestra.expert_bytes)
        assert llm.placement.resident_count == 7
        assert (llm.score(PROMPT) - want).abs().max().item() <= TOL
        assert llm.generate(PROMPT[:6], GREEDY).token_ids == tokens
        assert before is not None
    finally:
        llm.close()


def test_cuda_experts_shared_by_cpu_and_link_equal_reference(tiny):
    from cadenza.moe.offload.costmodel import CostModel

    path, want, tokens = tiny
    llm = LLM(path, device="cuda", dtype="float32", gpu_memory=budget(path, 7, 2), offload_policy="auto")
    try:
        eb = llm.orchestra.expert_bytes
        llm.orchestra.cost = CostModel("test", eb, cpu_s=(2e-3, 0.0), gpu_s=(0.0, 0.0), h2d_gb_s=eb / 1e-3 / 1e9)
        llm.orchestra.options = dataclasses.replace(llm.orchestra.options, split_experts=True)
        out = llm.generate(PROMPT[:6], GREEDY)
        assert out.token_ids == tokens and out.stats.expert_work["split"] > 0
        assert (llm.score(PROMPT) - want).abs().max().item() <= TOL
    finally:
        llm.close()
