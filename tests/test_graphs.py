"""CUDA graphs of the decode step (cadenza.graphs).

CI (CPU): the fallback is the path taken, and says why; the static decode context a graph captures (rows and
positions in device tensors, cache views ending at a bucket) computes exactly what the eager step computes.
Device (`pytest -m gpu`): replayed steps give the eager run's tokens and logits, for several families, across
positions and length buckets, with and without experts off the GPU in the step, with prefetch, after a re-plan;
every family's GPU logits and greedy tokens equal the CPU's in float32.
"""

from __future__ import annotations

import pytest
import torch

import cadenza.graphs as graphs
from cadenza import LLM, SamplingParams
from cadenza.models.attention import RowIndex
from cadenza.models.common import StaticStep
from tests.conftest import budget_for, make_deepseek, make_mixtral
from tests.models.test_dots1 import make_dots1
from tests.models.test_ernie4_5_moe import make_ernie
from tests.models.test_glm4_moe import make_glm4_moe
from tests.models.test_glm4_moe_lite import make_glm4_moe_lite
from tests.models.test_gpt_oss import make_gpt_oss
from tests.models.test_llama4 import make_llama4
from tests.models.test_minimax_m2 import make_minimax_m2
from tests.models.test_olmoe import make_olmoe
from tests.models.test_qwen2_moe import make_qwen2_moe
from tests.models.test_qwen3_5_moe import make_qwen3_5_moe
from tests.models.test_qwen3_moe import make_qwen3_moe
from tests.models.test_qwen3_next import make_qwen3_next

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def static_step(model, cache, ids: list[int], rows: list[int], end: int) -> torch.Tensor:
    """One decode step through the static context (what a graph captures), run eagerly."""
    index = RowIndex.static(len(rows), cache.device)
    index.rows_t.copy_(torch.tensor(rows))
    index.starts_t.copy_(torch.tensor([cache.lengths[r] for r in rows]))
    logits = model(
        torch.tensor(ids, device=cache.device).view(-1, 1), cache, last_only=True, static=StaticStep(index, end)
    )
    cache.advance(rows, 1)
    return logits[:, -1]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return {
        "mixtral": make_mixtral(tmp_path_factory.mktemp("g-mixtral"))[0],
        "deepseek_v2": make_deepseek(tmp_path_factory.mktemp("g-dsv2"), version=2)[0],
        # a shared expert, and sliding-window attention (a window shorter than the test's sequences)
        "qwen2_moe": make_qwen2_moe(
            tmp_path_factory.mktemp("g-qwen2"), use_sliding_window=True, sliding_window=6, max_window_layers=1
        )[0],
        "qwen3_moe": make_qwen3_moe(tmp_path_factory.mktemp("g-qwen3"))[0],
        "olmoe": make_olmoe(tmp_path_factory.mktemp("g-olmoe"))[0],
        # partial rotary (a quarter of each head) under a captured step, q/k norms, a float32 router
        "glm4_moe": make_glm4_moe(
            tmp_path_factory.mktemp("g-glm4"),
            head_dim=32,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
        )[0],
        # attention sinks, and windowed layers (window 5) alternating with full ones: two masks per step
        "gpt_oss": make_gpt_oss(tmp_path_factory.mktemp("g-gpt-oss"))[0],
        # interleaved-pair rotary from float32 tables (per-row positions in the static step), biases everywhere,
        # a float32 router with its routing bias, shared experts
        "ernie4_5_moe": make_ernie(tmp_path_factory.mktemp("g-ernie"), use_bias=True)[0],
        # chunked rope layers (chunks of 8: per-row chunk masks in the static step), a NoPE layer whose queries scale
        # by position, dense and MoE layers alternating, top-2 routing that scales the experts' inputs
        "llama4": make_llama4(tmp_path_factory.mktemp("g-llama4"), **LLAMA4_GRAPHS)[0],
        # q/k norms over the whole projection, half of each head rotary, a sigmoid router with its bias
        "minimax_m2": make_minimax_m2(tmp_path_factory.mktemp("g-minimax-m2"))[0],
        # MLA with a query LoRA and dense layers between MoE ones, a float32 sigmoid router with its bias
        "glm4_moe_lite": make_glm4_moe_lite(
            tmp_path_factory.mktemp("g-glm-lite"),
            num_hidden_layers=4,
            mlp_layer_types=["dense", "sparse", "dense", "sparse"],
        )[0],
        # linear-attention layers: each row's states read and written through the step's row index
        "qwen3_next": make_qwen3_next(tmp_path_factory.mktemp("g-qwen3-next"))[0],
        # the same layers from the multimodal layout (its text model under model.language_model)
        "qwen3_5_moe": make_qwen3_5_moe(tmp_path_factory.mktemp("g-qwen3-5"))[0],
        # per-head q/k norms, sliding layers after the first (window 5), DeepSeek-V3's router and shared experts
        "dots1": make_dots1(tmp_path_factory.mktemp("g-dots1"), sliding_window=5, max_window_layers=1)[0],
    }


