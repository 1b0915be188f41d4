"""Routing traces, `cadenza profile`, popularity placement from a profile, and the fetch cache's eviction policies."""

from __future__ import annotations

import json

import pytest
import torch

from cadenza import LLM, CadenzaError, SamplingParams
from cadenza.moe.offload.eviction import LFU, LRFU, LRU, make_policy
from cadenza.moe.trace import ExpertTrace
from cadenza.profile import read_prompts
from tests.cli.test_cli import cli
from tests.conftest import budget_for, prompt_ids

# --- traces ---------------------------------------------------------------------------------------------------


def router_counts(llm, ids: list[int]) -> list[list[int]]:
    """A direct count from the router outputs: hook each MoE block's gate and recompute its top-k."""
    from cadenza.loader import moe_layers

    layers = moe_layers(llm.model)
    counts = [[0] * layers[0].num_experts for _ in layers]
    blocks = [m for m in llm.model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    handles = []
    for i, block in enumerate(blocks):

        def hook(module, args, output, i=i, k=block.top_k):
            for e in torch.topk(output, k, dim=-1).indices.reshape(-1).tolist():
                counts[i][e] += 1

        handles.append(block.gate.register_forward_hook(hook))
    try:
        llm.score(ids)
    finally:
        for h in handles:
            h.remove()
    return counts


def test_trace_counts_equal_a_direct_count(mixtral_dir):
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32")
    ids = prompt_ids(23, seed=2)
    with ExpertTrace(llm.model, keep_tokens=10) as trace:
        llm.score(ids)
        counts = trace.counts()
        recent = trace.tokens(0)
    assert counts == router_counts(llm, ids)
    assert sum(counts[0]) == len(ids) * 2  # top-2
    assert recent.shape == (10, 2)  # the ring keeps the last 10 tokens only
    # detached: no more counting
    llm.score(ids)
    assert trace.counts() == counts


def test_trace_counts_the_offloaded_path_too(mixtral_dir):
    path = mixtral_dir[0]
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=budget_for(path, 1), offload_policy="auto")
    ids = prompt_ids(17, seed=3)
    with ExpertTrace(llm.model) as trace:
        llm.score(ids)
        counts = trace.counts()
    llm.close()
    plain = LLM(path, device="cpu", dtype="float32")
    assert counts == router_counts(plain, ids)


# --- profile and placement -----------------------------------------------------------------------------------


