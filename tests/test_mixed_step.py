"""A decode step and a prompt group's prefill as one pass (Engine.mixed, CausalLM.forward_mixed): each part's logits
equal its own pass's, the tokens of a batch whose prompts are prefilled inside the decode steps equal each prompt
generated alone, for every family (Phi-MoE's passes do not mix: it keeps separate ones), and an offline job with
experts offloaded takes its prompts that way."""

from __future__ import annotations

import pytest
import torch

from cadenza import LLM, SamplingParams
from cadenza.batch import Batch
from tests.conftest import budget_for, prompt_ids
from tests.models.test_families import GREEDY_MODELS

GREEDY = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)


def run(llm, prompts, slots: int, per_step: int | None, mix: bool) -> list[list[int]]:
    batch = Batch(llm.engine, slots, 40, prefill_per_step=per_step, mix=mix)
    reqs = [batch.add(p, GREEDY) for p in prompts]
    while len(batch):
        batch.step()
    return [r.gen.token_ids for r in reqs]


@pytest.mark.parametrize("family", list(GREEDY_MODELS))
def test_prompts_prefilled_inside_decode_steps_equal_each_alone(tmp_path, family):
    path, _ = GREEDY_MODELS[family](tmp_path / "m")
    llm = LLM(path, device="cpu", dtype="float32")
    mixes = llm.engine.model.mixes_passes
    assert mixes == (family != "phimoe")
    lengths = (6, 9, 9, 5, 8) if llm.engine.model.pads_prompts else (8,) * 5
    prompts = [prompt_ids(n, seed=70 + i) for i, n in enumerate(lengths)]
    alone = [llm.generate(p, GREEDY).token_ids for p in prompts]
    before = llm.engine.passes.snapshot()
    # 3 slots and at most 10 prompt tokens a step: prompts join while others decode, two slots free up mid-way
    assert run(llm, prompts, 3, 10, mix=True) == alone
    kinds = llm.engine.passes.since(before)
    assert ("mixed" in kinds) == mixes, kinds
    assert kinds["decode"]["passes"] > 0


def test_mixed_logits_equal_separate_passes(tmp_path):
    path, _ = GREEDY_MODELS["llama4"](tmp_path / "m")  # chunked attention layers: per-part contexts
    llm = LLM(path, device="cpu", dtype="float32")
    engine = llm.engine
    model = engine.model
    first = [prompt_ids(n, seed=80 + n) for n in (11, 6)]
    later = [prompt_ids(n, seed=90 + n) for n in (5, 4, 5)]
    caches = [model.new_cache(32, torch.float32, llm.device, batch=5) for _ in range(2)]
    for c in caches:  # rows 0 and 1 hold prompts of different lengths (a decode step's rows differ in length)
        for r, p in enumerate(first):
            engine.forward(p, c, last_only=True, rows=[r])
    tokens = [7, 9]
    sep_decode = engine.decode(tokens, caches[0], [0, 1])
    sep_prefill = engine.prefill_group(later, caches[0], [4, 2, 3])
    mixed_decode, mixed_prefill = engine.mixed(tokens, [0, 1], later, [4, 2, 3], caches[1])
    torch.testing.assert_close(mixed_decode, sep_decode, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed_prefill, sep_prefill, rtol=1e-5, atol=1e-5)
    assert caches[1].lengths == caches[0].lengths == [12, 7, 4, 5, 5]
    # the caches hold the same keys afterwards: one more step from both agrees
    torch.testing.assert_close(
        engine.decode([3, 4, 5, 6, 8], caches[1], [0, 1, 2, 3, 4]),
        engine.decode([3, 4, 5, 6, 8], caches[0], [0, 1, 2, 3, 4]),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("policy", ["cpu", "fetch"])
def test_offline_job_with_offloaded_experts_mixes(tmp_path, policy):
    path, _ = GREEDY_MODELS["mixtral"](tmp_path / "m")
    # passes of at most 20 tokens (prefill_chunk): the prompts join over several steps
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=budget_for(path, 2), offload_policy=policy,
              prefill_chunk=20)  # fmt: skip
    try:
        assert llm.engine.prefill_chunk == 20
        prompts = [prompt_ids(n, seed=100 + i) for i, n in enumerate((7, 8, 8, 8, 3, 9, 6))]
        alone = [llm.generate(p, GREEDY).token_ids for p in prompts]
        before = llm.engine.passes.snapshot()
        assert [r.token_ids for r in llm.generate(prompts, GREEDY, mode="throughput")] == alone
        kinds = llm.engine.passes.since(before)
        # only the first step prefills apart (no decode rows yet): no prompt is split to fill a step's budget
        assert kinds["mixed"]["passes"] > 0 and kinds["prefill"]["passes"] == 1, kinds
    finally:
        llm.close()


