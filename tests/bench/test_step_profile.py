"""`cadenza.bench.step_profile`: a decode step split into GPU kernels, transfers, CPU experts and overhead, per
layer and in total. On the CPU (plain, and the emulated offload path) the device columns are empty; a `gpu` test
checks them on CUDA."""

from __future__ import annotations

import json

import pytest

from cadenza import LLM, SamplingParams
from cadenza.bench.step_attribution import gaps, merge, overlap_ns, union_ns
from cadenza.bench.step_profile import StepProfile, _all_threads_config, profile_decode
from cadenza.errors import CadenzaError
from tests.conftest import budget_for, make_mixtral, prompt_ids

PROMPT = prompt_ids(8)
LAYERS = 2  # the tiny Mixtral's decoder layers
TIMES = ("wall_ms", "gpu_kernels_ms", "transfers_ms", "cpu_experts_ms", "overhead_ms")
SLACK_MS = 0.05  # perf_counter intervals moved onto the profiler's clock are off by a few microseconds


@pytest.fixture(scope="module")
def plain(mixtral_dir):
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32")
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def offloaded(mixtral_dir):
    """The emulated GPU side holding 3 of the 8 experts; the others computed by the CPU worker."""
    path = mixtral_dir[0]
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=budget_for(path, 3, 0), offload_policy="cpu")
    assert llm.placement.resident_count == 3
    yield llm
    llm.close()


def check(p: StepProfile) -> None:
    """What holds for every profile: one row per layer, times within their walls, JSON output."""
    assert len(p.layers) == LAYERS and p.layers_traced
    lines = p.table().splitlines()
    for i in range(LAYERS):
        assert sum(1 for line in lines if line.split()[0] == str(i)) == 1
    assert sum(1 for line in lines if line.split()[0] == "step") == 1
    rows = [p.step, p.outside, *p.layers, *p.steps, *(r for layers in p.layer_steps for r in layers)]
    for r in rows:
        assert all(getattr(r, f) >= 0 for f in TIMES), r
        assert r.overhead_ms <= r.wall_ms
        assert r.overhead_simple_ms <= r.wall_ms
    for total, layers in zip(p.steps, p.layer_steps, strict=True):
        assert sum(r.wall_ms for r in layers) <= total.wall_ms
        assert total.wall_ms > 0 and all(r.wall_ms > 0 for r in layers)
    # medians of the layers and of the steps come from the same steps: their sum is at most a little over
    assert sum(r.wall_ms for r in p.layers) <= 1.25 * p.step.wall_ms
    assert p.unprofiled_step_ms > 0 and p.profiler_slowdown is not None
    d = json.loads(json.dumps(p.as_dict()))
    assert len(d["layers"]) == LAYERS and len(d["per_step"]) == len(p.steps)
    assert d["step"]["wall_ms"] == round(p.step.wall_ms, 4)


def test_intervals():
    assert merge([(5, 7), (0, 2), (1, 3), (7, 9), (4, 4)]) == [(0, 3), (5, 9)]
    assert union_ns([(0, 10), (5, 15), (20, 25)]) == 20
    m = merge([(0, 10), (20, 30)])
    assert overlap_ns(m, 5, 25) == 10
    assert overlap_ns(m, 10, 20) == 0
    assert overlap_ns(m, -5, 100) == 20
    assert gaps(0, 100, [(10, 20), (50, 60)]) == [(0, 10), (20, 50), (60, 100)]
    assert gaps(0, 10, [(0, 10)]) == []


def test_plain_cpu_model(plain):
    """Nothing offloaded: no CPU expert work, no counters, no device events; all of the step is 'overhead'."""
    p = profile_decode(plain, PROMPT, steps=3, warmup=1)
    check(p)
    assert not p.cuda and p.device == "cpu" and p.cpu_experts_source == "none"
    for r in [p.step, p.outside, *p.layers]:
        assert r.cpu_experts_ms == 0 and r.gpu_kernels_ms == 0 and r.transfers_ms == 0
        assert r.syncs is None and r.launches is None and r.kernels is None
        assert r.overhead_ms == pytest.approx(r.wall_ms)
        assert r.overhead_simple_ms == pytest.approx(r.wall_ms)


