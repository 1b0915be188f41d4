"""The offline job's batch plan (cadenza.moe.offload.throughput): a pure function of sizes, budget and bandwidths,
and `cadenza info --throughput`."""

from __future__ import annotations

import json

import pytest

from cadenza import CadenzaError
from cadenza.moe.offload.policy import fetch_slots
from cadenza.moe.offload.throughput import plan_throughput
from cadenza.moe.placement import ModelSizes

GiB = 2**30
# Mixtral-8x7B-like with int4 experts: 32 layers of 8 experts of 90 MB, 128 KiB of KV cache a token
MIXTRAL = ModelSizes(
    always_bytes=3 * GiB, kv_bytes_per_token=128 * 1024, expert_bytes=90_000_000, num_moe_layers=32, num_experts=8
)


def plan(budget_gib=24, context=256, h2d=54.0, per_token=1e-4, per_step=0.01, **kw):
    return plan_throughput(
        MIXTRAL, int(budget_gib * GiB), GiB, context, 2, h2d, per_token, 2, per_step_s=per_step, **kw
    )


def test_the_batch_fills_the_gpu_with_kv_when_the_link_dominates():
    p = plan()
    # every step moves (nearly) every non-resident expert once: the batch is as large as the KV cache allows
    room = 24 * GiB - 3 * GiB - GiB - 2 * 90_000_000
    per_seq = 256 * 128 * 1024
    assert p.max_batch > 0.8 * room // per_seq and p.kv_bytes == p.max_batch * per_seq
    assert p.kv_bytes + p.resident_experts * 90_000_000 <= room
    assert p.link_bound_share > 0.5 and p.tok_s == pytest.approx(p.max_batch / p.step_s)
    assert p.link_bytes_per_step <= (256 - p.resident_experts) * 90_000_000
    # its rate is the best of every batch: one more or one less sequence is not faster
    assert "batch" in p.summary() and "tok/s" in p.summary()


def test_the_link_and_the_tokens_share_the_step():
    slow_link, fast_link = plan(h2d=10.0), plan(h2d=500.0)
    assert slow_link.tok_s < fast_link.tok_s and slow_link.link_bound_share > fast_link.link_bound_share
    heavy = plan(per_token=5e-3)  # each token costs more than its share of the link
    assert heavy.tok_s < plan().tok_s and heavy.link_bound_share < 0.5 < plan().link_bound_share
    # everything resident (48 GiB): no link time; the per-step cost is shared by as many rows as the KV cache holds
    roomy = plan(budget_gib=48)
    assert roomy.resident_experts == 256 and roomy.link_bytes_per_step == 0 and roomy.max_batch > 100


def test_longer_sequences_hold_fewer_and_more_memory_holds_more():
    short, long = plan(context=256), plan(context=2048)
    assert long.max_batch < short.max_batch
    # more memory is never slower (every smaller budget's choice is still open), and past the experts' bytes it
    # keeps them all resident and grows the batch
    rates = [plan(budget_gib=g).tok_s for g in (24, 26, 30, 36)]
    assert rates == sorted(rates) and plan(budget_gib=36).max_batch > plan(budget_gib=30).max_batch


def test_host_kv_batch_reports_what_cpu_attention_would_allow():
    p = plan(dram_gb_s=100.0)
    assert p.host_kv_batch >= p.max_batch
    assert plan(dram_gb_s=0.0).host_kv_batch == plan().max_batch


