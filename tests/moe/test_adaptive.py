"""Adaptive placement: live popularity and the swap planner."""

from __future__ import annotations

import numpy as np

from cadenza.moe.offload.adaptive import LivePopularity, plan_swaps


def test_live_popularity_decays_old_traffic():
    pop = LivePopularity(1, 4, half_life=10)
    pop.observe(0, [10, 0, 0, 10], 10)  # top-2 over 10 tokens: experts 0 and 3
    assert np.allclose(pop.shares()[0], [1, 0, 0, 1])
    pop.observe(0, [0, 10, 10, 0], 10)  # the next 10 tokens go elsewhere: the old half counts half as much
    s = pop.shares()[0]
    assert np.allclose(s, [1 / 3, 2 / 3, 2 / 3, 1 / 3])
    for _ in range(20):
        pop.observe(0, [0, 10, 10, 0], 10)
    assert pop.shares()[0][0] < 1e-5 and pop.shares()[0][1] > 0.999


def test_swaps_bring_the_popular_experts_in_best_first_and_bounded():
    shares = np.array([[0.9, 0.05, 0.05, 1.0], [0.1, 0.1, 0.9, 0.9]])
    resident = [[1, 2], [2, 3]]  # layer 0 holds the two unpopular ones; layer 1 is already right
    swaps = plan_swaps(shares, resident, host_cost_s=1e-3, gpu_cost_s=1e-4, copy_s=1e-3, expert_bytes=100,
                       max_bytes=1000)  # fmt: skip
    assert [(s.layer, s.out, s.into) for s in swaps] == [(0, 1, 3), (0, 2, 0)]
    assert swaps[0].gain > swaps[1].gain > 0
    # a copy budget of one expert: only the best exchange
    assert len(plan_swaps(shares, resident, 1e-3, 1e-4, 1e-3, 100, 150)) == 1
    # a copy costlier than what the horizon would save: nothing
    assert plan_swaps(shares, resident, 1e-3, 1e-4, copy_s=10.0, expert_bytes=100, max_bytes=1000) == []
    # no residents in a layer: nothing to exchange there
    assert plan_swaps(shares, [[], []], 1e-3, 1e-4, 1e-3, 100, 1000) == []