LLAMA4_GRAPHS = dict(interleave_moe_layer_step=2, num_experts_per_tok=2)
FAMILIES = [
    "mixtral", "deepseek_v2", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "gpt_oss", "ernie4_5_moe", "llama4",
    "minimax_m2", "glm4_moe_lite", "qwen3_next", "qwen3_5_moe", "dots1",
]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_static_context_equals_eager_step(families, family):
    """Three sequences of different lengths in slots 2, 0, 1 (out of order) decode together, eagerly and through
    the static context, whose cache views end at a bucket past every row (one bucket, then the next)."""
    llm = LLM(families[family], device="cpu", dtype="float32", max_context=64)
    engine = llm.engine
    caches = [engine.cache_for(3, 64), engine.cache_for(3, 64)]
    prompts = {2: [5, 6, 7, 8, 9], 0: [3, 4], 1: [10, 11, 12, 13, 14, 15, 16, 17]}
    for cache in caches:
        for row, prompt in prompts.items():
            engine.forward(prompt, cache, last_only=True, rows=[row])
    rows = list(prompts)
    ids = [1, 2, 3]
    with torch.inference_mode():
        for step in range(6):
            want = engine.model(torch.tensor(ids).view(-1, 1), caches[0], last_only=True, rows=rows)[:, -1]
            end = 16 if step < 3 else 24  # past the longest row (8 + step + 1 <= 16), then a larger bucket
            got = static_step(engine.model, caches[1], ids, rows, end)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (step, (got - want).abs().max())
            assert caches[0].lengths == caches[1].lengths
            ids = [int(t) for t in want.argmax(-1)]


def test_cpu_falls_back_to_eager_and_says_why(families):
    llm = LLM(families["mixtral"], device="cpu", dtype="float32")
    assert not llm.engine.graphs.enabled
    assert "no CUDA device" in llm.engine.graphs.describe()
    out = llm.generate([3, 4, 5], GREEDY)
    assert len(out.token_ids) == 12 and llm.engine.graphs.replays == 0


# --- on the GPU -------------------------------------------------------------------------------------------------


def _tokens(llm: LLM, prompts) -> list[list[int]]:
    return [r.token_ids for r in llm.generate(prompts, GREEDY)]


def _pair(path, **kw) -> tuple[LLM, LLM]:
    return LLM(path, device="cuda", **kw), LLM(path, device="cuda", cuda_graphs=False, **kw)