@pytest.mark.parametrize("all_threads", [None, False])
def test_offloaded_cpu_experts(offloaded, all_threads):
    """The emulated offload path with the cpu policy: the worker's expert time shows, inside the layers; one
    synchronisation per MoE layer. all_threads=False measures the worker with perf_counter instead."""
    p = profile_decode(offloaded, PROMPT, steps=3, warmup=1, all_threads=all_threads)
    check(p)
    traced = all_threads is None and _all_threads_config() is not None
    assert p.cpu_experts_source == ("profiler" if traced else "perf_counter")
    assert p.step.cpu_experts_ms > 0
    assert all(r.cpu_experts_ms > 0 for r in p.steps)
    assert p.outside.cpu_experts_ms == 0  # every job starts inside its layer
    for total, layers in zip(p.steps, p.layer_steps, strict=True):
        assert sum(r.cpu_experts_ms for r in layers) == pytest.approx(total.cpu_experts_ms)
        assert total.cpu_experts_ms <= total.wall_ms
        assert total.overhead_ms <= total.wall_ms - total.cpu_experts_ms + SLACK_MS
        assert total.syncs == LAYERS and [r.syncs for r in layers] == [1] * LAYERS
        for r in layers:
            assert r.overhead_simple_ms >= -SLACK_MS
    assert "cpu-exp" in p.table()


def test_all_resident_has_no_cpu_experts(mixtral_dir):
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32", gpu_memory="8GiB", offload_policy="cpu")
    try:
        assert llm.placement.resident_count == llm.placement.total_experts
        p = profile_decode(llm, PROMPT, steps=2, warmup=1)
    finally:
        llm.close()
    check(p)
    assert p.step.cpu_experts_ms == 0 and p.step.syncs == LAYERS


def test_hooks_and_patches_are_removed(offloaded):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = offloaded.generate(PROMPT, params).token_ids
    layers = list(offloaded.model.model.layers)
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in layers]
    profile_decode(offloaded, PROMPT, steps=2, warmup=0)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in layers] == hooks
    assert all("_cpu_job" not in vars(layer) for layer in offloaded.orchestra.layers)
    assert offloaded.generate(PROMPT, params).token_ids == before


def test_refuses_bad_arguments(plain):
    with pytest.raises(CadenzaError, match="at least one"):
        profile_decode(plain, PROMPT, steps=0)
    with pytest.raises(CadenzaError, match="warm-up"):
        profile_decode(plain, PROMPT, warmup=-1)
    with pytest.raises(CadenzaError, match="context"):
        profile_decode(plain, prompt_ids(plain.engine.max_context - 4), steps=8)


@pytest.mark.gpu
def test_cuda_offloaded_step_has_kernels_and_transfers(tmp_path):
    """On CUDA with experts on the host: kernels and copies measured, attributed to the layers that launched
    them (eager steps), and the CPU experts' time from the worker."""
    path, _ = make_mixtral(tmp_path / "m", num_local_experts=8, num_hidden_layers=3)
    gpu_memory = budget_for(path, 6, 0, device="cuda")
    llm = LLM(path, device="cuda", dtype="float32", gpu_memory=gpu_memory, offload_policy="cpu")
    try:
        p = profile_decode(llm, PROMPT, steps=4, warmup=2, eager=True)
        engine_path = profile_decode(llm, PROMPT, steps=4, warmup=2)  # the engine's own step (CUDA graphs or not)
    finally:
        llm.close()
    assert p.cuda and p.layers_traced and len(p.layers) == 3
    assert p.step.gpu_kernels_ms > 0 and p.step.transfers_ms > 0 and p.step.cpu_experts_ms > 0
    assert p.step.kernels > 0 and p.step.launches > 0 and p.step.syncs == 3
    for r in p.layers:  # each layer launches kernels and copies its hidden state to the host
        assert r.gpu_kernels_ms > 0 and r.transfers_ms > 0 and r.launches > 0
        assert 0 <= r.overhead_ms <= r.wall_ms
    assert sum(r.wall_ms for r in p.layers) <= 1.25 * p.step.wall_ms
    assert engine_path.step.gpu_kernels_ms > 0 and engine_path.step.transfers_ms > 0
    json.dumps(p.as_dict())


def test_streamed_cpu_experts_are_measured(tmp_path):
    """CPU experts launched from the stream (bf16 experts, cpu policy: cadenza.moe.offload.streamed) run outside every
    traced thread; the profile takes their own perf_counter times: no synchronisation, CPU time measured."""
    path, _ = make_mixtral(tmp_path / "m", num_local_experts=8, num_hidden_layers=LAYERS)
    llm = LLM(path, device="cpu", dtype="bfloat16", gpu_memory=budget_for(path, 3, 0), offload_policy="cpu")
    try:
        if llm.orchestra.streamed is None:
            pytest.skip(f"not streamed here: {llm.orchestra.streamed_reason}")
        p = profile_decode(llm, PROMPT, steps=3, warmup=1)
    finally:
        llm.close()
    check(p)
    assert p.cpu_experts_source == "perf_counter"
    assert all(r.cpu_experts_ms > 0 and r.syncs == 0 for r in p.steps)
    assert p.step.cpu_experts_ms <= p.step.wall_ms