def test_host_kv_plan_gives_the_budget_to_experts_and_pays_the_cpu_reads():
    gpu, host = plan(), plan(dram_gb_s=100.0, kv_on_host=True)
    # the cache costs the GPU nothing: the budget holds more residents (the same for every batch), the batch grows;
    # steps that want every expert keep a layer's 8 slots of these 90 MB experts (policy.AHEAD_BYTES), not 2
    assert (
        fetch_slots("fetch", 2, 0, host.max_batch, 8, 90_000_000) == 8 == fetch_slots("fetch", 2, 0, 64, 8, 90_000_000)
    )
    room = 24 * GiB - 3 * GiB - GiB - 8 * 90_000_000
    assert host.kv_on_host and not gpu.kv_on_host and "in host memory" in host.summary()
    assert host.resident_experts == room // 90_000_000 > gpu.resident_experts
    assert host.max_batch > gpu.max_batch and host.kv_bytes == host.max_batch * 256 * 128 * 1024
    # each step reads every sequence's cache on the CPU: a slower DRAM means a slower step, and fewer tokens
    per_seq_s = 256 * 128 * 1024 / 100e9
    link_s = host.link_bytes_per_step / 54e9
    assert host.step_s == pytest.approx(link_s + 0.01 + host.max_batch * (1e-4 + per_seq_s))
    assert plan(dram_gb_s=10.0, kv_on_host=True).tok_s < host.tok_s
    # a budget too small for one GPU-cache sequence still runs with the cache on the host
    assert plan(budget_gib=4.2, context=40_000, dram_gb_s=100.0, kv_on_host=True).max_batch >= 1
    # host memory bounds the batch, and one that cannot hold a sequence is refused with the numbers
    assert plan(dram_gb_s=100.0, kv_on_host=True, host_bytes=10 * 256 * 128 * 1024).max_batch <= 10
    with pytest.raises(CadenzaError, match="cannot hold the KV cache of one sequence of 256 tokens"):
        plan(dram_gb_s=100.0, kv_on_host=True, host_bytes=1024)
    with pytest.raises(ValueError, match="dram_gb_s"):
        plan(kv_on_host=True)


def test_a_budget_without_room_for_one_sequence_is_refused_with_the_numbers():
    with pytest.raises(CadenzaError, match="too small for one sequence of 256 tokens"):
        plan(budget_gib=4)
    with pytest.raises(ValueError):
        plan(h2d=0.0)


def test_info_throughput(mixtral_dir):
    from tests.cli.test_cli import cli

    path = str(mixtral_dir[0])
    r = cli("info", "--model", path, "--gpu-memory", "1GiB", "--throughput", "--json", "--max-tokens", "32")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["throughput"]
    assert t["max_batch"] >= 1 and t["max_tokens"] == 32 and t["tok_s"] > 0
    assert t["source"].startswith(("assumed", "measured"))
    text = cli("info", "--model", path, "--gpu-memory", "1GiB", "--throughput", "--max-tokens", "32").stdout
    assert "throughput" in text and f"cadenza batch --max-batch {t['max_batch']} --max-context 160" in text
    bad = cli("info", "--model", path, "--throughput")
    assert bad.returncode != 0 and "--gpu-memory" in bad.stderr
    args = ("info", "--model", path, "--gpu-memory", "1GiB", "--throughput", "--max-tokens", "32", "--kv-cache", "host")
    h = json.loads(cli(*args, "--json").stdout)["throughput"]
    assert h["kv_on_host"] and h["max_batch"] >= t["max_batch"]
    assert f"cadenza batch --max-batch {h['max_batch']} --max-context 160 --kv-cache host" in cli(*args).stdout
    m = json.loads(cli(*args, "--micro-batches", "2", "--json").stdout)["throughput"]
    assert m["micro_batches"] == 2 and m["tok_s"] >= h["tok_s"]
    assert "--kv-cache host --micro-batches 2" in cli(*args, "--micro-batches", "2").stdout
    bad = cli("info", "--model", path, "--gpu-memory", "1GiB", "--throughput", "--micro-batches", "2")
    assert bad.returncode != 0 and "--kv-cache host" in bad.stderr
    # --prefill-chunk: the plan for passes of that many tokens, and the command that runs it says so
    big = ("info", "--model", path, "--gpu-memory", "1GiB", "--throughput", "--max-tokens", "32", "--prefill-chunk")
    c = json.loads(cli(*big, "1024", "--json").stdout)["throughput"]
    assert c["prefill_chunk"] == 1024 and t["prefill_chunk"] == 4096  # (the default: cadenza batch's)
    assert "--prefill-chunk 1024" in cli(*big, "1024").stdout and "--prefill-chunk" not in text
    bad = cli(*big, "0")
    assert bad.returncode == 2 and "prefill_chunk=0 (--prefill-chunk) is not valid" in bad.stderr