@pytest.fixture
def small_buckets(monkeypatch):
    monkeypatch.setattr(graphs, "LENGTH_BUCKET", 8)  # a few tokens cross several buckets (re-captures)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_graph_replay_equals_eager_all_resident(families, family, small_buckets):
    path = families[family]
    fast, slow = _pair(path, dtype="float32", max_context=96, max_batch=3)
    try:
        assert fast.engine.graphs.enabled, fast.engine.graphs.reason
        prompts = [[3, 4, 5, 6, 7], [8, 9], list(range(10, 30))]
        assert _tokens(fast, [prompts[0]]) == _tokens(slow, [prompts[0]])
        g = fast.engine.graphs
        assert g.captures >= 2 and g.replays >= 11  # 5 + 12 positions span more than one bucket of 8
        fast_stats, slow_stats = fast.generate(prompts[0], GREEDY).stats, slow.generate(prompts[0], GREEDY).stats
        if fast.orchestra.decode_kernels:
            assert all(len(c.segments) == 1 for c in g.graphs.values()), "all experts resident: one graph per step"
            assert fast_stats.decode_syncs == 0
        else:  # gpt-oss: no decode kernel computes biased, clamped experts yet, so each layer's experts run between
            # graph segments, decided on the host
            assert all(len(c.segments) > 1 for c in g.graphs.values())
            assert fast_stats.decode_syncs > 0
        assert fast_stats.expert_work == slow_stats.expert_work and fast_stats.decode_gpu_bytes > 0
        assert _tokens(fast, prompts) == _tokens(slow, prompts)  # batched rows of different lengths
        ids = prompts[2]
        assert torch.allclose(fast.score(ids), slow.score(ids), atol=1e-5)
    finally:
        fast.close()
        slow.close()


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_logits_equal_the_cpu_reference(families, family):
    """The GPU's decode (graphs, and the fused kernels inside them: rotary with the q / k norms, the residual sum
    with its norm, the router, the experts' slot sum) gives the CPU's logits in float32, prompt and decode steps."""
    path = families[family]
    gpu, cpu = LLM(path, device="cuda", dtype="float32", max_context=96), LLM(path, device="cpu", dtype="float32")
    try:
        ids = list(range(3, 23))
        torch.testing.assert_close(gpu.score(ids), cpu.score(ids), atol=1e-4, rtol=1e-4)  # a prefill
        out = gpu.generate(ids[:5], GREEDY)
        assert out.token_ids == cpu.generate(ids[:5], GREEDY).token_ids
        assert gpu.engine.graphs.replays > 0 or not gpu.engine.graphs.enabled
    finally:
        gpu.close()
        cpu.close()


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_graph_replay_with_experts_off_the_gpu(families, policy, small_buckets):
    path = families["mixtral"]
    slots = 0 if policy == "cpu" else 2
    budget = budget_for(path, 3, slots, device="cuda", max_context=96)
    kw = dict(dtype="float32", max_context=96, gpu_memory=budget, offload_policy=policy, prefetch=policy == "fetch")
    fast, slow = _pair(path, **kw)
    try:
        prompt = [3, 4, 5, 6, 7]
        want = slow.generate(prompt, GREEDY)
        got = fast.generate(prompt, GREEDY)
        assert got.token_ids == want.token_ids
        assert got.stats.decode_syncs == want.stats.decode_syncs > 0  # the host's layers still synchronise
        work, want_work = got.stats.expert_work, want.stats.expert_work  # captured layers count on replay
        if policy == "auto":  # the cost model's split follows measured times: only the total is fixed
            work, want_work = sum(work.values()), sum(want_work.values())
        assert work == want_work
        assert any(len(c.segments) > 1 for c in fast.engine.graphs.graphs.values())
        # a new placement re-captures (the resident tensors moved)
        before = fast.engine.graphs.captures
        bigger = budget_for(path, 10, slots, device="cuda", max_context=96)
        for llm in (fast, slow):
            llm.replan(gpu_memory=bigger)
        assert _tokens(fast, [prompt]) == _tokens(slow, [prompt])
        assert fast.engine.graphs.captures > before
    finally:
        fast.close()
        slow.close()


@pytest.mark.gpu
def test_graph_replay_bf16_and_swaps(families):
    """bf16 (the decode kernels' rounding is the same in both runs) and adaptive swaps between requests, which
    rewrite resident rows in place: the captured steps stay valid."""
    path = families["mixtral"]
    budget = budget_for(path, 6, 2, device="cuda", max_context=96)
    fast, slow = _pair(path, dtype="bfloat16", max_context=96, gpu_memory=budget)
    try:
        prompt = list(range(3, 20))
        assert _tokens(fast, [prompt]) == _tokens(slow, [prompt])
        for llm in (fast, slow):
            llm.adapt_placement(max_bytes=4 * llm.orchestra.expert_bytes)
        assert fast.placement.resident == slow.placement.resident
        assert _tokens(fast, [prompt]) == _tokens(slow, [prompt])
    finally:
        fast.close()
        slow.close()