def test_read_prompts_text_and_jsonl(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(
        'Hello there\n\n{"prompt": "Bonjour"}\n[{"role": "user", "content": "Hi"}]\n'
        '{"messages": [{"role": "user", "content": "Yo"}]}\n[not json\n'
    )
    got = read_prompts(f)
    assert got == [
        "Hello there",
        "Bonjour",
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Yo"}],
        "[not json",
    ]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(CadenzaError, match='"messages"'):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CadenzaError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(CadenzaError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_profile_command_writes_counts_heatmap_and_comparison(mixtral_dir, tmp_path):
    path = mixtral_dir[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat on the mat\nOnce upon a time\n" + json.dumps([{"role": "user", "content": "Hi"}]))
    out = tmp_path / "pop.json"
    r = cli(
        "profile",
        "--model",
        str(path),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--dtype",
        "float32",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    llm = LLM(path, device="cpu", dtype="float32")
    want = [[0] * 4 for _ in range(2)]
    texts = ["The cat sat on the mat", "Once upon a time"]
    ids = [llm._prompt_ids(t) for t in texts] + [llm.chat_prompt([{"role": "user", "content": "Hi"}])]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i in ids:
        gen = llm.generate(i, sp)
        # every prompt token and every generated token but the last went through the experts
        for layer, row in enumerate(router_counts(llm, i + gen.token_ids[:-1])):
            for e, n in enumerate(row):
                want[layer][e] += n
    assert report["counts"] == want
    assert report["prompts"] == 3 and report["generated_tokens"] == 18
    assert len(report["placement"]) == 3
    for row in report["placement"]:
        assert row["popularity_share"] >= row["even_share"] - 1e-9  # the most used first can only help
    assert out.with_suffix(".png").exists() or "matplotlib" in r.stderr
    assert "by popularity" in r.stderr


def test_placement_from_a_profile_keeps_the_most_used_experts(mixtral_dir, tmp_path):
    path = mixtral_dir[0]
    counts = [[5, 90, 1, 40], [70, 2, 3, 60]]
    pop = tmp_path / "pop.json"
    pop.write_text(json.dumps({"counts": counts}))
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=budget_for(path, 4), placement=str(pop))
    assert [sorted(r) for r in llm.placement.resident] == [[1, 3], [0, 3]]
    assert llm.placement.expected_gpu_share(counts) == pytest.approx((90 + 40 + 70 + 60) / sum(map(sum, counts)))
    llm.close()


# --- eviction policies on scripted access sequences -----------------------------------------------------------


def simulate(policy, capacity: int, accesses: list[str]) -> tuple[list[str], int]:
    """Runs accesses through a cache of `capacity`; returns the evicted keys in order and the hit count."""
    cached: set[str] = set()
    evicted, hits = [], 0
    for key in accesses:
        if key in cached:
            hits += 1
        else:
            if len(cached) == capacity:
                victim = policy.victim(cached)
                cached.remove(victim)
                policy.forget(victim)
                evicted.append(victim)
            cached.add(key)
        policy.touch(key)
    return evicted, hits


def test_lru_evicts_the_least_recently_used():
    evicted, hits = simulate(LRU(), 2, list("ABACBDA"))
    # A B A | C evicts B (A used after B) | B evicts A | D evicts C | A evicts B
    assert evicted == ["B", "A", "C", "B"] and hits == 1


def test_lfu_evicts_the_least_frequently_used_with_recency_ties():
    evicted, hits = simulate(LFU(), 2, list("AAABBCCCD"))
    # C arrives: B (2) < A (3) -> evict B; C C; D: A 3, C 3 -> tie, A older -> evict A
    assert evicted == ["B", "A"] and hits == 5
    # a returning key keeps its history: A (3 earlier uses) outlives C (1)
    evicted, _ = simulate(LFU(), 2, list("AAABCAD"))
    assert evicted[-1] == "C"


def test_lrfu_sits_between_lru_and_lfu():
    seq = list("AAAAAAAABCBCBCD")  # A popular long ago, B and C recent
    assert simulate(LRFU(half_life=1.0), 2, seq)[0][-1] == simulate(LRU(), 2, seq)[0][-1] == "B"
    assert "A" in simulate(LRU(), 2, seq)[0]  # recency alone forgets the early favourite
    # with a long memory LRFU acts as LFU: A's early popularity keeps it, B and C take turns in the other slot
    lfu = simulate(LFU(), 2, seq)[0]
    assert simulate(LRFU(half_life=1e6), 2, seq)[0] == lfu and "A" not in lfu and lfu[-1] == "C"


def test_slot_cache_uses_its_policy():
    from cadenza.moe.offload.cache import SlotCache

    host = [
        (torch.full((3, 2), float(e)), torch.full((3, 2), float(e)), torch.full((2, 3), float(e))) for e in range(4)
    ]
    cache = SlotCache(2, 2, 3, torch.float32, torch.device("cpu"), eviction="lfu")
    for e in [0, 0, 0, 1, 2]:  # 2 evicts 1 (used once) not 0 (used three times)
        slot = cache.get(0, e, host[e])
        assert float(cache.weights(slot)[0][0, 0]) == e
        cache.release(slot)
    assert set(cache.where) == {(0, 0), (0, 2)} and cache.hits == 2 and cache.misses == 3
    # a slot handed out and not yet released is never the victim, whatever the policy says
    a = cache.get(1, 0, host[0])  # (1, 0) used once: the LFU victim-to-be
    b = cache.get(1, 1, host[1])  # evicts (0, 2), not the in-use (1, 0)
    assert {(1, 0), (1, 1)} == set(cache.where) and float(cache.weights(a)[0][0, 0]) == 0
    cache.release(a)
    cache.release(b)
    with pytest.raises(CadenzaError, match="Unknown eviction policy"):
        make_policy("fifo")
