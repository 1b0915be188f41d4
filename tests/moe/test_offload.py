"""The CPU-GPU orchestra with the "GPU side" emulated on the CPU: every policy and budget computes the same
model as the all-resident run; the slot cache, cost model and scheduler behave as specified."""

from __future__ import annotations

import json

import pytest
import torch

from cadenza import LLM, CadenzaError, SamplingParams
from cadenza.moe.offload.cache import SlotCache
from cadenza.moe.offload.costmodel import CostModel, _fit_line
from tests.conftest import budget_for, make_mixtral, offloaded_llm

TOL = 1e-4
PROMPT = list(range(3, 40))


@pytest.fixture(scope="module")
def moe8(tmp_path_factory):
    """A tiny Mixtral with 8 experts in 3 layers, and its all-on-one-device reference."""
    path, _ = make_mixtral(tmp_path_factory.mktemp("moe8"), num_local_experts=8, num_hidden_layers=3)
    ref = LLM(path, device="cpu", dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return path, ref.score(PROMPT), ref.generate(PROMPT[:6], greedy).token_ids


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
@pytest.mark.parametrize("residents", [0, 5, 13, 24])
def test_hybrid_equals_single_device(moe8, policy, residents):
    path, want_logits, want_tokens = moe8
    llm = offloaded_llm(path, policy, residents)
    try:
        assert llm.placement.resident_count == residents
        assert (llm.score(PROMPT) - want_logits).abs().max().item() <= TOL
        out = llm.generate(PROMPT[:6], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        assert out.token_ids == want_tokens
        work = out.stats.expert_work
        assert sum(work.values()) == (6 + 11) * 3 * 2  # (prompt + decode steps) x layers x top-2
        if residents == 24:
            assert work["cpu"] == work["fetched"] == 0
        elif policy == "cpu":
            assert work["fetched"] == 0 and work["cpu"] > 0
        elif policy == "fetch":
            assert work["cpu"] == 0 and work["fetched"] > 0
    finally:
        llm.close()


def test_one_sync_per_moe_layer_at_decode(moe8):
    path = moe8[0]
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=budget_for(path, 5, 0), offload_policy="cpu")
    out = llm.generate(PROMPT[:6], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    assert out.stats.decode_syncs == 8 * 3  # 8 decode steps x 3 MoE layers
    assert out.stats.decode_host_bytes > 0 and out.stats.decode_gpu_bytes >= 0
    llm.close()


def test_replan_keeps_results(moe8):
    path, want_logits, _ = moe8
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory="0", offload_policy="cpu")
    assert llm.placement.resident_count == 0
    llm.replan(gpu_memory=budget_for(path, 10), offload_policy="fetch")
    assert llm.placement.resident_count == 10 and llm.offload_policy == "fetch"
    assert (llm.score(PROMPT) - want_logits).abs().max().item() <= TOL
    llm.close()


def test_budget_too_small_names_smallest_budget(moe8):
    with pytest.raises(CadenzaError, match="--gpu-memory") as e:
        LLM(moe8[0], device="cpu", dtype="float32", gpu_memory="1KiB")
    assert "too small" in str(e.value)


def test_bad_policy_and_threads(moe8):
    with pytest.raises(CadenzaError, match="offload policy"):
        LLM(moe8[0], device="cpu", gpu_memory="0", offload_policy="gpu")
    with pytest.raises(CadenzaError, match="cpu_threads"):
        LLM(moe8[0], device="cpu", gpu_memory="0", cpu_threads=0)


def test_popularity_placement(moe8, tmp_path):
    import json

    path = moe8[0]
    counts = [[0] * 8 for _ in range(3)]
    counts[1][7] = 100
    counts[2][3] = 50
    (tmp_path / "pop.json").write_text(json.dumps({"counts": counts}))
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=budget_for(path, 2), placement=tmp_path / "pop.json")
    assert llm.placement.resident == [[], [7], [3]]
    llm.close()