def test_bigger_passes_reserve_workspace_the_residents_pay_for():
    """plan_job's chunk (LLM's prefill_chunk): the activation workspace of a pass of that many tokens comes out of
    the budget before the residents (T1's Mixtral at 24 GiB: ~470 MB more for 4096 tokens than for 2048)."""
    from types import SimpleNamespace

    import torch

    from cadenza.moe.offload.planning import CUDA_MARGIN, workspace_bytes
    from cadenza.moe.offload.throughput import StepRates, plan_job

    config = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=128, vocab_size=32000, num_experts_per_tok=2)  # fmt: skip
    rates = StepRates(h2d_gb_s=54.0, dram_gb_s=100.0)
    job = lambda chunk: plan_job(MIXTRAL, config, torch.bfloat16, 24 * GiB, 128, 128, rates, chunk=chunk)  # noqa: E731
    default, big = job(None), job(4096)
    more = workspace_bytes(config, torch.bfloat16, 256, 4096, CUDA_MARGIN, 8)
    more -= workspace_bytes(config, torch.bfloat16, 256, 2048, CUDA_MARGIN, 8)
    assert 400e6 < more < 520e6
    assert job(2048) == default and big.resident_experts < default.resident_experts
    assert (default.resident_experts - big.resident_experts) * 90_000_000 <= more + 90_000_000


def test_micro_batches_hide_the_smaller_of_the_cpu_and_gpu_parts():
    host = plan(dram_gb_s=100.0, kv_on_host=True)
    both = plan(dram_gb_s=100.0, kv_on_host=True, micro_batches=2)
    assert both.tok_s > host.tok_s
    b = both.max_batch
    gpu_s = both.link_bytes_per_step / 54e9 + 0.01 + b * 1e-4
    cpu_s = b * 256 * 128 * 1024 / 100e9
    assert both.step_s == pytest.approx(max(gpu_s, cpu_s) + min(gpu_s, cpu_s) / 2)
    assert plan(micro_batches=2).step_s == pytest.approx(plan().step_s)  # a GPU cache: nothing to overlap


def test_link_bytes_counts_each_layers_missing_experts_once_per_step_when_wanted():
    from cadenza.moe.offload.throughput import link_bytes

    # 2 layers of 8 experts (100 and 200 bytes each), 6 and 8 resident: 2 x 100 missing, wanted by 1 token with
    # chance 2 / 8, by many tokens almost surely
    assert link_bytes([100, 200], [6, 8], 8, 2, 1) == pytest.approx(200 * 0.25)
    assert link_bytes([100, 200], [6, 8], 8, 2, 1000) == pytest.approx(200)
    assert link_bytes([100, 200], [0, 0], 8, 2, 3) == pytest.approx(2400 * (1 - 0.75**3))
    assert link_bytes([100], [8], 8, 2, 64) == 0


def test_a_job_of_n_prompts_takes_the_smallest_batch_of_its_rounds():
    many = plan()
    assert 512 < many.max_batch < 1024  # the KV cache holds ~630 sequences of 256 tokens
    job = plan(prompts=1024)  # two rounds whatever the batch between 512 and 1023: 512 leaves the most to residents
    assert job.max_batch == 512 and job.resident_experts > many.resident_experts
    assert job.step_s < many.step_s and job.tok_s == pytest.approx(1024 / (2 * job.step_s))
    few = plan(prompts=100)  # one round: every prompt at once, the batch bounded by the job
    assert few.max_batch == 100 and few.tok_s == pytest.approx(100 / few.step_s)
    with pytest.raises(ValueError, match="prompts"):
        plan(prompts=-1)


def test_a_big_batch_placement_spreads_residents_and_keeps_more_slots():
    """The engine's placement for a max_batch whose steps want every expert (a throughput job's): residents spread
    over the layers, as plan_throughput models them, so every layer has copies for the link (whole resident layers
    left it idle: 18 ms a T1 step), and a layer's 8 slots of these experts; at batch 1, whole layers first and 2
    slots."""
    from types import SimpleNamespace

    import torch

    from cadenza.moe.offload.planning import plan_offload

    config = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=128, vocab_size=32000, num_experts_per_tok=2)  # fmt: skip
    kw = dict(sizes=MIXTRAL, config=config, dtype=torch.bfloat16, budget_bytes=12 * GiB, max_context=256, chunk=512)
    small = plan_offload(**kw, policy_name="auto", max_batch=1)
    big = plan_offload(**kw, policy_name="auto", max_batch=64)
    assert small.fetch_slots == 2 and big.fetch_slots == 8
    counts = lambda p: [len(ids) for ids in p.resident]  # noqa: E731
    assert max(counts(big)) - min(counts(big)) <= 1 and sum(counts(big)) > 32
    assert counts(small)[0] == 8 and counts(small)[-1] == 0
    cpu = plan_offload(**kw, policy_name="cpu", max_batch=64)  # nothing fetched: whole layers, no slots
    assert cpu.fetch_slots == 0 and counts(cpu)[0] == 8
