"""The KV cache in host memory (`kv_cache="host"`, `--kv-cache host`): attention on the CPU over the host cache
while the rest of the model runs on the GPU; the same tokens as the GPU cache, the budget left to experts."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from cadenza import LLM, CadenzaError, SamplingParams
from cadenza.kernels import cpu_attention
from cadenza.kv_cache import KVCache
from cadenza.moe.offload.policy import fetch_slots
from tests.conftest import budget_for, make_deepseek
from tests.test_graphs import FAMILIES, families  # noqa: F401 (the module's fixture)

# their caches are MLA's latent or linear layers' states: no host cache (refused: below and test_qwen3_next.py)
MLA_FAMILIES = ("deepseek_v2", "glm4_moe_lite", "qwen3_next", "qwen3_5_moe")

GREEDY = SamplingParams(temperature=0, max_tokens=6)
PROMPTS = [[3, 4, 5, 6, 7], [8, 9], list(range(10, 30))]


def _tokens(llm, prompts):
    return [r.token_ids for r in llm.generate(prompts, GREEDY)]


@contextlib.contextmanager
def _gpu_and_host(path, gpu_kw: dict | None = None, **kw):
    """The same model twice: the KV cache where the device keeps it, and in host memory; both closed after."""
    a, b = LLM(path, **(gpu_kw or {}), **kw), LLM(path, kv_cache="host", **kw)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_bad_values_and_mla_are_refused(mixtral_dir, tmp_path):
    with pytest.raises(CadenzaError, match="kv_cache='disk'.*Use gpu or host"):
        LLM(mixtral_dir[0], device="cpu", kv_cache="disk")
    path = make_deepseek(tmp_path / "dsv2", version=2)[0]
    with pytest.raises(CadenzaError, match="needs ordinary keys and values.*MLA.*--kv-cache gpu"):
        LLM(path, device="cpu", kv_cache="host")


def test_host_cache_leaves_the_budget_to_experts_and_the_tokens_unchanged(mixtral_dir):
    """On the emulated GPU side (device cpu) the placement leaves the KV cache out of the budget, so the same budget
    holds more resident experts; the tokens are the GPU cache's."""
    path = mixtral_dir[0]
    budget = budget_for(path, 2, 0, max_context=96)
    kw = dict(device="cpu", dtype="float32", gpu_memory=budget, offload_policy="cpu", max_context=96, max_batch=3)
    with _gpu_and_host(path, **kw) as (gpu, host):
        assert gpu.placement.kv_bytes > 0 and host.placement.kv_bytes == 0
        assert host.placement.resident_count > gpu.placement.resident_count
        # (the residents differ, the sums are the same experts'; fp32 on one device: the same tokens)
        assert _tokens(host, PROMPTS) == _tokens(gpu, PROMPTS)


def test_cache_on_host_and_its_growth_failure(monkeypatch):
    assert not KVCache(2, 3, 2, 8, 64, torch.float32, "cpu").hosted
    cache = KVCache(2, 3, 2, 8, 64, torch.float32, "cpu").on_host(torch.device("cpu"))
    assert cache.compute_device == torch.device("cpu") and cache.hosted
    with pytest.raises(ValueError, match="on the CPU device"):
        KVCache(2, 3, 2, 8, 64, torch.float32, "meta").on_host(torch.device("cpu"))

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(torch, "zeros", no_memory)
    with pytest.raises(CadenzaError, match=r"Host memory ran out growing the KV cache of 3 sequences.*--max-batch"):
        cache.ensure(10)
    assert cache.capacity == 0  # nothing half-grown


def test_batch_command_with_host_cache(mixtral_dir, tmp_path):
    from tests.cli.test_cli import cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p, "max_tokens": 4}) + "\n" for p in PROMPTS))
    outs = []
    for kv in ("gpu", "host"):
        out = tmp_path / f"{kv}.jsonl"
        r = cli("batch", "--model", str(mixtral_dir[0]), "--device", "cpu", "--dtype", "float32", "--prompts",
                str(prompts), "--out", str(out), "--temperature", "0", "--kv-cache", kv)  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs.append([json.loads(line)["token_ids"] for line in out.read_text().splitlines()])
    assert outs[0] == outs[1] and len(outs[0]) == 3


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MLA_FAMILIES])
def test_host_cache_path_on_the_cpu(families, family, monkeypatch):  # noqa: F811
    """On the CPU the host cache takes the same path as on a GPU (decode attention by cadenza's kernel over the
    cache's views, prefill by torch): the default path's tokens (fp32), for rows of different lengths, windows,
    chunks and sinks."""
    path = families[family]
    kw = dict(device="cpu", dtype="float32", max_context=96)
    real, answered = cpu_attention.decode, []

    def counted(*a, **k):
        out = real(*a, **k)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(cpu_attention, "decode", counted)
    with _gpu_and_host(path, **kw) as (plain, host):
        assert host.engine.cache_for(2, 32).hosted and not plain.engine.cache_for(2, 32).hosted
        want = _tokens(plain, PROMPTS)  # (a CPU run's decode steps take the kernel too)
        answered.clear()
        assert _tokens(host, PROMPTS) == want
        assert answered and all(answered) == cpu_attention.available()  # every decode step's layers, by the kernel
        ids = PROMPTS[2]
        assert torch.allclose(host.score(ids), plain.score(ids), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in MLA_FAMILIES])
