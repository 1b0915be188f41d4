"""Placement over several GPUs (cadenza.moe.devices): a pure function of sizes and budgets."""

from __future__ import annotations

import pytest

from cadenza import CadenzaError
from cadenza.moe.devices import plan_devices, segment_sizes
from cadenza.moe.placement import ModelSizes, plan

GiB = 2**30
# Mixtral-8x7B-like, int4 experts: 32 layers of 8 experts of 90 MB; 1.6 GiB always-on; 128 KiB of KV a token
MIXTRAL = ModelSizes(
    always_bytes=int(1.6 * GiB), kv_bytes_per_token=128 * 1024, expert_bytes=90_000_000, num_moe_layers=32,
    num_experts=8,
)  # fmt: skip
WS = GiB // 2


def test_two_equal_gpus_split_evenly_and_hold_what_one_twice_as_large_holds_less_one_workspace():
    shares = plan_devices(MIXTRAL, [12 * GiB, 12 * GiB], 4096, WS, fetch_slots=2)
    assert [(s.first, s.stop) for s in shares] == [(0, 16), (16, 32)]
    for s in shares:
        assert s.placement.gpu_bytes <= 12 * GiB and len(s.placement.resident) == len(s.layers)
    one = plan(MIXTRAL, 24 * GiB - WS - 2 * 90_000_000, 4096, WS, fetch_slots=2)  # the second GPU's fixed parts
    together = sum(s.placement.resident_count for s in shares)
    assert one.resident_count < 256 and abs(together - one.resident_count) <= 2  # (each rounds its last expert)


def test_unequal_budgets_give_the_larger_gpu_more_layers_and_lose_nothing():
    shares = plan_devices(MIXTRAL, [24 * GiB, 12 * GiB], 4096, WS, fetch_slots=2)
    big, small = shares
    assert big.stop - big.first > small.stop - small.first and small.stop == 32
    assert all(s.placement.gpu_bytes <= b for s, b in zip(shares, [24 * GiB, 12 * GiB], strict=True))
    # no layer moved across the boundary keeps more experts resident (the search's stopping rule)
    total = sum(s.placement.resident_count for s in shares)
    for step in (1, -1):
        first = big.stop + step
        a = plan(segment_sizes(MIXTRAL, 0, first), 24 * GiB, 4096, WS, fetch_slots=2).resident_count
        b = plan(segment_sizes(MIXTRAL, first, 32), 12 * GiB, 4096, WS, fetch_slots=2).resident_count
        assert a + b <= total


def test_a_gpu_with_room_for_all_its_experts_leaves_the_rest_to_the_other():
    shares = plan_devices(MIXTRAL, [80 * GiB, 8 * GiB], 4096, WS)
    assert sum(s.placement.resident_count for s in shares) == 256  # the whole model fits the two


def test_popularity_follows_each_block():
    pop = [[1.0] * 8 for _ in range(32)]
    for layer in range(32):
        pop[layer][5] = 100.0  # expert 5 is every layer's favourite
    shares = plan_devices(MIXTRAL, [6 * GiB, 6 * GiB], 4096, WS, popularity=pop)
    for s in shares:
        resident = s.placement.resident
        assert sum(1 for ids in resident if 5 in ids) == min(len(resident), s.placement.resident_count)


def test_budgets_that_cannot_hold_the_model_are_refused_with_the_numbers():
    with pytest.raises(CadenzaError, match="hold less than the model's always-on weights"):
        plan_devices(MIXTRAL, [GiB, GiB], 4096, WS)
    with pytest.raises(CadenzaError, match="above 0"):
        plan_devices(MIXTRAL, [24 * GiB, 0], 4096, WS)
    with pytest.raises(CadenzaError, match="fewer than the 3 GPUs"):
        plan_devices(segment_sizes(MIXTRAL, 0, 2), [GiB] * 3, 16, 0)
    with pytest.raises(CadenzaError, match="No GPU budget"):
        plan_devices(MIXTRAL, [], 4096, WS)
