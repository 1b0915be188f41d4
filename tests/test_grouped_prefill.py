"""Prompts prefilled together (Batch._front_group, Engine.prefill_group): right-padded to the longest of the pass,
each row's logits at its own last position equal that prompt prefilled alone, and the tokens after equal each
prompt generated alone, for every family (padding where the family allows it, equal lengths where it does not),
with experts offloaded too; which prompts go together is a rule tested here on its own."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest
import torch

from cadenza import LLM, SamplingParams
from cadenza.batch import Batch
from cadenza.engine import Engine
from tests.conftest import budget_for, prompt_ids
from tests.models.test_families import GREEDY_MODELS


def _counting(monkeypatch) -> list[int]:
    """Records the size of every pass Engine.prefill_group runs."""
    sizes: list[int] = []
    real = Engine.prefill_group

    def spy(self, prompts, cache, rows):
        sizes.append(len(prompts))
        return real(self, prompts, cache, rows)

    monkeypatch.setattr(Engine, "prefill_group", spy)
    return sizes


@pytest.mark.parametrize("family", list(GREEDY_MODELS))
def test_prompts_prefilled_together_equal_each_alone(tmp_path, family, monkeypatch):
    path, _ = GREEDY_MODELS[family](tmp_path / "m")
    llm = LLM(path, device="cpu", dtype="float32")
    pads = llm.engine.model.pads_prompts
    lengths = (9, 11, 12, 12) if pads else (12, 12, 12, 12)
    prompts = [prompt_ids(n, seed=50 + i) for i, n in enumerate(lengths)]
    # the logits of each prompt's last position: one padded pass against each prompt alone
    cache = llm.engine.model.new_cache(16, torch.float32, llm.device, batch=4)
    together = llm.engine.prefill_group(prompts, cache, [3, 0, 2, 1])
    assert cache.lengths == [lengths[1], lengths[3], lengths[2], lengths[0]]
    for i, p in enumerate(prompts):
        one = llm.engine.model.new_cache(16, torch.float32, llm.device)
        alone = llm.engine.forward(p, one, last_only=True, rows=[0])[-1]
        torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)
    # greedy generation of the batch (one grouped pass) against each prompt alone
    sizes = _counting(monkeypatch)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = [llm.generate(p, sp).token_ids for p in prompts]
    assert sizes == []  # one prompt: prefilled alone
    assert [r.token_ids for r in llm.generate(prompts, sp, mode="throughput")] == alone
    assert sizes == [4]


@pytest.mark.parametrize("policy", ["cpu", "fetch"])
def test_grouped_prefill_with_offloaded_experts(tmp_path, monkeypatch, policy):
    path, _ = GREEDY_MODELS["mixtral"](tmp_path / "m")
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=budget_for(path, 2), offload_policy=policy)
    try:
        prompts = [prompt_ids(n, seed=60 + n) for n in (7, 8, 8, 8, 3)]
        sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        alone = [llm.generate(p, sp).token_ids for p in prompts]
        sizes = _counting(monkeypatch)
        assert [r.token_ids for r in llm.generate(prompts, sp)] == alone
        assert sizes == [4]  # 3 beside 8 makes 6 of 40 positions padding (> 1/8): it goes alone
    finally:
        llm.close()


def _batch(chunk: int, pads: bool, specs: list[tuple]) -> Batch:
    """A Batch whose engine has only what `_front_group` reads; specs: (length, prefilled, logprobs, cancelled)."""
    batch = Batch.__new__(Batch)
    batch.engine = SimpleNamespace(prefill_chunk=chunk, model=SimpleNamespace(pads_prompts=pads))
    batch.prefilling = deque(
        SimpleNamespace(
            prompt_ids=[1] * n, prefilled=done, params=SimpleNamespace(prompt_logprobs=top), cancelled=cancelled
        )
        for n, done, top, cancelled in specs
    )
    return batch


def _lengths(chunk, pads, lengths, budget=float("inf"), **change) -> list[int]:
    specs = [(n, 0, None, False) for n in lengths]
    for i, spec in change.items():
        specs[int(i[1:])] = spec
    return [len(s.prompt_ids) for s in _batch(chunk, pads, specs)._front_group(budget)]


def test_which_prompts_go_together():
    assert _lengths(64, True, [8] * 10) == [8] * 8  # the chunk: 8 x 8 positions
    assert _lengths(64, True, [6, 7, 7, 8, 8]) == [6, 7, 7, 8, 8]  # padding 4 of 40 positions
    assert _lengths(64, True, [2, 8, 8]) == [2]  # 6 of 16 padding: the short one alone
    assert _lengths(64, False, [7, 7, 8]) == [7, 7]  # a model that pads none: one length
    assert _lengths(64, True, [80, 8]) == []  # longer than the chunk: prefilled alone, in chunks
    assert _lengths(64, True, [8, 8, 8], budget=20) == [8, 8]  # the server's per-step budget
    assert _lengths(64, True, [8, 8, 8], x1=(8, 0, 5, False)) == [8]  # prompt log-probs: whole and alone
    assert _lengths(64, True, [8, 8, 8], x1=(8, 0, None, True)) == [8]  # a cancelled one stops the group
    assert _lengths(64, True, [8, 8, 8], x0=(8, 4, None, False)) == []  # partly prefilled: goes on alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
@pytest.mark.parametrize("kv", ["gpu", "host"])
def test_grouped_prefill_on_the_device(tmp_path, monkeypatch, kv):
    """On a GPU, experts partly resident (the rest fetched or on the CPU), the KV cache on the GPU (graphs for the
    decode steps after) or on the host: one padded pass, and each prompt's tokens as alone."""
    path, _ = GREEDY_MODELS["mixtral"](tmp_path / "m")
    budget = budget_for(path, 2, 2, device="cuda", max_context=64, max_batch=4)
    llm = LLM(path, device="cuda", dtype="float32", max_context=64, max_batch=4, gpu_memory=budget, kv_cache=kv)
    try:
        prompts = [prompt_ids(n, seed=70 + n) for n in (7, 8, 8, 8)]
        sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        alone = [llm.generate(p, sp).token_ids for p in prompts]
        sizes = _counting(monkeypatch)
        assert [r.token_ids for r in llm.generate(prompts, sp, mode="throughput")] == alone
        assert sizes == [4]
    finally:
        llm.close()