def test_host_cache_equals_gpu_cache_on_the_device(families, family):  # noqa: F811
    """Keys and values copied to host memory as they are written, attention on the CPU (sinks, windows, chunks,
    rows of different lengths), the rest on the GPU: the GPU cache's tokens and scores, eagerly (no graphs)."""
    path = families[family]
    kw = dict(device="cuda", dtype="float32", max_context=96, max_batch=3)
    with _gpu_and_host(path, {"cuda_graphs": False}, **kw) as (gpu, host):
        assert not host.engine.graphs.enabled and "host memory" in host.engine.graphs.reason
        assert _tokens(host, PROMPTS) == _tokens(gpu, PROMPTS)
        cache = host.engine.cache_for(2, 32)
        assert cache.hosted and cache.device.type == "cpu" and cache.compute_device.type == "cuda"
        ids = PROMPTS[2]
        assert torch.allclose(host.score(ids), gpu.score(ids), atol=1e-5)


@pytest.mark.gpu
def test_host_cache_with_experts_off_the_gpu(families):  # noqa: F811
    path = families["mixtral"]
    budget = budget_for(path, 2, 0, device="cuda", max_context=96)
    kw = dict(device="cuda", dtype="float32", gpu_memory=budget, offload_policy="cpu", max_context=96, max_batch=3)
    with _gpu_and_host(path, {"cuda_graphs": False}, **kw) as (gpu, host):
        assert host.placement.kv_bytes == 0 and host.placement.resident_count > gpu.placement.resident_count
        assert _tokens(host, PROMPTS) == _tokens(gpu, PROMPTS)


def test_replan_moves_the_cache_between_requests(mixtral_dir):
    path = mixtral_dir[0]
    budget = budget_for(path, 2, 0, max_context=96)
    kw = dict(device="cpu", dtype="float32", gpu_memory=budget, offload_policy="cpu", max_context=96, max_batch=3)
    llm = LLM(path, **kw)
    try:
        want = _tokens(llm, PROMPTS)
        before = llm.placement.resident_count
        llm.replan(gpu_memory=budget, max_batch=4, kv_cache="host")
        assert llm.kv_cache == "host" and llm.max_batch == 4 and llm.engine.kv_host
        assert llm.placement.kv_bytes == 0 and llm.placement.resident_count > before
        assert _tokens(llm, PROMPTS) == want
        llm.replan(gpu_memory=budget, kv_cache="gpu", max_batch=3)
        assert not llm.engine.kv_host and llm.placement.kv_bytes > 0 and llm.placement.resident_count == before
        with pytest.raises(CadenzaError, match="kv_cache='ram'"):
            llm.replan(kv_cache="ram", gpu_memory=budget)
        with pytest.raises(CadenzaError, match="max_batch=0"):
            llm.replan(max_batch=0, gpu_memory=budget)
        assert llm.kv_cache == "gpu" and llm.max_batch == 3  # a refused change changes nothing
    finally:
        llm.close()


@pytest.mark.gpu
def test_replan_between_gpu_and_host_cache_on_the_device(families):  # noqa: F811
    path = families["mixtral"]
    llm = LLM(path, device="cuda", dtype="float32", max_context=96, max_batch=3)
    try:
        want = _tokens(llm, PROMPTS)
        assert llm.engine.graphs.enabled
        llm.replan(kv_cache="host", max_batch=4)
        assert not llm.engine.graphs.enabled and _tokens(llm, PROMPTS) == want
        llm.replan(kv_cache="gpu")
        assert llm.engine.graphs.enabled, llm.engine.graphs.reason
        assert _tokens(llm, PROMPTS) == want
    finally:
        llm.close()