def test_slot_cache_lru_order():
    cache = SlotCache(2, hidden=4, intermediate=3, dtype=torch.float32, device=torch.device("cpu"))

    def host(v):
        return torch.full((3, 4), float(v)), torch.full((3, 4), float(v)), torch.full((4, 3), float(v))

    a = cache.get(0, 1, host(1))
    b = cache.get(0, 2, host(2))
    cache.release(a)  # the work reading them is queued (as the scheduler does after each wave)
    cache.release(b)
    assert cache.get(0, 1, host(1)) == a  # hit refreshes expert 1
    cache.release(a)
    c = cache.get(1, 5, host(5))  # evicts the least recently used: (0, 2)
    assert c == b and (0, 2) not in cache.where and (0, 1) in cache.where
    assert cache.gate[c].eq(5).all() and cache.gate[a].eq(1).all()
    assert (cache.hits, cache.misses) == (1, 3)


def stacked_host(n: int, shift: float = 0.0):
    """n experts stored as quantized layers store them: rows of one tensor per part (gate/up tiles, down tiles)."""
    gate_up = torch.arange(n * 6 * 8, dtype=torch.float32).view(n, 6, 8) + shift
    down = -torch.arange(n * 4 * 3, dtype=torch.float32).view(n, 4, 3) - shift
    return gate_up, down


def recorded_fills(monkeypatch) -> list[tuple[int, int]]:
    """(first slot, experts) of each copy SlotCache makes from now on."""
    copies = []
    real = SlotCache._fill
    monkeypatch.setattr(
        SlotCache,
        "_fill",
        lambda self, slot, host, stream=None, n=1: copies.append((slot, n)) or real(self, slot, host, stream, n),
    )
    return copies


def test_slot_cache_copies_consecutive_experts_into_consecutive_slots_at_once(monkeypatch):
    """A wave of a layer's experts that follow each other in host memory and get slots that follow each other is
    copied as one copy a part; the slots hold each expert's bytes, the hits and misses count per expert."""
    gate_up, down = stacked_host(8)
    parts = [((6, 8), torch.float32), ((4, 3), torch.float32)]
    cache = SlotCache(6, device=torch.device("cpu"), parts=parts)
    copies = recorded_fills(monkeypatch)
    slots = cache.get_many(0, [2, 3, 4, 6], lambda e: (gate_up[e], down[e]))
    assert slots == {2: 0, 3: 1, 4: 2, 6: 3} and copies == [(0, 3), (3, 1)]  # 5 is not in the wave: a new run
    for e, s in slots.items():
        assert torch.equal(cache.stacks[0][s], gate_up[e]) and torch.equal(cache.stacks[1][s], down[e])
    cache.release_many(slots.values())
    assert not cache.in_use
    copies.clear()
    again = cache.get_many(0, [3, 4, 5], lambda e: (gate_up[e], down[e]))  # 3, 4 hit; 5 fills slot 4
    assert again == {3: 1, 4: 2, 5: 4} and copies == [(4, 1)] and (cache.hits, cache.misses) == (2, 5)
    assert cache.copies == 3  # the runs copied, counted for the benchmarks
    assert torch.equal(cache.stacks[0][4], gate_up[5])


def test_slot_cache_copies_apart_what_is_not_one_run():
    """Experts from separate allocations, a layer whose experts are smaller than the slots (a GGUF's Q4_K layer
    in slots sized for its Q6_K one), slots that do not follow: each copied into its own slot, the right bytes."""
    a, b = stacked_host(4), stacked_host(4, shift=1000.0)
    wide = [((8, 8), torch.float32), ((4, 4), torch.float32)]  # wider slots: the layer's view is not contiguous
    for parts in ([((6, 8), torch.float32), ((4, 3), torch.float32)], wide):
        cache = SlotCache(4, device=torch.device("cpu"), parts=parts)
        host = {0: (a[0][0], a[1][0]), 1: (b[0][1], b[1][1]), 2: (a[0][2], a[1][2]), 3: (a[0][3], a[1][3])}
        slots = cache.get_many(0, [0, 1, 2, 3], host.get)
        view = cache.shaped([((6, 8), torch.float32), ((4, 3), torch.float32)])
        for e, s in slots.items():
            assert torch.equal(view[0][s], host[e][0]) and torch.equal(view[1][s], host[e][1]), (parts, e)


