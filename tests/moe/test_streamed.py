"""CPU experts launched from the stream (cadenza.moe.offload.streamed): the cpu policy's decode layers without a host
sync.

CI (CPU): a job (`cpu_moe.job_new` / `job_run`, what the CUDA stream's host function runs) computes exactly what
`moe_forward` computes for the masked experts and accounts for it; an emulated-GPU LLM with the streamed path
decodes the same tokens as the per-layer synchronising path, counts the same expert work, with no
synchronisation; swaps keep the mask right; and the reasons it is off are reported. Device (`pytest -m gpu`): with
either launch (the handoff worker, the host function) decode replayed from CUDA graphs gives the synchronising eager
path's tokens with no synchronisation; the worker's staging block, replayed from a graph, gives job_run's bits in
each of its three ways of moving data; the handoff benchmark runs (also tests/test_graphs.py; the worker on its own:
tests/kernels/test_handoff_worker.py).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from cadenza import LLM, SamplingParams
from cadenza.kernels import cpu_moe, handoff
from tests.conftest import make_mixtral

pytestmark = pytest.mark.skipif(not cpu_moe.available(), reason="the fused CPU kernel does not run on this CPU")

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
E, H, INTER, K = 6, 256, 320, 2


def _layer(kind: str):
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(E, INTER, H, generator=g) * 0.05 for _ in range(2))
    down = torch.randn(E, H, INTER, generator=g) * 0.05
    if kind == "plain":
        return cpu_moe.plain_layer(gate.bfloat16(), up.bfloat16(), down.bfloat16())
    return cpu_moe.pack_layer(gate, up, down, kind)


def _buffers(t: int, x_dtype: torch.dtype, ring: int):
    x = torch.zeros(t, H, dtype=x_dtype)
    ids = torch.zeros(t, K, dtype=torch.int64)
    w = torch.zeros(t, K, dtype=torch.float32)
    y = torch.full((t, H), float("nan"))  # the job sets every element
    stats = torch.zeros(8 + E + 2 * ring, dtype=torch.int64)
    return x, ids, w, y, stats


@pytest.mark.parametrize("kind", ["plain", "int8", "int4"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_job_equals_moe_forward_and_accounts(kind, x_dtype):
    layer = _layer(kind)
    t, ring = 3, 4
    x, ids, w, y, stats = _buffers(t, x_dtype, ring)
    mask = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.uint8)  # experts 0, 2, 3 computed here
    job = cpu_moe.job_new(layer, x, ids, w, mask, "silu", 2, y, stats, ring)
    try:
        g = torch.Generator().manual_seed(1)
        calls = []
        for step in range(6):  # the buffers are rewritten in place between runs, as the stream's copies do
            x.copy_(torch.randn(t, H, generator=g))
            ids.copy_(torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]))
            w.copy_(torch.rand(t, K, generator=g))
            if step == 4:
                ids.fill_(1)  # only a resident expert: the job writes zeros
            cpu_moe.job_run(job)
            want = cpu_moe.moe_forward(layer, x, ids, w, [0, 2, 3], route="kernel", threads=2)
            assert torch.equal(y, want)
            calls.append(ids.clone())
        routed = torch.cat(calls).view(-1)
        here = mask[routed].bool()
        assert stats[0] == 6 and stats[1] == 6 * t
        assert stats[2] == here.sum() and stats[3] == (~here).sum()
        assert stats[4] == sum(len({int(e) for e in c.view(-1) if mask[e]}) for c in calls)
        assert stats[7] == sum(len({int(e) for e in c.view(-1) if not mask[e]}) for c in calls)
        assert stats[5] > 0 and stats[6] == 0
        assert torch.equal(stats[8 : 8 + E], torch.bincount(routed, minlength=E))
        times = stats[8 + E :].view(ring, 2)  # the last `ring` runs: runs 2..5 in slots 2, 3, 0, 1
        order = times[[2, 3, 0, 1]]
        assert (order[:, 1] >= order[:, 0]).all() and (order[1:, 0] >= order[:-1, 1]).all()
    finally:
        cpu_moe.job_free(job)


def test_job_refuses_wrong_buffers():
    layer = _layer("int4")
    x, ids, w, y, stats = _buffers(2, torch.float32, 2)
    mask = torch.ones(E, dtype=torch.uint8)
    with pytest.raises(ValueError, match="ids"):
        cpu_moe.job_new(layer, x, ids.int(), w, mask, "silu", 1, y, stats, 2)
    with pytest.raises(ValueError, match="one entry per expert"):
        cpu_moe.job_new(layer, x, ids, w, mask[:3], "silu", 1, y, stats, 2)
    with pytest.raises(ValueError, match="activation"):
        cpu_moe.job_new(layer, x, ids, w, mask, "tanh", 1, y, stats, 2)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_mixtral(tmp_path_factory.mktemp("streamed"), num_local_experts=8, num_hidden_layers=3)[0]


def _llm(path, fmt: str, dtype: str, residents: int, policy: str = "cpu") -> LLM:
    probe = LLM(path, device="cpu", dtype=dtype, gpu_memory="8GiB", experts=fmt, expert_cache=False)
    p = probe.placement
    probe.close()
    slots = 0 if policy == "cpu" else 2
    budget = p.always_bytes + p.kv_bytes + p.workspace_bytes + (residents + slots) * p.expert_bytes
    return LLM(path, device="cpu", dtype=dtype, gpu_memory=budget, experts=fmt, expert_cache=False,
               offload_policy=policy)  # fmt: skip


@pytest.mark.parametrize(("fmt", "dtype"), [("bf16", "bfloat16"), ("int4", "float32"), ("int8", "bfloat16")])
def test_emulated_streamed_equals_synchronising_path(path, fmt, dtype, monkeypatch):
    fast = _llm(path, fmt, dtype, residents=7)
    monkeypatch.setenv("CADENZA_STREAM_CPU", "0")
    slow = _llm(path, fmt, dtype, residents=7)
    try:
        assert fast.orchestra.streamed is not None, fast.orchestra.streamed_reason
        assert fast.orchestra.streamed.launch == "inline"
        assert slow.orchestra.streamed is None and "CADENZA_STREAM_CPU=0" in slow.orchestra.streamed_reason
        prompts = [list(range(3, 9)), list(range(20, 31))]
        want = slow.generate(prompts, GREEDY)
        got = fast.generate(prompts, GREEDY)  # two rows per step
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        one, ref = fast.generate(prompts[0], GREEDY), slow.generate(prompts[0], GREEDY)
        assert one.token_ids == ref.token_ids
        assert one.stats.decode_syncs == 0 < ref.stats.decode_syncs
        assert one.stats.expert_work == ref.stats.expert_work and one.stats.expert_work["cpu"] > 0
        assert one.stats.decode_host_bytes == ref.stats.decode_host_bytes
        assert one.stats.decode_gpu_bytes == ref.stats.decode_gpu_bytes
        live_fast, live_slow = fast.orchestra.live, slow.orchestra.live
        np.testing.assert_allclose(live_fast.tokens, live_slow.tokens, rtol=1e-2)
        # (emulated plain bf16 residents: the synchronising path computes them expert by expert, the streamed one
        # through the decode kernels' fallback, so a near tie in a later router may flip: compare where both agree)
        if slow.orchestra.decode_kernels:  # decayed per step there, per read here
            np.testing.assert_allclose(live_fast.counts, live_slow.counts, rtol=1e-2, atol=1e-6)
        assert fast.orchestra.counters.cpu_busy_s > 0
        assert len(fast.orchestra.streamed.intervals()) > 0
    finally:
        fast.close()
        slow.close()


def test_split_host_pairs_rule():
    from cadenza.moe.offload.streamed import split_host_pairs

    ids = torch.tensor([[5, 1, 7, 2], [0, 3, 4, 6], [2, 5, 1, 0]])
    host = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    cpu, rows = split_host_pairs(ids, host, 0.5, 8)
    # equal speeds: half of each token's host pairs in routing order, the CPU keeping a tie (1 of 3, 0 of 0, 1 of 2)
    assert rows.dtype == torch.int32 and rows.tolist() == [[5, -1, -1, -1], [-1] * 4, [2, -1, -1, -1]]
    assert cpu.tolist() == [[13, 1, 7, 2], [0, 3, 4, 6], [10, 5, 1, 0]]
    assert split_host_pairs(ids, host, 1.0, 8)[1].tolist() == [[5, -1, 7, 2], [-1] * 4, [2, 5, -1, -1]]
    assert split_host_pairs(ids, host, 0.0, 8)[0].tolist() == ids.tolist()
    # the GPU 1.38x slower than the CPU (share 0.42): of 2 host pairs it takes 1 (max(1.38, 1) < 2), of 1 none,
    # of 3 one (max(1.38, 2) < max(2.76, 1))
    one = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    taken = (split_host_pairs(ids, one, 0.42, 8)[1] >= 0).sum(dim=1).tolist()
    assert taken == [1, 0, 1]


def test_job_counts_pairs_taken_elsewhere():
    layer = _layer("int4")
    x, ids, w, y, stats = _buffers(1, torch.float32, 2)
    mask = torch.ones(E, dtype=torch.uint8)
    job = cpu_moe.job_new(layer, x, ids, w, mask, "silu", 2, y, stats, 2)
    try:
        x.copy_(torch.randn(1, H))
        w.fill_(0.5)
        ids.copy_(torch.tensor([[3, 1 + E]]))  # expert 1 taken by the GPU: counted, not computed
        cpu_moe.job_run(job)
        assert torch.equal(y, cpu_moe.moe_forward(layer, x, torch.tensor([[3, 1]]), w, [3], route="kernel", threads=2))
        assert stats[2] == 1 and stats[3] == 1 and stats[4] == 1 and stats[7] == 1
        assert stats[8 + 1] == 1 and stats[8 + 3] == 1
    finally:
        cpu_moe.job_free(job)


@pytest.mark.parametrize(("fmt", "dtype", "share"), [("int4", "float32", "0.5"), ("int4", "float32", "1"),
                                                     ("bf16", "bfloat16", "0.5")])  # fmt: skip
def test_emulated_zero_copy_share_equals_cpu_alone(path, fmt, dtype, share, monkeypatch):
    """The GPU side taking a share of each token's host experts, read from their host tensors (on the emulated GPU
    side: the tensors themselves), decodes what the CPU alone decodes."""
    alone = _llm(path, fmt, dtype, residents=3)
    monkeypatch.setenv("CADENZA_ZERO_COPY", share)
    both = _llm(path, fmt, dtype, residents=3)
    try:
        assert both.orchestra.options.zero_copy == float(share) and both.orchestra.streamed is not None
        prompts = [list(range(3, 9)), list(range(20, 31))]
        want = alone.generate(prompts, GREEDY)
        got = both.generate(prompts, GREEDY)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        one, ref = both.generate(prompts[0], GREEDY), alone.generate(prompts[0], GREEDY)
        assert one.token_ids == ref.token_ids and one.stats.decode_syncs == 0
        # fewer pairs on the CPU: at share 1 none at decode (the prompt's steps decide on the host)
        assert one.stats.expert_work["cpu"] < ref.stats.expert_work["cpu"]
        assert sum(one.stats.expert_work.values()) == sum(ref.stats.expert_work.values())
        assert all(d is not None for d in both.orchestra.streamed.direct.values())
    finally:
        alone.close()
        both.close()


def test_zero_copy_share_is_checked(monkeypatch):
    from cadenza import CadenzaError
    from cadenza.moe.offload.options import OffloadOptions
    from cadenza.moe.offload.policy import zero_copy_share

    for bad in ("2", "half", "-0.1"):
        with pytest.raises(CadenzaError, match="CADENZA_ZERO_COPY"):
            OffloadOptions().with_env({"CADENZA_ZERO_COPY": bad})
    assert OffloadOptions().with_env({"CADENZA_ZERO_COPY": "0.25"}).zero_copy == 0.25
    assert OffloadOptions().with_env({"CADENZA_ZERO_COPY": "auto"}).zero_copy is None
    # both sides finish together: 2.1 ms on the CPU, 2.9 through the link -> the GPU takes 42%
    assert zero_copy_share(2.1e-3, 2.9e-3) == pytest.approx(2.1 / 5.0)
    assert zero_copy_share(2e-3, 0.0) == 0.0 and zero_copy_share(1.0, 1.0) == 0.5


def test_emulated_zero_copy_auto_measures_a_share(path, monkeypatch):
    monkeypatch.setenv("CADENZA_ZERO_COPY", "auto")
    llm = _llm(path, "int4", "float32", residents=3)
    try:
        share = llm.orchestra.zero_copy_share
        assert 0.0 < share < 1.0  # both sides measured (the emulated GPU side: the CPU's torch fallback)
        alone = llm.generate(list(range(3, 9)), GREEDY)
        assert alone.stats.decode_syncs == 0 and len(alone.token_ids) == GREEDY.max_tokens
    finally:
        llm.close()


def test_swaps_rewrite_the_mask(path, monkeypatch):
    fast = _llm(path, "int4", "float32", residents=5)
    monkeypatch.setenv("CADENZA_STREAM_CPU", "0")
    slow = _llm(path, "int4", "float32", residents=5)
    try:
        prompt = list(range(3, 12))
        for llm in (fast, slow):
            layer = llm.orchestra.layers[0]
            out = sorted(layer.resident_rows)[0]
            into = next(e for e in range(8) if e not in layer.resident_rows)
            layer.swap(out, into)
            assert layer.cpu_mask[out] == 1 and layer.cpu_mask[into] == 0
            assert torch.equal(layer.cpu_mask.bool(), layer.row_lut < 0)
        assert fast.generate(prompt, GREEDY).token_ids == slow.generate(prompt, GREEDY).token_ids
    finally:
        fast.close()
        slow.close()


def test_reasons_it_is_off(path):
    auto = _llm(path, "int4", "float32", residents=5, policy="auto")
    orch = auto.orchestra
    try:
        # auto streams unless its cost model finds the CPU much slower than the link (measured: either way here)
        assert (orch.streamed is None) == (orch.streamed_reason is not None)
        cost = orch.cost
        link = cost.fetch_time(1)
        for cpu_over_link, streams in ((1.5, True), (2.5, False)):  # the CPU time measured with its prefetch
            orch.cpu_one_s = cpu_over_link * link
            orch.choose_streamed()
            assert (orch.streamed is not None) == streams, orch.streamed_reason
        assert "2.5x the link's time" in orch.streamed_reason
        orch.cpu_one_s = None  # not measured (CADENZA_CPU_PREFETCH forced): the cost model's
        orch.cost = dataclasses.replace(cost, cpu_points=((1, 3 * link),), alone_scale=1.0)
        orch.choose_streamed()
        assert orch.streamed is None and "3.0x" in orch.streamed_reason
        orch.cost = dataclasses.replace(cost, cpu_points=((1, 0.5 * link),), alone_scale=1.0)
        orch.options = dataclasses.replace(orch.options, prefetch=True)
        orch.choose_streamed()
        assert orch.streamed is None and "speculative prefetch" in orch.streamed_reason
        orch.options = dataclasses.replace(orch.options, prefetch=None)
        auto.replan(gpu_memory=auto.placement.budget_bytes, offload_policy="fetch")  # a new policy re-decides
        assert orch.streamed is None and orch.streamed_reason.startswith("the fetch policy")
        auto.replan(gpu_memory=auto.placement.budget_bytes, offload_policy="cpu")
        assert orch.streamed is not None
        out = auto.generate(list(range(3, 12)), GREEDY)
        assert out.stats.decode_syncs == 0 and len(out.token_ids) == 10
    finally:
        auto.close()
    fp32 = LLM(path, device="cpu", dtype="float32", gpu_memory="0", offload_policy="cpu")  # PyTorch's CPU path
    try:
        assert fp32.orchestra.streamed is None and "fused CPU kernel" in fp32.orchestra.streamed_reason
    finally:
        fp32.close()


def test_handoff_bench_needs_cuda():
    from cadenza.bench import handoff

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the device test below runs it")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        handoff.main([])


@pytest.mark.gpu
def test_handoff_bench_on_the_device(tmp_path):
    """`python -m cadenza.bench.handoff`: each variant adds a piece of the chain; an empty job costs time, and the
    job's own time grows with the experts it computes."""
    from cadenza.bench import handoff

    out = tmp_path / "handoff.json"
    assert handoff.main(["--layers", "8", "--out", str(out)]) == 0
    rows = {(r["variant"], r["threads"], r["experts_on_cpu"]): r for r in json.loads(out.read_text())["results"]}
    by_variant = {v: r["us_per_layer"] for (v, _, n), r in rows.items() if n == 0}
    assert by_variant["kernels"] < by_variant["copies"] < by_variant["full"]
    for variant in ("full", "worker"):
        runs = [r for (v, th, n), r in sorted(rows.items()) if v == variant and th > 1]
        assert runs[0]["job_us_per_call"] < runs[-1]["job_us_per_call"], variant
    # the worker hands over faster than the host function (the target, <= 20 us per layer, is printed); its bare
    # request and answer are not compared here: in a graph of 8 layers they measured 56 us once (5.7 in one of 48)
    assert by_variant["worker"] < by_variant["full"], by_variant
    assert by_variant["worker_copies"] < by_variant["full"]