def test_mixing_batches_capture_a_graph_only_for_a_size_that_repeats(tmp_path, monkeypatch):
    """With mix, the decode steps' sizes change as prompts join and groups finish: a size seen for the first time
    runs eagerly (capture=False: a graph only if one is captured already), a size repeating is captured."""
    from cadenza.engine import Engine

    path, _ = GREEDY_MODELS["mixtral"](tmp_path / "m")
    llm = LLM(path, device="cpu", dtype="float32")
    seen: list[tuple[int, bool]] = []
    real = Engine.decode

    def spy(self, token_ids, cache, rows, capture=True):
        seen.append((len(rows), capture))
        return real(self, token_ids, cache, rows, capture)

    monkeypatch.setattr(Engine, "decode", spy)
    prompts = [prompt_ids(4, seed=130 + i) for i in range(5)]
    sp = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 6, 6, 9, 9)]
    batch = Batch(llm.engine, 5, 40, mix=True)
    for p, s in zip(prompts, sp, strict=True):
        batch.add(p, s)
    while len(batch):
        batch.step()
    assert seen, "no decode steps"
    last = 0
    for rows, capture in seen:
        assert capture == (rows == last), seen
        last = rows
    assert any(c for _, c in seen) and not all(c for _, c in seen)


@pytest.mark.parametrize(("rows", "p", "want"), [(7, 4, 1), (30, 4, 8)])
def test_ramp_steps_counts_the_batch_starts_mixed_steps(tmp_path, rows, p, want):
    """cadenza.bench.throughput_job.ramp_steps (where a T1 timeline starts recording) against a Batch: (7, 4): 6
    prompts alone, then 1 beside their 6 rows; (30, 4): the rows fill the 24-token chunk after 8 mixed steps, and
    the rest are prefilled in passes of their own."""
    from cadenza.bench.throughput_job import ramp_steps

    path, _ = GREEDY_MODELS["mixtral"](tmp_path / "m")
    llm = LLM(path, device="cpu", dtype="float32")
    llm.engine.prefill_chunk = 24
    batch = Batch(llm.engine, rows, 40, prefill_per_step=24, mix=True)
    for i in range(rows):
        batch.add(prompt_ids(p, seed=110 + i), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    before = llm.engine.passes.snapshot()
    while batch.prefilling or batch.waiting:
        batch.step()
    mixed = llm.engine.passes.since(before)["mixed"]["passes"]
    assert mixed == ramp_steps(rows, p, 24) == want
    assert ramp_steps(512, 128, 2048) == 37 and ramp_steps(4, 6, 2048) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("experts", ["bf16", "int4"])
def test_cuda_offline_job_mixes(tmp_path, experts):
    """On a GPU: graphs for the full decode steps, eager mixed steps, fetched experts (grouped products for int4)."""
    path, _ = GREEDY_MODELS["mixtral"](tmp_path / "m")
    kw = dict(device="cuda", dtype="float32", experts=experts, max_batch=4, offload_policy="fetch")
    llm = LLM(path, gpu_memory=budget_for(path, 2, **{k: v for k, v in kw.items() if k != "offload_policy"}), **kw)
    try:
        prompts = [prompt_ids(n, seed=120 + i) for i, n in enumerate((7, 8, 8, 8, 3, 9, 6, 8, 5))]
        alone = [llm.generate(p, GREEDY).token_ids for p in prompts]
        before = llm.engine.passes.snapshot()
        llm.engine.prefill_chunk = 20
        assert [r.token_ids for r in llm.generate(prompts, GREEDY, mode="throughput")] == alone
        kinds = llm.engine.passes.since(before)
        # only the first step prefills apart (no decode rows yet): no prompt is split to fill a step's budget
        assert kinds["mixed"]["passes"] > 0 and kinds["prefill"]["passes"] == 1, kinds
    finally:
        llm.close()