def test_slot_cache_prefetches_what_its_slots_hold(monkeypatch):
    """Prefetching more experts than slots issues the first ones that fit (never one evicting another of the same
    call, a copy wasted) in one run; the slots hold their bytes."""
    gate_up, down = stacked_host(4)
    cache = SlotCache(2, device=torch.device("cpu"), parts=[((6, 8), torch.float32), ((4, 3), torch.float32)])
    copies = recorded_fills(monkeypatch)
    issued = cache.prefetch_many(0, [1, 0, 2], lambda e: (gate_up[e], down[e]))
    assert issued == [1, 0] and cache.where == {(0, 0): 0, (0, 1): 1} and copies == [(0, 2)]
    for e in (0, 1):
        assert torch.equal(cache.stacks[0][cache.where[(0, e)]], gate_up[e])
    assert cache.prefetch_many(0, [0, 1], lambda e: (gate_up[e], down[e])) == []  # cached already


def test_slot_cache_gives_a_wave_its_victims_slots_in_ascending_order(monkeypatch):
    """Victims one wave released that come out in descending order (the oldest key in the higher slot) still take
    a wave of consecutive experts as one copy: slots and experts are paired both ascending."""
    gate_up, down = stacked_host(8)
    cache = SlotCache(4, device=torch.device("cpu"), parts=[((6, 8), torch.float32), ((4, 3), torch.float32)])
    host = lambda e: (gate_up[e], down[e])  # noqa: E731
    for wave in ([0, 1, 2, 3], [3, 2, 0, 1]):  # least recently used now: expert 3 (slot 3), then 2 (slot 2)
        cache.release_many(cache.get_many(0, wave, host).values())
    copies = recorded_fills(monkeypatch)
    slots = cache.get_many(1, [5, 4], host)
    assert slots == {5: 3, 4: 2} and list(slots) == [5, 4] and copies == [(2, 2)]
    assert torch.equal(cache.stacks[0][2], gate_up[4]) and torch.equal(cache.stacks[0][3], gate_up[5])
    assert set(cache.where) == {(0, 0), (0, 1), (1, 4), (1, 5)}


def test_slot_cache_fills_slots_in_the_order_they_were_released(monkeypatch):
    """The next layer's experts copied ahead into slots two waves released: the first experts into the first
    wave's slots, a copy for each wave's slots (a copy never waits for a later wave's products, nor holds back
    the copies queued behind it), the right bytes in each slot."""
    gate_up, down = stacked_host(8)
    cache = SlotCache(4, device=torch.device("cpu"), parts=[((6, 8), torch.float32), ((4, 3), torch.float32)])
    host = lambda e: (gate_up[e], down[e])  # noqa: E731
    cache.release_many(cache.get_many(0, [0, 1, 2, 3], host).values())
    cache.release_many(cache.get_many(0, [2, 3], host).values())  # a first wave: slots 2, 3
    cache.release_many(cache.get_many(0, [0, 1], host).values())  # then a second: slots 0, 1
    copies = recorded_fills(monkeypatch)
    assert cache.prefetch_many(1, [4, 5, 6, 7], host) == [4, 5, 6, 7]
    assert copies == [(2, 2), (0, 2)]  # (one copy over slots 0-3 would wait for the second wave's products)
    assert {e: cache.where[(1, e)] for e in range(4, 8)} == {4: 2, 5: 3, 6: 0, 7: 1}
    for e in range(4, 8):
        assert torch.equal(cache.stacks[0][cache.where[(1, e)]], gate_up[e])
        assert torch.equal(cache.stacks[1][cache.where[(1, e)]], down[e])


def test_slot_cache_joins_a_stacked_layers_experts_unchecked(monkeypatch):
    """stacked (the layer vouches that each expert's host tensors follow the previous expert's, so pairs are not
    checked): the same copies and bytes as checking each pair."""
    gate_up, down = stacked_host(8)
    host = lambda e: (gate_up[e], down[e])  # noqa: E731
    parts = [((6, 8), torch.float32), ((4, 3), torch.float32)]
    copies = recorded_fills(monkeypatch)
    seen = []
    for stacked in (False, True):
        cache = SlotCache(6, device=torch.device("cpu"), parts=parts)
        slots = cache.get_many(0, [2, 3, 4, 6], host, stacked)
        cache.release_many(slots.values())
        issued = cache.prefetch_many(1, [0, 1, 5], host, stacked)
        seen.append((slots, issued, list(copies), [t.clone() for t in cache.stacks]))
        copies.clear()
    assert seen[0][:3] == seen[1][:3] and seen[0][2] == [(0, 3), (3, 1), (4, 2), (0, 1)]  # (free slots first)
    assert all(torch.equal(a, b) for a, b in zip(seen[0][3], seen[1][3], strict=True))


