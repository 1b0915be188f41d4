"""The offload decision as pure functions (cadenza.moe.offload.policy, options): every branch read without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cadenza.errors import CadenzaError
from cadenza.moe.offload import policy
from cadenza.moe.offload.costmodel import CostModel
from cadenza.moe.offload.options import OffloadOptions
from cadenza.moe.offload.policy import Route


def cost(cpu_s: float, fetch_s: float) -> CostModel:
    """A cost model whose CPU takes cpu_s per expert-token and whose link takes fetch_s per expert."""
    return CostModel(key="test", cpu_s=(cpu_s, 0.0), h2d_gb_s=1.0 / fetch_s, expert_bytes=1_000_000_000,
                     gpu_s=(0.0, 0.0), alone_scale=1.0)  # fmt: skip


def test_route_each_way():
    assert policy.route(1, True, True, False, False) is Route.GPU
    assert policy.route(1, True, False, True, True) is Route.STREAMED  # streaming wins over capturing
    assert policy.route(1, True, False, False, True) is Route.BETWEEN_GRAPHS
    assert policy.route(1, True, False, False, False) is Route.HOST
    many = policy.DECODE_MAX_TOKENS + 1
    assert policy.route(many, True, True, True, False) is Route.HOST  # prefill never uses the decode kernels
    assert policy.route(1, False, True, False, False) is Route.HOST  # no decode kernels: the host runs it
    # grouped products (gpu_grouped) take any number of tokens without the host: all resident, no read-back; with
    # misses the host still splits them, but computes both sides' shares through the same launches
    assert policy.route(many, True, True, True, False, grouped=True) is Route.GPU
    assert policy.route(many, True, False, True, True, grouped=True) is Route.BETWEEN_GRAPHS
    assert policy.uses_decode_kernels(many, True, grouped=True) and not policy.uses_decode_kernels(many, True)


def test_grouped_products_are_off_unless_asked(monkeypatch):
    from cadenza.kernels import gpu_grouped
    from cadenza.moe.gpu_side import ExpertLayout

    int4 = ExpertLayout("int4", 64, 256, 512, "silu")
    monkeypatch.delenv(gpu_grouped.ENV, raising=False)
    assert not int4.grouped(torch.device("cpu")) and not ExpertLayout("plain", 0, 8, 8, "silu").grouped("cpu")
    monkeypatch.setenv(gpu_grouped.ENV, "1")  # asked, but the package's kernels do not run on the CPU
    assert int4.grouped(torch.device("cpu")) == gpu_grouped.available(torch.device("cpu"))


def test_grouped_products_only_for_formats_a_gpu_checked(monkeypatch):
    from cadenza.kernels import gpu_grouped

    monkeypatch.setattr(gpu_grouped, "available", lambda device: True)
    for fmt in ("int4", "q4_k", "q4_k+q6_k", "q4_0", "mxfp4", "q4_0+q6_k", "int8", "bf16", "q8_0", "q5_k+q6_k"):
        assert gpu_grouped.checked(fmt) and gpu_grouped.enabled(torch.device("cuda"), fmt), fmt
    for fmt in ("q6_k", "q6_k+q4_k"):  # q6_k's gate/up: not yet run on a GPU
        assert not gpu_grouped.checked(fmt) and not gpu_grouped.enabled(torch.device("cuda"), fmt), fmt
    monkeypatch.setenv(gpu_grouped.ENV, "all")  # every format, to check the rest on a GPU
    assert gpu_grouped.enabled(torch.device("cuda"), "q6_k")
    monkeypatch.setenv(gpu_grouped.ENV, "0")
    assert not gpu_grouped.enabled(torch.device("cuda"), "int4")


def test_split_per_policy():
    misses, counts = [1, 2], [0, 3, 1]
    cm = cost(cpu_s=1.0, fetch_s=0.1)  # the link is much faster: auto fetches
    cpu, fetch, auto = (OffloadOptions(policy=p) for p in ("cpu", "fetch", "auto"))
    assert policy.split(cpu, misses, counts, cm, True, True) == ([], [1, 2], {})
    assert policy.split(fetch, misses, counts, cm, True, True) == ([1, 2], [], {})
    assert policy.split(auto, misses, counts, None, True, True) == ([1, 2], [], {})  # before calibration: fetch
    assert policy.split(auto, misses, counts, cm, False, True) == ([], [1, 2], {})  # no fetch slots: the CPU
    fetched, on_cpu, shares = policy.split(auto, misses, counts, cm, True, True)
    assert sorted(fetched + on_cpu) == [1, 2] and shares == {}
    assert fetched == cm.split(misses, counts)[0]


def test_split_rows_are_multiples_of_16_within_the_matrix():
    rows = policy.split_rows({3: 0.5, 4: 1.0, 5: 0.01}, 100)
    assert rows == {3: 48, 4: 96, 5: 0} and all(r % 16 == 0 and r <= 100 for r in rows.values())


def test_fetch_slots_and_prefetch_defaults():
    assert policy.fetch_slots("cpu", 8) == 0
    assert policy.fetch_slots("auto", 1) == 2 and policy.fetch_slots("fetch", 8) == 8
    assert policy.prefetch_on(OffloadOptions(policy="fetch")) and not policy.prefetch_on(OffloadOptions())
    assert policy.prefetch_on(OffloadOptions(policy="auto", prefetch=True))
    assert not policy.prefetch_on(OffloadOptions(policy="fetch", prefetch=False))


def test_guess_and_prefetch_picks():
    assert policy.wants_guess(True, True, True, True, 1, False)
    for i in range(4):  # each condition alone turns it off
        args = [True, True, True, True]
        args[i] = False
        assert not policy.wants_guess(*args, 1, False)
    assert not policy.wants_guess(True, True, True, True, policy.PREFETCH_MAX_TOKENS + 1, False)
    assert not policy.wants_guess(True, True, True, True, 1, True)  # the next layer is all resident
    counts = [0, 5, 1, 3, 2]
    assert policy.prefetch_picks(counts, {3: 0}, num_slots=4) == [1, 4]  # most guessed first, half the slots
    assert policy.prefetch_picks(counts, set(), num_slots=1) == [1]  # at least one


def test_fetch_ahead_for_steps_that_want_the_whole_layer():
    fetch, auto = OffloadOptions(policy="fetch"), OffloadOptions(policy="auto")
    # top-2 of 8: 11 tokens leave an expert unused with chance 0.75^11 = 0.042; 10 tokens 0.056
    assert policy.fetch_ahead(fetch, True, True, False, 11, 2, 8) and policy.fetch_ahead(
        auto, True, True, False, 512, 2, 8
    )
    assert not policy.fetch_ahead(fetch, True, True, False, 10, 2, 8)
    assert not policy.fetch_ahead(fetch, True, True, False, 1, 2, 8)  # decode: the guesses' business
    # top-8 of 128 needs more: 0.9375^47 = 0.048
    assert policy.fetch_ahead(fetch, True, True, False, 47, 8, 128) and not policy.fetch_ahead(
        fetch, True, True, False, 46, 8, 128
    )
    assert not policy.fetch_ahead(OffloadOptions(policy="cpu"), True, True, False, 512, 2, 8)  # nothing fetched
    assert not policy.fetch_ahead(OffloadOptions(policy="fetch", prefetch=False), True, True, False, 512, 2, 8)
    assert not policy.fetch_ahead(fetch, False, True, False, 512, 2, 8)  # no slots
    assert not policy.fetch_ahead(fetch, True, False, False, 512, 2, 8)  # the last layer
    assert not policy.fetch_ahead(fetch, True, True, True, 512, 2, 8)  # the next layer is all resident


def test_big_steps_keep_slots_for_a_boundarys_copies_and_spread_the_residents():
    mb = 1 << 20
    # Mixtral's int4 experts (96 MB): 2 slots at small batches, a whole layer's 8 where steps want every expert
    # (policy.AHEAD_BYTES is 320 MiB: waves of half the slots, the next layer copied ahead into the half freed first);
    # bf16 (352 MB) stays at 2
    assert (
        policy.fetch_slots("fetch", 2, 0, 10, 8, 96 * mb) == 2 and policy.fetch_slots("auto", 2, 0, 11, 8, 96 * mb) == 8
    )
    assert policy.fetch_slots("fetch", 2, 0, 512, 8, 352 * mb) == 2
    # small experts: dozens (Qwen3-30B's 2.5 MB: 128), never more than a layer's; nothing under `cpu`
    assert policy.fetch_slots("fetch", 8, 0, 512, 128, int(2.5 * mb)) == 128
    assert policy.fetch_slots("fetch", 8, 0, 512, 128, 8 * mb) == 80  # 2 x 320 MiB of 8 MiB experts
    assert policy.fetch_slots("fetch", 8, 0, 46, 128, 8 * mb) == 8  # 46 tokens may leave an expert unused
    assert policy.fetch_slots("cpu", 2, 0, 512, 8, 96 * mb) == 0
    assert policy.fetch_slots("fetch", 2, 8, 1, 8, 96 * mb) == 8  # micro-batches: a layer's, whatever the batch
    # where the residents go: spread when full steps want every expert and the policy fetches them
    assert policy.placement_fill("fetch", 11, 2, 8) == "spread" == policy.placement_fill("auto", 512, 8, 128)
    assert policy.placement_fill("auto", 10, 2, 8) == "layers" == policy.placement_fill("cpu", 512, 2, 8)
    assert policy.placement_fill("fetch", 1, 2, 8) == "layers"


def test_stream_unavailable_reasons():
    auto = OffloadOptions()
    fast_cpu = cost(cpu_s=0.1, fetch_s=0.1)
    assert policy.stream_unavailable(auto, True, True, True, fast_cpu, None) is None
    assert "CADENZA_STREAM_CPU=0" in policy.stream_unavailable(dataclasses.replace(auto, stream_cpu="off"), True,
                                                                True, True, fast_cpu, None)  # fmt: skip
    assert "fused CPU kernel" in policy.stream_unavailable(auto, False, True, True, fast_cpu, None)
    assert "cuLaunchHostFunc" in policy.stream_unavailable(auto, True, True, False, fast_cpu, None)
    assert policy.stream_unavailable(auto, True, False, False, fast_cpu, None) is None  # no CUDA: no driver needed
    assert policy.stream_unavailable(auto.with_policy("fetch"), True, True, True, fast_cpu, None).startswith(
        "the fetch policy"
    )
    assert "no cost model" in policy.stream_unavailable(auto, True, True, True, None, None)
    assert "3.0x" in policy.stream_unavailable(auto, True, True, True, fast_cpu, 0.3)  # the measured CPU time wins
    assert policy.stream_unavailable(auto.with_policy("cpu"), True, True, True, None, None) is None
    prefetching = dataclasses.replace(auto, prefetch=True)
    assert "speculative prefetch" in policy.stream_unavailable(prefetching, True, True, True, fast_cpu, None)


def test_host_seconds_per_expert():
    cm = cost(cpu_s=0.3, fetch_s=0.1)
    assert policy.host_seconds_per_expert("cpu", cm) == pytest.approx(cm.cpu_time(1))
    assert policy.host_seconds_per_expert("fetch", cm) == pytest.approx(cm.fetch_time(1))
    assert policy.host_seconds_per_expert("auto", cm) == pytest.approx(min(cm.cpu_time(1), cm.fetch_time(1)))


def test_options_from_the_environment():
    env = {"CADENZA_SPLIT_EXPERTS": "1", "CADENZA_STREAM_CPU": "host", "CADENZA_CPU_KERNEL": "0",
           "CADENZA_GPU_KERNEL": "0", "CADENZA_CPU_PREFETCH": "4096"}  # fmt: skip
    o = OffloadOptions(policy="cpu").with_env(env)
    assert (o.policy, o.split_experts, o.stream_cpu, o.cpu_kernel, o.gpu_kernel, o.cpu_prefetch) == (
        "cpu",
        True,
        "host",
        False,
        False,
        4096,
    )
    assert OffloadOptions().with_env({"CADENZA_STREAM_CPU": "0"}).stream_cpu == "off"
    assert OffloadOptions().with_env({}) == OffloadOptions()
    with pytest.raises(CadenzaError, match="CADENZA_CPU_PREFETCH"):
        OffloadOptions().with_env({"CADENZA_CPU_PREFETCH": "lots"})
    with pytest.raises(CadenzaError, match="Unknown offload policy"):
        OffloadOptions(policy="gpu")
    with pytest.raises(CadenzaError, match="cpu_threads"):
        OffloadOptions(cpu_threads=0)
    assert OffloadOptions(cpu_activations="exact").with_env({}).cpu_activations == "exact"
    assert OffloadOptions().with_env({"CADENZA_CPU_ACTIVATIONS": "INT8"}).cpu_activations == "int8"
    with pytest.raises(CadenzaError, match="CADENZA_CPU_ACTIVATIONS='int4': use auto, exact or int8"):
        OffloadOptions().with_env({"CADENZA_CPU_ACTIVATIONS": "int4"})
    with pytest.raises(CadenzaError, match="cpu_activations='int4' is not valid"):
        OffloadOptions(cpu_activations="int4")