def test_micro_batches_decode_the_same_tokens(mixtral_dir):
    """A step's rows as 2 micro-batches in threads (the orchestrated experts one layer call at a time): the tokens of
    one batch, for rows of different lengths, with experts on the emulated GPU side and on the CPU."""
    path = mixtral_dir[0]
    budget = budget_for(path, 2, 0, max_context=96)
    kw = dict(device="cpu", dtype="float32", gpu_memory=budget, offload_policy="cpu", max_context=96, max_batch=20)
    prompts = [list(range(3, 3 + 1 + i % 7)) for i in range(19)]
    one, two = LLM(path, kv_cache="host", **kw), LLM(path, kv_cache="host", micro_batches=2, **kw)
    calls = []
    real = two.engine.micro.decode
    two.engine.micro.decode = lambda *a: calls.append(len(a[3])) or real(*a)
    try:
        assert _tokens(two, prompts) == _tokens(one, prompts)
        assert calls and max(calls) == 19 and not two.orchestra.concurrent  # split while >= 16 rows decoded
        assert two.engine.micro.count == 2
    finally:
        one.close()
        two.close()


def test_micro_batches_need_the_host_cache(mixtral_dir):
    with pytest.raises(CadenzaError, match="micro_batches=2.*needs the KV cache in host memory.*--kv-cache host"):
        LLM(mixtral_dir[0], device="cpu", micro_batches=2)
    with pytest.raises(CadenzaError, match="micro_batches=0"):
        LLM(mixtral_dir[0], device="cpu", kv_cache="host", micro_batches=0)


@pytest.mark.gpu
@pytest.mark.parametrize("offloaded", [False, True])
def test_micro_batches_on_the_device(families, offloaded):  # noqa: F811
    """Two threads, two streams: one micro-batch's CPU attention beside the other's GPU work; the same tokens."""
    path = families["mixtral"]
    kw = dict(device="cuda", dtype="float32", max_context=96, max_batch=20, kv_cache="host")
    if offloaded:
        kw |= dict(gpu_memory=budget_for(path, 2, 2, device="cuda", max_context=96), offload_policy="auto")
    prompts = [list(range(3, 3 + 1 + i % 7)) for i in range(19)]
    one, two = LLM(path, **kw), LLM(path, micro_batches=2, **kw)
    try:
        assert _tokens(two, prompts) == _tokens(one, prompts)
    finally:
        one.close()
        two.close()


def test_micro_batches_balance_the_cache_they_read():
    from cadenza.micro_batches import MicroBatches

    mb = MicroBatches(2, torch.device("cpu"))
    try:
        parts = mb.split([100, 1, 1, 1, 50, 49])
        assert sorted(i for p in parts for i in p) == list(range(6)) and [len(p) for p in parts] == [3, 3]
        loads = [sum([100, 1, 1, 1, 50, 49][i] for i in p) for p in parts]
        assert abs(loads[0] - loads[1]) <= 2  # 101 and 101, not rows 0-2 (102) against 3-5 (100) by luck
        assert all(p == sorted(p) for p in parts)
        assert not mb.applies(15) and mb.applies(16)
    finally:
        mb.close()
    three = MicroBatches(3, torch.device("cpu"))
    assert [len(p) for p in three.split([5] * 7)] == [3, 2, 2]
    three.close()


def test_micro_batches_keep_a_layer_of_fetch_slots(mixtral_dir):
    """Two micro-batches want the same layer's experts one after the other: slots for a whole layer, so the second
    finds the first's fetches (tokens unchanged, fp32)."""
    path = mixtral_dir[0]
    budget = budget_for(path, 2, 4, max_context=96)
    kw = dict(device="cpu", dtype="float32", gpu_memory=budget, offload_policy="auto", max_context=96, max_batch=20)
    prompts = [list(range(3, 3 + 1 + i % 7)) for i in range(17)]
    one, two = LLM(path, kv_cache="host", **kw), LLM(path, kv_cache="host", micro_batches=2, **kw)
    try:
        experts = two.config.num_local_experts
        assert two.placement.fetch_slots == experts
        # (one's steps of up to 20 want every expert too: its slots are policy.AHEAD_BYTES's, at most a layer)
        eb = one.placement.expert_bytes
        assert one.placement.fetch_slots == fetch_slots("auto", 2, 0, 20, experts, eb) == experts
        assert fetch_slots("auto", 2, experts, 1, experts, eb) == experts > fetch_slots("auto", 2, 0, 1, experts, eb)
        assert _tokens(two, prompts) == _tokens(one, prompts)
    finally:
        one.close()
        two.close()