def test_layers_host_views_made_once_and_stacked(moe8):
    """LayerOffload hands the cache the same host views each time (made once), the experts' own tensors, and
    says a loaded layer (plain) and a packed one (int4) are stacked."""
    for kw in ({}, {"experts": "int4"}):
        llm = LLM(moe8[0], device="cpu", dtype="float32", gpu_memory=budget_for(moe8[0], 0, 2), **kw)
        try:
            for layer in llm.orchestra.layers:
                assert layer.stacked
                assert layer.host_weights(3) is layer.host_weights(3)
                own = layer.experts.host_weights(3)
                assert [t.data_ptr() for t in layer.host_weights(3)] == [t.data_ptr() for t in own]
        finally:
            llm.close()


def test_lru_victim_where_agrees_with_victim():
    """The LRU's walk from the oldest key gives the victim the generic list would."""
    from cadenza.moe.offload.eviction import LRU, EvictionPolicy

    lru = LRU()
    where = {(0, e): e for e in range(6)}
    for key in [(0, 3), (0, 1), (0, 4), (0, 0), (0, 5), (0, 2), (0, 1)]:
        lru.touch(key)
    for in_use in (set(), {3}, {3, 4}, {0, 2, 3, 4, 5}):
        assert lru.victim_where(where, in_use) == EvictionPolicy.victim_where(lru, where, in_use)


def test_fetch_waves_of_half_the_slots_for_many_tokens(moe8, monkeypatch):
    """A call of many tokens fetches in waves of half the slots (a copy into one half while the other's products
    run: each wave's slots are released before the next wave's are taken); a few tokens, one wave of all the slots
    (both taken, then both released); the same logits either way."""
    path, want, _ = moe8
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=budget_for(path, 0, 2), offload_policy="fetch")
    ops: list[str] = []
    get, release = SlotCache.get_many, SlotCache.release_many

    def get_many(self, layer, experts, host_of, stacked=False):
        ops.append("g" * len(experts))
        return get(self, layer, experts, host_of, stacked)

    def release_many(self, slots):
        slots = list(slots)
        ops.append("r" * len(slots))
        return release(self, slots)

    monkeypatch.setattr(SlotCache, "get_many", get_many)
    monkeypatch.setattr(SlotCache, "release_many", release_many)
    try:
        assert llm.orchestra.cache.num_slots == 2
        torch.testing.assert_close(llm.score(PROMPT), want, atol=TOL, rtol=TOL)  # 37 tokens a call
        assert ops and "gg" not in "".join(ops)
        ops.clear()
        llm.score(PROMPT[:3])  # 3 tokens: top-2 of 8 experts, most layers fetch two
        assert "ggrr" in "".join(ops)
    finally:
        llm.close()


def test_cost_model_decisions():
    cm = CostModel("k", expert_bytes=352_000_000, cpu_s=(5.6e-3, 75e-6), gpu_s=(0.1e-3, 2e-6), h2d_gb_s=50.0)
    assert not cm.prefers_fetch(1)  # decode: compute the miss on the CPU
    assert cm.prefers_fetch(512)  # long prompt: fetch
    n = cm.crossover_tokens()
    assert n is not None and cm.prefers_fetch(n) and not cm.prefers_fetch(n - 1)
    assert "fetch beats CPU" in cm.describe()