@pytest.mark.gpu
@pytest.mark.parametrize("experts", ["bf16", "int4"])
@pytest.mark.parametrize("launch", ["worker", "host_function"])
def test_streamed_decode_in_graphs_on_the_device(path, experts, launch, monkeypatch):
    """Each host layer's CPU share started from the stream, by the handoff worker or by a host function: decode
    replayed from CUDA graphs (one per step) and eager decode give the synchronising path's tokens, with no
    synchronisation, for one row and for rows of different lengths."""
    kw = dict(dtype="bfloat16", max_context=96, max_batch=3, offload_policy="cpu", experts=experts, expert_cache=False)
    probe = LLM(path, device="cuda", gpu_memory="8GiB", **kw)
    p = probe.placement
    probe.close()
    kw["gpu_memory"] = p.always_bytes + p.kv_bytes + p.workspace_bytes + 3 * p.expert_bytes
    monkeypatch.setenv("CADENZA_STREAM_CPU", "0")
    slow = LLM(path, device="cuda", cuda_graphs=False, **kw)
    monkeypatch.setenv("CADENZA_STREAM_CPU", "host" if launch == "host_function" else "1")
    fast = LLM(path, device="cuda", **kw)
    eager = LLM(path, device="cuda", cuda_graphs=False, **kw)
    try:
        streamed = fast.orchestra.streamed
        assert streamed is not None, fast.orchestra.streamed_reason
        assert streamed.launch == launch, streamed.launch_reason
        assert eager.orchestra.streamed.launch == launch and slow.orchestra.streamed is None
        assert fast.engine._step_done is not None  # decode waits for its logits asleep, not spinning a core
        prompt = [3, 4, 5, 6, 7]
        want = slow.generate(prompt, GREEDY)
        for llm in (fast, eager):
            got = llm.generate(prompt, GREEDY)
            assert got.token_ids == want.token_ids
            assert got.stats.decode_syncs == 0 < want.stats.decode_syncs
            assert got.stats.expert_work == want.stats.expert_work and got.stats.expert_work["cpu"] > 0
        g = fast.engine.graphs
        assert g.replays >= 9 and all(len(c.segments) == 1 for c in g.graphs.values()), "one graph per step"
        assert streamed.launch_reason in g.describe()
        prompts = [[3, 4, 5, 6, 7], [8, 9], list(range(10, 30))]
        assert [r.token_ids for r in fast.generate(prompts, GREEDY)] == [
            r.token_ids for r in slow.generate(prompts, GREEDY)
        ]
        if launch == "worker":
            counts = streamed.handoff.counts()
            assert counts["runs"] > 0 and counts["unknown"] == 0 and counts["errors"] == 0, counts
    finally:
        for llm in (fast, eager, slow):
            llm.close()


