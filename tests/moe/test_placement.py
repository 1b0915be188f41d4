"""The placement planner: budget arithmetic, resident order, refusals, sizes and popularity files (CPU only)."""

from __future__ import annotations

import json
import random
import re

import pytest

from cadenza.errors import CadenzaError
from cadenza.moe.placement import (
    GiB,
    ModelSizes,
    Placement,
    format_size,
    load_popularity,
    parse_size,
    plan,
)

MiB = 1 << 20
# A small model with round numbers: 4 MoE layers x 8 experts of 10 MiB, 100 MiB always-on, 1 KiB of KV per token.
SMALL = ModelSizes(
    always_bytes=100 * MiB, kv_bytes_per_token=1024, expert_bytes=10 * MiB, num_moe_layers=4, num_experts=8
)
REQUIRED = 100 * MiB + 1024 * 1024 + 5 * MiB  # always + KV for 1024 tokens + workspace


def small_plan(budget, **kw):
    return plan(SMALL, budget, max_context=1024, workspace_bytes=5 * MiB, **kw)


def counts(p: Placement) -> list[int]:
    return [len(ids) for ids in p.resident]


# --- budget arithmetic -----------------------------------------------------------------------------------------


def test_exact_resident_count():
    p = small_plan(REQUIRED + 13 * 10 * MiB + 9 * MiB)  # room for 13 experts and a bit
    assert p.resident_count == 13 and p.fetch_slots == 0
    assert p.kv_bytes == MiB and p.workspace_bytes == 5 * MiB
    assert p.gpu_bytes == REQUIRED + 130 * MiB <= p.budget_bytes
    assert p.total_experts == 32 and p.resident_fraction == 13 / 32
    assert p.expected_gpu_share() == 13 / 32


def test_budget_exactly_required_gives_no_residents():
    p = small_plan(REQUIRED, fetch_slots=2)
    assert p.resident_count == 0 and p.fetch_slots == 0 and p.gpu_bytes == REQUIRED