def test_split_uses_cpu_and_pcie_together_where_it_wins():
    cm = CostModel("k", expert_bytes=352_000_000, cpu_s=(5.6e-3, 75e-6), gpu_s=(0.1e-3, 2e-6), h2d_gb_s=55.0)
    counts = [1, 0, 1, 0, 0, 0, 0, 0]
    # decode, two misses: one on the CPU while the other is fetched
    fetch, cpu = cm.split([0, 2], counts)
    assert len(fetch) == 1 and len(cpu) == 1
    # one miss: the CPU alone is faster than a fetch
    assert cm.split([2], counts) == ([], [2])
    # the CPU turns out twice as slow when sharing DRAM with fetches: everything on the CPU again
    for _ in range(30):
        cm.observe_cpu(experts=1, tokens=1, seconds=2 * cm.cpu_time(1), shared=True)
    assert cm.split([0, 2], counts) == ([], [0, 2])
    # ... but the split is retried now and then, so one bad stretch does not rule it out for good
    tries = [cm.split([0, 2], counts) for _ in range(2 * cm.EXPLORE_EVERY)]
    assert sum(1 for f, c in tries if f and c) == 2
    # and slower than a fetch even alone: a single miss is fetched
    for _ in range(30):
        cm.observe_cpu(experts=1, tokens=1, seconds=1.5 * (5.6e-3 + 75e-6), shared=False)
    assert cm.split([2], counts) == ([2], [])
    cm = CostModel("k", expert_bytes=352_000_000, cpu_s=(5.6e-3, 75e-6), gpu_s=(0.1e-3, 2e-6), h2d_gb_s=55.0)
    # a long prompt: mostly fetched; the CPU keeps at most what it finishes before the copies do
    fetch, cpu = cm.split(list(range(8)), [600] * 8)
    assert len(fetch) >= 7
    assert cm.split(list(range(8)), [2000] * 8) == (list(range(8)), [])


def test_cost_model_cpu_points_interpolate_and_round_trip(tmp_path):
    """The CPU's time as measured at each token count, interpolated: a line through these points (the kernel's
    flat start, the matrix units' slope) would put one token at several times its measured cost."""
    from cadenza.moe.offload.costmodel import load_cached, save_cached

    pts = ((1, 2e-3), (4, 3e-3), (16, 8e-3), (64, 20e-3), (128, 36e-3))
    cm = CostModel("k", 116_000_000, _fit_line(pts), (0.1e-3, 1e-6), 54.0, cpu_points=pts)
    assert _fit_line(pts[::2])[0] > 1.3 * 2e-3  # what a line through 1, 16 and 128 tokens said
    assert cm.cpu_time(1) == pytest.approx(2e-3) and cm.cpu_time(16) == pytest.approx(8e-3)
    assert cm.cpu_time(10) == pytest.approx(5.5e-3)  # halfway between 4 and 16 tokens
    assert cm.cpu_time(256) == pytest.approx(36e-3 + 128 * 16e-3 / 64)  # the last segment's slope beyond
    # observed 1.5x the calibration at 1 token, per expert: the learned scale follows
    for _ in range(40):
        cm.observe_cpu(experts=2, tokens=2, seconds=2 * 3e-3, shared=False)
    assert cm.cpu_time(1) == pytest.approx(3e-3, rel=1e-3)
    save_cached(tmp_path, cm)
    back = load_cached(tmp_path, "k")
    assert back.cpu_points == pts and back.cpu_time(1) == pytest.approx(2e-3)  # learned scales are not cached
    assert "2.00 ms at 1 token (3.00 at 4, 8.00 at 16" in back.describe()
    save_cached(tmp_path, CostModel("old", 1, (1e-3, 0.0), (0.0, 0.0), 1.0))  # a line fit from an older cadenza
    assert load_cached(tmp_path, "old") is None  # measured again


def test_fit_line():
    a, b = _fit_line([(1, 1.0 + 0.5), (10, 1.0 + 5.0), (100, 1.0 + 50.0)])
    assert abs(a - 1.0) < 1e-9 and abs(b - 0.5) < 1e-9