@pytest.mark.gpu
@pytest.mark.parametrize(("mapped_in", "mapped_out"), [(True, False), (False, False), (True, True)])
def test_worker_block_in_a_graph_gives_job_run_bits(mapped_in, mapped_out):
    """Three layers sharing one staging block and one job (the same job asked for twice in a row: its stale answer
    must not satisfy the second wait), captured once and replayed with new inputs: each layer's result is what
    job_run computes from the same inputs, whichever way the block moves its data."""
    assert handoff.probe(torch.device("cuda")) is None, handoff.probe(torch.device("cuda"))
    dev, t = torch.device("cuda"), 2
    layer = _layer("plain")
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.uint8)
    ops = handoff.memops()
    block = handoff.Block(t, K, H, torch.bfloat16, dev, ops, mapped_in, mapped_out)
    assert (block.mapped_in, block.mapped_out) == (mapped_in, mapped_out)
    stats = torch.zeros(8 + E + 2, dtype=torch.int64)
    job = cpu_moe.job_new(layer, block.x, block.ids, block.w, mask, "silu", 2, block.y, stats, 1)
    ref_x, ref_ids, ref_w, ref_y, ref_stats = _buffers(t, torch.bfloat16, 1)
    ref = cpu_moe.job_new(layer, ref_x, ref_ids, ref_w, mask, "silu", 2, ref_y, ref_stats, 1)
    worker = handoff.Worker(pinned=True)
    xs = [torch.zeros(t, H, dtype=torch.bfloat16, device=dev) for _ in range(3)]
    ids = torch.zeros(t, K, dtype=torch.int32, device=dev)
    w = torch.zeros(t, K, device=dev)
    side = torch.cuda.Stream()
    try:
        slot, word = worker.add(cpu_moe.job_function(), job), ops.device_pointer(worker.state)

        def step() -> list[torch.Tensor]:
            outs = []
            for x in xs:
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    block.put(x, ids, w)
                    ops.request(side.cuda_stream, word, slot)
                    y = block.fetch()
                main.wait_stream(side)
                outs.append(y * 1.0)  # (read on the main stream after the join, as the layer's sum does)
            return outs

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()  # eager once
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin()
            outs = step()
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.Generator().manual_seed(3)
        for replay in range(20):
            new_x = [torch.randn(t, H, generator=g).bfloat16() for _ in xs]
            new_ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
            new_w = torch.rand(t, K, generator=g)
            for dst, src in zip([*xs, ids, w], [*new_x, new_ids, new_w], strict=True):
                dst.copy_(src)
            graph.replay()
            torch.cuda.synchronize()
            for i, out in enumerate(outs):
                ref_x.copy_(new_x[i])
                ref_ids.copy_(new_ids)
                ref_w.copy_(new_w)
                cpu_moe.job_run(ref)
                assert torch.equal(out.cpu(), ref_y), (replay, i)
        assert worker.counts()["runs"] == 3 + 3 * 20 and int(stats[0]) == 3 + 3 * 20
    finally:
        torch.cuda.synchronize()
        worker.close()
        cpu_moe.job_free(job)
        cpu_moe.job_free(ref)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("experts", "share", "residents"), [("bf16", "0.5", 3), ("int4", "0.5", 3), ("int4", "auto", 3), ("int4", "1", 0)]
)
def test_zero_copy_share_in_graphs_on_the_device(path, experts, share, residents, monkeypatch):
    """The GPU reading a share of each token's host experts straight from pinned host memory (views through the
    mapping) inside the decode graph, while the CPU computes the rest: the CPU-alone run's tokens, fewer CPU pairs."""
    kw = dict(dtype="bfloat16", max_context=96, offload_policy="cpu", experts=experts, expert_cache=False)
    probe = LLM(path, device="cuda", gpu_memory="8GiB", **kw)
    p = probe.placement
    probe.close()
    kw["gpu_memory"] = p.always_bytes + p.kv_bytes + p.workspace_bytes + residents * p.expert_bytes
    if residents == 0:
        kw["gpu_memory"] = "0"  # every expert on the host, as G1 / G2's second rows
    alone = LLM(path, device="cuda", **kw)
    monkeypatch.setenv("CADENZA_ZERO_COPY", share)
    both = LLM(path, device="cuda", **kw)
    s = both.orchestra.zero_copy_share
    assert 0 < s < 1 if share == "auto" else s == float(share)
    try:
        prompt = [3, 4, 5, 6, 7]
        want, got = alone.generate(prompt, GREEDY), both.generate(prompt, GREEDY)
        streamed = both.orchestra.streamed
        assert all(d is not None for d in streamed.direct.values()), streamed.zero_copy_reason
        assert got.token_ids == want.token_ids and got.stats.decode_syncs == 0
        if both.orchestra.zero_copy_share >= 0.5:  # (auto may measure a share that takes none of two pairs)
            assert got.stats.expert_work["cpu"] < want.stats.expert_work["cpu"]
        assert both.engine.graphs.replays > 0
    finally:
        alone.close()
        both.close()