@pytest.mark.gpu
@pytest.mark.parametrize("experts", ["bf16", "int4"])
def test_streamed_cpu_experts_make_one_graph(families, experts, small_buckets, monkeypatch):
    """The cpu policy with the fused CPU kernel: each host layer's CPU share is a host function on the stream
    (cadenza.moe.offload.streamed), so a step is one graph with no synchronisation; it decodes what the synchronising
    eager path decodes, eagerly and replayed, for one row and for rows of different lengths, and re-captures after
    a re-plan."""
    path = families["mixtral"]
    kw = dict(dtype="bfloat16", max_context=96, max_batch=3, offload_policy="cpu", experts=experts, expert_cache=False)

    def budget(residents: int) -> int:  # in this dtype and format
        probe = LLM(path, device="cuda", **{**kw, "gpu_memory": "8GiB"})
        p = probe.placement
        probe.close()
        return p.always_bytes + p.kv_bytes + p.workspace_bytes + residents * p.expert_bytes

    kw["gpu_memory"] = budget(3)
    fast = LLM(path, device="cuda", **kw)
    eager = LLM(path, device="cuda", cuda_graphs=False, **kw)
    monkeypatch.setenv("CADENZA_STREAM_CPU", "0")
    slow = LLM(path, device="cuda", cuda_graphs=False, **kw)
    try:
        assert fast.orchestra.streamed is not None, fast.orchestra.streamed_reason
        assert slow.orchestra.streamed is None and fast.placement.resident_count == 3
        prompt = [3, 4, 5, 6, 7]
        want = slow.generate(prompt, GREEDY)
        for llm in (fast, eager):
            got = llm.generate(prompt, GREEDY)
            assert got.token_ids == want.token_ids
            assert got.stats.decode_syncs == 0 < want.stats.decode_syncs
            assert got.stats.expert_work == want.stats.expert_work and got.stats.expert_work["cpu"] > 0
        g = fast.engine.graphs
        assert g.replays >= 11 and all(len(c.segments) == 1 for c in g.graphs.values()), "one graph per step"
        prompts = [[3, 4, 5, 6, 7], [8, 9], list(range(10, 30))]
        assert _tokens(fast, prompts) == _tokens(slow, prompts)
        before = g.captures
        bigger = budget(6)
        for llm in (fast, slow):
            llm.replan(gpu_memory=bigger)
        assert fast.orchestra.streamed is not None, fast.orchestra.streamed_reason
        assert fast.placement.resident_count > 3, fast.placement.resident_count
        assert _tokens(fast, [prompt]) == _tokens(slow, [prompt])
        assert g.captures > before
    finally:
        for llm in (fast, eager, slow):
            llm.close()


@pytest.mark.gpu
def test_a_crossing_cuts_the_step_and_copies_between_its_graphs():
    """Recorder.crossing (a block boundary of a layer split): the graph so far ends, the moved tensor gets a static
    copy refreshed eagerly on replay, and the next graph reads the copy; the segments replay in order, each on its
    device, and every graph of a device shares one pool. (On one GPU: both sides cuda:0.)"""
    dev = torch.device("cuda:0")
    x = torch.zeros(4, device=dev)
    rec = graphs.Recorder({}, dev)
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(stream):
        rec.begin()
        y = x * 2
        with rec.crossing(dev) as move:
            there = move(y)
        assert there.data_ptr() != y.data_ptr()
        z = there + 1
        rec.end()
    torch.cuda.current_stream(dev).wait_stream(stream)
    kinds = [(d, isinstance(seg, torch.cuda.CUDAGraph)) for d, seg in rec.segments]
    assert kinds == [(dev, True), (dev, False), (dev, True)] and list(rec.pools) == [dev]
    step = graphs.Captured(x, None, segments=rec.segments)
    for v in (1.0, 3.0, -2.0):
        x.fill_(v)
        step.replay()
        torch.cuda.synchronize(dev)
        assert torch.equal(z, torch.full_like(z, 2 * v + 1))