def test_bf16_cpu_experts_run_in_the_fused_kernel(moe8):
    """bf16 experts on the CPU go through the fused kernel (where it builds): close to the all-resident bf16 run
    and to PyTorch's CPU path."""
    from cadenza.kernels import cpu_moe

    path, want = moe8[0], moe8[1]  # the fp32 reference logits
    got = {}
    for kernel in ("1", "0"):
        import os

        os.environ["CADENZA_CPU_KERNEL"] = kernel
        try:
            llm = LLM(path, device="cpu", dtype="bfloat16", gpu_memory="0", offload_policy="cpu")
        finally:
            os.environ.pop("CADENZA_CPU_KERNEL")
        assert llm.orchestra.cpu_kernel == (kernel == "1" and cpu_moe.available())
        got[kernel] = llm.score(PROMPT)
        out = llm.generate(PROMPT[:6], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert out.stats.expert_work["cpu"] > 0
        llm.close()
    # against the fp32 model: both bf16 paths within bf16 rounding on average (a near-tie in a router may flip in
    # a later layer, so not elementwise), the kernel (fp32 sums, fp32 intermediate) no further off than PyTorch's
    scale = want.abs().max().item()
    errs = {k: (g - want).abs().mean().item() for k, g in got.items()}
    assert all(e <= 0.03 * scale for e in errs.values()), errs
    assert errs["1"] <= 1.2 * errs["0"], errs


def test_prefetch_distance_is_measured_and_cached(moe8, tmp_path, monkeypatch):
    """tune_prefetch keeps "none" unless another distance is 5% faster; the LLM measures it once per machine and
    shape (cached), and CADENZA_CPU_PREFETCH forces it (a bad value is refused with the fix)."""
    import time as _time

    from cadenza.moe.offload import costmodel

    def fake(slow: dict):
        return lambda weights, x, pf: _time.sleep(slow.get(pf, 0.0))

    experts = [()] * 3
    pf, one = costmodel.tune_prefetch(fake({0: 0.004, 2048: 0.001}), experts, 8, torch.float32)
    assert pf == 2048 and 0.001 <= one < 0.004
    assert costmodel.tune_prefetch(fake({0: 0.001, 2048: 0.001}), experts, 8, torch.float32)[0] == 0
    assert costmodel.tune_prefetch(fake({0: 0.001, 2048: 0.004}), experts, 8, torch.float32)[0] == 0
    costmodel.save_prefetch(tmp_path, "k", (2048, 0.002))
    assert costmodel.load_prefetch(tmp_path, "k") == (2048, 0.002)
    assert costmodel.load_prefetch(tmp_path, "other") is None

    path = moe8[0]
    monkeypatch.setenv("CADENZA_CACHE", str(tmp_path / "cache"))
    llm = LLM(path, device="cpu", dtype="bfloat16", gpu_memory="0", offload_policy="cpu")
    try:
        if llm.orchestra.cpu_kernel:  # measured and cached under the cost model's key
            saved = json.loads((tmp_path / "cache" / "cpu_prefetch.json").read_text())
            assert [v["prefetch"] for v in saved.values()] == [llm.orchestra.cpu_prefetch]
            assert llm.orchestra.cpu_one_s > 0
    finally:
        llm.close()
    monkeypatch.setenv("CADENZA_CPU_PREFETCH", "4096")
    llm = LLM(path, device="cpu", dtype="bfloat16", gpu_memory="0", offload_policy="cpu")
    try:
        assert llm.orchestra.cpu_prefetch == 4096
    finally:
        llm.close()
    monkeypatch.setenv("CADENZA_CPU_PREFETCH", "lots")
    with pytest.raises(CadenzaError, match="CADENZA_CPU_PREFETCH"):
        LLM(path, device="cpu", dtype="bfloat16", gpu_memory="0", offload_policy="cpu")


def test_split_weighs_every_prefix_not_only_single_steps():
    """A CPU that is slower while fetches share DRAM makes the first fetch alone look worse than none, yet fetching
    most experts of a long prompt is far better: the split must find it (Qwen3's prefill on the H200 computed 148k
    of 196k expert-token pairs on the CPU this way)."""
    cm = CostModel("k", expert_bytes=3_500_000, cpu_s=(0.2e-3, 10e-6), gpu_s=(0.05e-3, 1e-6), h2d_gb_s=50.0)
    for _ in range(30):
        cm.observe_cpu(experts=1, tokens=32, seconds=1.5 * (0.2e-3 + 32 * 10e-6), shared=True)
    misses, counts = list(range(100)), [32] * 100
    fetch, cpu = cm.split(misses, counts)
    alone, link = cm.cpu_time(32), cm.fetch_time(32)
    span = max(len(cpu) * cm.cpu_time(32, shared=True), len(fetch) * link)
    assert len(fetch) > 50 and span < 0.6 * 100 * alone
    # no other number of fetched experts gives a shorter span
    for k in range(101):
        other = 100 * alone if k == 0 else max((100 - k) * cm.cpu_time(32, shared=True), k * link)
        assert span <= other + 1e-12