def test_random_budgets_fit_and_are_maximal():
    rng = random.Random(1234)
    for _ in range(2000):
        sizes = ModelSizes(
            always_bytes=rng.randint(1, 5 * GiB),
            kv_bytes_per_token=rng.randint(0, 300_000),
            expert_bytes=rng.randint(1, 200 * MiB),
            num_moe_layers=rng.randint(1, 61),
            num_experts=rng.randint(1, 256),
        )
        ctx, ws, want = rng.randint(0, 32768), rng.randint(0, GiB), rng.randint(0, 8)
        required = sizes.always_bytes + sizes.kv_bytes_per_token * ctx + ws
        budget = required + rng.randint(0, sizes.num_moe_layers * sizes.num_experts * sizes.expert_bytes * 11 // 10)
        p = plan(sizes, budget, ctx, ws, fetch_slots=want)
        assert p.gpu_bytes <= budget
        assert all(ids == sorted(set(ids)) and all(0 <= e < sizes.num_experts for e in ids) for ids in p.resident)
        if p.resident_count < p.total_experts:
            assert p.gpu_bytes + sizes.expert_bytes > budget  # one more expert (or slot) would not fit
            assert p.fetch_slots == min(want, (budget - required) // sizes.expert_bytes)
        else:
            assert p.fetch_slots == 0


def test_budget_larger_than_model_makes_everything_resident():
    whole = REQUIRED + 32 * 10 * MiB
    for budget in (whole, whole + 1, 1000 * GiB, None):
        p = small_plan(budget, fetch_slots=3)
        assert p.resident == [list(range(8))] * 4 and p.fetch_slots == 0
        assert all(p.is_resident(layer, e) for layer in range(4) for e in range(8))
    # One byte short of everything: 31 residents, and slots are wanted again.
    p = small_plan(whole - 1, fetch_slots=3)
    assert p.fetch_slots == 3 and p.resident_count == 28


def test_budget_zero_means_every_expert_on_the_host():
    p = small_plan(0, fetch_slots=4)
    assert p.resident == [[]] * 4 and p.fetch_slots == 0 and p.resident_count == 0
    assert p.gpu_bytes == REQUIRED  # the always part is still counted, just not checked
    assert not p.is_resident(0, 0)
    assert "on the host" in p.summary()


def test_fetch_slots_are_reserved_before_residents():
    p = small_plan(REQUIRED + 10 * 10 * MiB, fetch_slots=3)
    assert p.fetch_slots == 3 and p.resident_count == 7
    p = small_plan(REQUIRED + 2 * 10 * MiB + 5 * MiB, fetch_slots=3)  # room for 2: slots shrink, no residents
    assert p.fetch_slots == 2 and p.resident_count == 0
    p = small_plan(REQUIRED + 5 * MiB, fetch_slots=3)
    assert p.fetch_slots == 0 and p.resident_count == 0


def test_negative_arguments_are_refused():
    for kw in ({"fetch_slots": -1}, {"max_context": -1}, {"workspace_bytes": -1}):
        args = {"max_context": 1024, "workspace_bytes": 0, **kw}
        with pytest.raises(CadenzaError, match="negative"):
            plan(SMALL, GiB, **args)
    with pytest.raises(CadenzaError, match="negative"):
        small_plan(-1)
    with pytest.raises(ValueError):
        ModelSizes(-1, 0, 1, 1, 1)


# --- refusal -------------------------------------------------------------------------------------------------


def test_too_small_budget_names_parts_smallest_budget_and_fixes():
    sizes = ModelSizes(int(1.6 * GiB), 128 * 1024, 44 * MiB, 48, 128)
    with pytest.raises(CadenzaError) as exc:
        plan(sizes, 2 * GiB, 4096, GiB // 2)
    msg = str(exc.value)
    assert "2.00 GiB" in msg and "always-on weights 1.60 GiB" in msg
    assert "KV cache for 4096 tokens 512.0 MiB" in msg and "workspace 512.0 MiB" in msg
    assert "--gpu-memory 2.6GiB" in msg and "--max-context" in msg and "--device cpu" in msg
    assert "every 1000 tokens less saves 125.0 MiB" in msg


@pytest.mark.parametrize("required", [GiB, 3 * GiB + 1, int(2.6 * GiB), 17 * GiB // 10, 12345678901, 5])
def test_smallest_budget_in_the_message_works_and_a_tenth_less_does_not(required):
    sizes = ModelSizes(required, 0, MiB, 2, 4)
    with pytest.raises(CadenzaError) as exc:
        plan(sizes, required - 1, 0, 0)
    smallest = re.search(r"--gpu-memory (\d+\.\d)GiB", str(exc.value)).group(1)
    works = plan(sizes, parse_size(f"{smallest}GiB"), 0, 0)  # does not raise
    assert works.gpu_bytes <= works.budget_bytes < required + GiB // 10
    tenths = round(float(smallest) * 10)
    if tenths > 1:
        with pytest.raises(CadenzaError):
            plan(sizes, parse_size(f"{(tenths - 1) / 10:.1f}GiB"), 0, 0)


# --- which experts ---------------------------------------------------------------------------------------------


def test_popularity_picks_most_popular_pairs():
    pop = [[0.0] * 8 for _ in range(4)]
    pop[2][5], pop[0][7], pop[3][1] = 9.0, 8.0, 7.0
    p = small_plan(REQUIRED + 2 * 10 * MiB, popularity=pop)
    assert p.resident == [[7], [], [5], []]
    assert p.is_resident(2, 5) and p.is_resident(0, 7) and not p.is_resident(3, 1)
    assert p.expected_gpu_share(pop) == pytest.approx(17 / 24)
    assert p.expected_gpu_share() == 2 / 32


def test_popularity_ties_break_by_layer_then_expert():
    pop = [[1.0] * 8 for _ in range(4)]
    pop[3][6] = 2.0
    p = small_plan(REQUIRED + 4 * 10 * MiB, popularity=pop)
    assert p.resident == [[0, 1, 2], [], [], [6]]
    assert small_plan(REQUIRED + 4 * 10 * MiB, popularity=pop).resident == p.resident  # deterministic


@pytest.mark.parametrize(
    "bad, problem",
    [
        ([[1.0] * 8] * 3, "3 rows"),
        ([[1.0] * 7] + [[1.0] * 8] * 3, "7 numbers in row 0"),
        ([[1.0] * 8] * 3 + [[1.0] * 7 + [-1.0]], "-1.0 at row 3, expert 7"),
        ([[1.0] * 8] * 3 + [[float("nan")] * 8], "nan at row 3"),
        ([[1.0] * 8] * 3 + [["a"] * 8], "not a number"),
        ("counts", "not a list"),
    ],
)
def test_bad_popularity_matrix_is_refused(bad, problem):
    with pytest.raises(CadenzaError, match=re.escape(problem)):
        small_plan(GiB, popularity=bad)


@pytest.mark.parametrize("layers, n", [(4, 13), (4, 2), (48, 500), (7, 3), (10, 1), (5, 0)])
def test_even_spread_without_popularity(layers, n):
    sizes = ModelSizes(MiB, 0, MiB, layers, 64)
    p = plan(sizes, MiB + n * MiB, 0, 0, fill="spread")
    c = [len(ids) for ids in p.resident]
    assert sum(c) == n and max(c) - min(c) <= 1
    assert all(ids == list(range(len(ids))) for ids in p.resident)  # expert ids 0, 1, 2, ...
    extra = [layer for layer, k in enumerate(c) if k > n // layers]
    assert len(extra) == n % layers
    if len(extra) >= 2:  # spread out: no two extra layers adjacent unless more than half the layers get one
        gaps = [b - a for a, b in zip(extra, extra[1:], strict=False)]
        assert min(gaps) >= layers // len(extra)


def test_even_spread_puts_a_single_extra_in_the_middle_not_at_the_front():
    sizes = ModelSizes(MiB, 0, MiB, 10, 64)
    assert counts(plan(sizes, MiB + MiB, 0, 0, fill="spread")) == [0] * 5 + [1] + [0] * 4


@pytest.mark.parametrize("layers, n", [(4, 13), (4, 2), (48, 500), (7, 64), (10, 1), (5, 0)])
def test_whole_layers_by_default_without_popularity(layers, n):
    """The default fill: whole layers first to last, the remainder in the next layer, expert ids 0, 1, 2, ..."""
    sizes = ModelSizes(MiB, 0, MiB, layers, 8)
    p = plan(sizes, MiB + n * MiB, 0, 0)
    n = min(n, layers * 8)
    want = [8] * (n // 8) + ([n % 8] if n % 8 else [])
    assert counts(p) == want + [0] * (layers - len(want))
    assert all(ids == list(range(len(ids))) for ids in p.resident)
    with pytest.raises(CadenzaError, match="fill"):
        plan(sizes, MiB + n * MiB, 0, 0, fill="diagonal")


# --- reporting -------------------------------------------------------------------------------------------------


def test_as_dict_is_json_and_summary_mentions_counts():
    p = small_plan(REQUIRED + 14 * 10 * MiB, fetch_slots=1)
    d = json.loads(json.dumps(p.as_dict()))
    assert d["resident_count"] == 13 and d["fetch_slots"] == 1 and d["total_experts"] == 32
    assert d["resident_per_layer"] == counts(p) and sum(d["resident_per_layer"]) == 13
    assert d["gpu_bytes"] == p.gpu_bytes and d["budget_bytes"] == p.budget_bytes
    s = p.summary()
    assert "resident 13/32 experts (40.6%)" in s and "per layer 0-8" in s and "1 fetch slot;" in s
    assert "of 0.2 GiB" in s
    assert "no limit" in small_plan(None).summary()
    json.dumps(small_plan(None).as_dict())


# --- sizes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GiB", 24 * GiB),
        ("24 GiB", 24 * GiB),
        ("24G", 24 * GiB),
        ("24g", 24 * GiB),
        ("24gib", 24 * GiB),
        ("24GB", 24 * 10**9),
        ("512MiB", 512 * MiB),
        ("512MB", 512 * 10**6),
        ("1.5GiB", 3 * GiB // 2),
        ("3.2GiB", 3435973836),  # floor(3.2 * 2^30), exact
        (".5G", GiB // 2),
        ("0", 0),
        ("  0  ", 0),
        ("1000B", 1000),
        ("0.0", 0),
        ("2KiB", 2048),
        ("1TB", 10**12),
        (4096, 4096),
        (0, 0),
        (1.5, 1),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GiB", "24 XB", "lots", "1.2.3G", "-1", "-2GiB", -1, float("inf"), True, "1e9", "24", "1000"]
)
def test_parse_size_errors_name_the_value_and_give_examples(text):
    with pytest.raises(CadenzaError) as exc:
        parse_size(text)
    msg = str(exc.value)
    assert repr(text) in msg and '"24GiB"' in msg and '"0"' in msg


def test_format_size():
    assert format_size(int(23.5 * GiB)) == "23.50 GiB"
    assert format_size(512 * MiB) == "512.0 MiB"
    assert format_size(3072) == "3.0 KiB"
    assert format_size(17) == "17 B"


# --- popularity files ----------------------------------------------------------------------------------------


def test_load_popularity_dict_and_bare_list(tmp_path):
    rows = [[1, 2, 3], [4, 5, 6]]
    (tmp_path / "a.json").write_text(json.dumps({"model": "x", "counts": rows}))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    for name in ("a.json", "b.json"):
        got = load_popularity(tmp_path / name, 2, 3)
        assert got == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert load_popularity(str(tmp_path / "a.json"), 2, 3) == got


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        (json.dumps({"model": "x"}), 'no "counts" key'),
        (json.dumps([[1, 2, 3]]), "1 rows"),
        (json.dumps([[1, 2, 3], [1, 2]]), "2 numbers in row 1"),
        (json.dumps({"counts": [[1, 2, 3], [1, -2, 3]]}), "-2 at row 1, expert 1"),
        (json.dumps({"counts": 7}), "not a list"),
    ],
)
def test_load_popularity_errors_name_file_problem_and_fix(tmp_path, content, problem):
    path = tmp_path / "pop.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CadenzaError) as exc:
        load_popularity(path, 2, 3)
    msg = str(exc.value)
    assert str(path) in msg and problem in msg and "cadenza profile" in msg and "--placement" in msg


# --- layers whose experts differ in size (a GGUF's Q4_K_M: some down projections Q6_K, others Q4_K) ----------------

MIXED = ModelSizes(
    always_bytes=100 * MiB, kv_bytes_per_token=1024, expert_bytes=10 * MiB, num_moe_layers=4, num_experts=8,
    layer_expert_bytes=(10 * MiB, 6 * MiB, 10 * MiB, 6 * MiB),
)  # fmt: skip


@pytest.mark.parametrize("fill", ["layers", "spread"])
@pytest.mark.parametrize("slots", [0, 2])
def test_mixed_layer_sizes_plan_each_layer_at_its_own_size(fill, slots):
    budget = REQUIRED + 100 * MiB
    p = plan(MIXED, budget, max_context=1024, workspace_bytes=5 * MiB, fetch_slots=slots, fill=fill)
    sizes = MIXED.layer_bytes()
    resident = sum(len(ids) * b for ids, b in zip(p.resident, sizes, strict=True))
    assert p.fetch_slots == slots and p.expert_gpu_bytes == resident + slots * 10 * MiB
    assert p.gpu_bytes <= budget
    # nothing left out would still fit, and more experts are resident than planning every layer at 10 MiB gives
    room = budget - p.gpu_bytes
    assert all(len(ids) == 8 or b > room for ids, b in zip(p.resident, sizes, strict=True))
    uniform = plan(SMALL, budget, max_context=1024, workspace_bytes=5 * MiB, fetch_slots=slots, fill=fill)
    assert p.resident_count >= uniform.resident_count
    if fill == "spread" or slots == 0:
        assert p.resident_count > uniform.resident_count
    if fill == "layers":  # whole layers first to last: 80 MiB of layer 0, then 6 MiB experts of layer 1
        assert counts(p) == ([8, 3, 0, 0] if slots == 0 else [8, 0, 0, 0])


def test_mixed_layer_sizes_follow_popularity_and_fit_everything():
    pop = [[float(8 * layer + e) for e in range(8)] for layer in range(4)]  # the last layer most popular
    p = plan(MIXED, REQUIRED + 48 * MiB, max_context=1024, workspace_bytes=5 * MiB, popularity=pop)
    assert p.resident == [[], [], [], [0, 1, 2, 3, 4, 5, 6, 7]]  # 8 x 6 MiB: exactly the most popular layer
    everything = plan(MIXED, REQUIRED + 256 * MiB, max_context=1024, workspace_bytes=5 * MiB, fetch_slots=2)
    assert everything.resident_count == 32 and everything.fetch_slots == 0
    assert everything.expert_gpu_bytes == 8 * (10 + 6 + 10 + 6) * MiB


def test_layer_sizes_must_name_every_layer_and_the_largest():
    with pytest.raises(ValueError):
        ModelSizes(100, 0, 10, 2, 8, layer_expert_bytes=(10,))
    with pytest.raises(ValueError):
        ModelSizes(100, 0, 10, 2, 8, layer_expert_bytes=(6, 6))
