"""Layers split over several devices (cadenza.layer_split, cadenza.moe.offload.stages), emulated on the CPU:
every device "cpu", each with its own emulated GPU side, placement and fetch slots. The split computes what one
device computes, for families with dense layers, windows, MLA caches and chunked attention; each device's plan
stays in its budget; user mistakes get messages. (On two real GPUs: tests/moe/test_gpu.py's split tests.)"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json

import pytest
import torch

from cadenza import LLM, CadenzaError, SamplingParams
from cadenza.layer_split import LayerSplit, budgets_for, parse_devices
from cadenza.loader import build_meta, open_checkpoint
from tests.conftest import make_deepseek, make_mixtral, prompt_ids

TOL = 1e-4
PROMPT = list(range(3, 40))
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
CPU2 = ["cpu", "cpu"]


def per_device_budget(path, residents: int, devices: int = 2, slots: int = 0) -> int:
    """A budget for each of `devices` emulated devices that holds about `residents` experts on each."""
    probe = LLM(path, dtype="float32", devices=["cpu"] * devices, gpu_memory="8GiB", offload_policy="cpu")
    shares = probe.orchestra.shares
    probe.close()
    most = max(s.placement.always_bytes + s.placement.kv_bytes + s.placement.workspace_bytes for s in shares)
    return most + (residents + slots) * shares[0].placement.expert_bytes


def reference(path, prompts):
    ref = LLM(path, device="cpu", dtype="float32")
    out = ref.score(PROMPT), [ref.generate(p, GREEDY).token_ids for p in prompts]
    ref.close()
    return out


@pytest.fixture(scope="module")
def mixtral4(tmp_path_factory):
    path, _ = make_mixtral(tmp_path_factory.mktemp("split"), num_local_experts=8, num_hidden_layers=4)
    return (path, *reference(path, [PROMPT[:6]]))


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_two_devices_compute_what_one_does(mixtral4, policy):
    path, want_logits, (want_tokens,) = mixtral4
    slots = 0 if policy == "cpu" else 2
    b = per_device_budget(path, 3, slots=slots)
    llm = LLM(path, dtype="float32", devices=CPU2, gpu_memory=[b, b], offload_policy=policy)
    try:
        shares = llm.orchestra.shares
        assert shares[0].first == 0 and shares[0].stop == shares[1].first and shares[1].stop == 4
        assert all(s.placement.gpu_bytes <= b for s in shares)
        placement = llm.placement  # the devices' plans as one
        assert 0 < placement.resident_count < placement.total_experts
        assert placement.resident == [ids for s in shares for ids in s.placement.resident]
        assert (llm.score(PROMPT) - want_logits).abs().max().item() <= TOL
        out = llm.generate(PROMPT[:6], GREEDY)
        assert out.token_ids == want_tokens
        work = out.stats.expert_work  # one set of counters for both devices
        assert sum(work.values()) == (6 + 9) * 4 * 2 and work["gpu"] > 0 and work["cpu"] + work["fetched"] > 0
        assert "no CUDA device" in llm.engine.graphs.describe()  # (graphs per GPU segment: on GPUs only)
    finally:
        llm.close()


def test_three_devices_with_batches_and_beams(mixtral4):
    path = mixtral4[0]
    prompts = [prompt_ids(7, seed=2), prompt_ids(4, seed=3), prompt_ids(11, seed=4)]
    ref = LLM(path, device="cpu", dtype="float32", max_batch=3)
    want = [r.token_ids for r in ref.generate(prompts, GREEDY)]
    beams = SamplingParams(num_beams=3, temperature=0, max_tokens=6, ignore_eos=True)
    want_beams = ref.generate(prompts[0], beams).token_ids
    ref.close()
    llm = LLM(path, dtype="float32", devices=["cpu"] * 3, gpu_memory="8GiB", max_batch=3)
    try:
        assert len(llm.split.counts) == 3 and min(llm.split.counts) >= 1 and sum(llm.split.counts) == 4
        assert [r.token_ids for r in llm.generate(prompts, GREEDY)] == want  # rows of different lengths
        assert llm.generate(prompts[0], beams).token_ids == want_beams  # the cache's reorder
    finally:
        llm.close()


def test_dense_layers_and_mla_cache_follow_their_device(tmp_path):
    """DeepSeek-V2: a dense first layer (it goes with the first MoE layer's device), MLA's own cache."""
    path, _ = make_deepseek(tmp_path, version=2, num_hidden_layers=4)
    want_logits, (want_tokens,) = reference(path, [PROMPT[:6]])
    b = per_device_budget(path, 2)
    llm = LLM(path, dtype="float32", devices=CPU2, gpu_memory=f"{b}B", offload_policy="cpu")
    try:
        assert llm.split.counts == (2, 1) or llm.split.counts == (1, 2)
        first_moe = 1 + llm.split.counts[0]  # decoder index of the second device's first MoE layer
        assert llm.model.model.layer_devices == [torch.device("cpu")] * 4
        assert llm.split.device_of("model.layers.0.self_attn.kv_a_proj_with_mqa.weight") == llm.split.devices[0]
        assert llm.split.device_of(f"model.layers.{first_moe}.mlp.gate.weight") == llm.split.devices[1]
        assert llm.split.device_of("lm_head.weight") == llm.split.devices[0]
        assert (llm.score(PROMPT) - want_logits).abs().max().item() <= TOL
        assert llm.generate(PROMPT[:6], GREEDY).token_ids == want_tokens
    finally:
        llm.close()


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_windows_and_chunks_cross_devices(tmp_path, family):
    """gpt-oss (sliding windows, sinks, expert biases) and Llama-4 (chunked attention, NoPE layers): the contexts
    made per (window, device) give what one device does."""
    if family == "gpt_oss":
        from tests.models.test_gpt_oss import make_gpt_oss as make
    else:
        from tests.models.test_llama4 import make_llama4 as make
    path, _ = make(tmp_path)
    long = prompt_ids(20, seed=5, vocab=64)
    ref = LLM(path, device="cpu", dtype="float32")
    want_logits, want_tokens = ref.score(long), ref.generate(long[:9], GREEDY).token_ids
    ref.close()
    llm = LLM(path, dtype="float32", devices=CPU2, gpu_memory="8GiB")
    try:
        assert (llm.score(long) - want_logits).abs().max().item() <= TOL
        assert llm.generate(long[:9], GREEDY).token_ids == want_tokens
    finally:
        llm.close()


class StandInRecorder:
    """What cadenza.graphs.Recorder is to a captured step, on the CPU: host calls run at once, crossings move
    tensors by copies; each is logged in order."""

    def __init__(self):
        self.log: list[tuple[str, int]] = []  # ("host", layer) or ("cross", tensors moved)

    def host(self, fn, like):
        out = fn()
        self.log.append(("host", len(self.log)))
        return out

    @contextlib.contextmanager
    def crossing(self, device):
        moved = []
        yield lambda t: moved.append(t) or t.clone()
        self.log.append(("cross", len(moved)))


@pytest.mark.parametrize(("family", "policy"), [("mixtral", "fetch"), ("mixtral", "cpu"), ("gpt_oss", "fetch")])
def test_a_captured_steps_segments_over_three_blocks(tmp_path, family, policy):
    """A split decode step as a CUDA graph capture runs it (cadenza.graphs: Recorder.crossing, Recorder.host),
    with a stand-in recorder over three emulated devices: every block's host-deciding layers call the recorder
    (Stages.recording reaches each device's orchestra), the hidden state crosses at each block boundary and back
    to the first device, and the step computes what one device computes (gpt-oss: windowed and full layers, two
    contexts a pass)."""
    from cadenza.models.attention import RowIndex
    from cadenza.models.common import StaticStep
    from cadenza.moe.offload.policy import Route, route

    if family == "gpt_oss":
        from tests.models.test_gpt_oss import make_gpt_oss

        path, _ = make_gpt_oss(tmp_path, num_hidden_layers=3)
    else:
        path, _ = make_mixtral(tmp_path, num_local_experts=8, num_hidden_layers=3)
    prompt = prompt_ids(12, seed=6, vocab=64)
    ref = LLM(path, device="cpu", dtype="float32")
    want = ref.score(prompt)[-1]
    ref.close()
    b = per_device_budget(path, 1, devices=3, slots=0 if policy == "cpu" else 2)
    llm = LLM(path, dtype="float32", devices=["cpu"] * 3, gpu_memory=[b] * 3, offload_policy=policy)
    rec = StandInRecorder()
    try:
        assert llm.model.model.layer_blocks == [0, 1, 2]
        hosts = [  # one MoE layer a block: whether it runs between graphs (the host decides its experts)
            route(1, o.decode_kernels, o.layers[0].all_resident, o.streamed is not None, True) is Route.BETWEEN_GRAPHS
            for o in llm.orchestra.orchestras
        ]
        assert any(hosts)
        cache = llm.engine.cache_for(1, 32)
        llm.model(torch.tensor([prompt[:-1]]), cache)  # the prompt less its last token, then that token as a step
        index = RowIndex.static(1, torch.device("cpu"))
        index.starts_t.fill_(len(prompt) - 1)
        step = StaticStep(index, 32, rec.crossing)
        with llm.orchestra.recording(rec):
            got = llm.model(torch.tensor([[prompt[-1]]]), cache, last_only=True, static=step)
        assert all(o.recorder is None for o in llm.orchestra.orchestras)
        kinds = [kind for kind, _ in rec.log]
        # each block's layer cuts the step where the host decides, then the hidden state crosses (back home last)
        assert kinds == [k for host in hosts for k in ["host"] * host + ["cross"]]
        assert [n for kind, n in rec.log if kind == "cross"] == [1, 1, 1]
        assert (got[0, -1] - want).abs().max().item() <= TOL
    finally:
        llm.close()


def test_a_context_crosses_through_the_given_move():
    """AttentionContext.to(device, move): every tensor a context carries to another device goes through `move`
    (a captured step's crossing makes each a static copy)."""
    from cadenza.kv_cache import KVCache
    from cadenza.models.attention import AttentionContext
    from cadenza.models.rope import RopeParameters, RotaryEmbedding

    cache = KVCache(2, 2, 1, 8, 16, torch.float32, "cpu")
    cache.lengths = [3, 5]
    rotary = RotaryEmbedding(RopeParameters(), 8, 64)
    ctx = AttentionContext.build(cache, [0, 1], 1, rotary, torch.float32, 4)
    assert ctx.index.rows_t.tolist() == [0, 1]  # made, so it crosses
    moved = []
    there = ctx.to(torch.device("meta"), lambda t: moved.append(t) or t.to("meta"))
    assert len(moved) == 5  # rows_t, starts_t (made by the mask), cos, sin, the mask
    assert {there.cos.device, there.sin.device, there.mask.device, there.index.rows_t.device} == {torch.device("meta")}
    assert ctx.to(torch.device("cpu"), moved.append) is ctx and len(moved) == 5  # its own device: nothing moves


def test_a_big_pass_copies_ahead_across_blocks(mixtral4):
    """A prompt that wants every expert (37 tokens, top-2 of 8): each layer copies the next layer's experts ahead,
    and a block's last layer the next block's first (its GPU's link otherwise idles until that block starts): as
    many more copies ahead as that layer's slots take, all used, against the same split without it; the logits
    unchanged."""
    path, want_logits, _ = mixtral4
    b = per_device_budget(path, 1, slots=2)
    ahead = []
    for across in (True, False):
        llm = LLM(path, dtype="float32", devices=CPU2, gpu_memory=[b, b], offload_policy="fetch")
        try:
            first, second = llm.orchestra.orchestras
            assert first.next_block is second and second.next_block is None and second.first_block is first
            assert llm.split.counts == (2, 2) and first.cache is not None and second.cache is not None
            if not across:
                first.next_block = None
            c0 = dataclasses.replace(llm.orchestra.counters)
            assert (llm.score(PROMPT) - want_logits).abs().max().item() <= TOL
            c = llm.orchestra.counters
            ahead.append((c.prefetch_issued - c0.prefetch_issued, c.prefetch_used - c0.prefetch_used))
            want = min(second.cache.num_slots, 8 - len(second.layers[0].resident_rows))
        finally:
            llm.close()
    (issued, used), (issued_within, used_within) = ahead
    assert want > 0 and issued - issued_within == want and used - used_within == want


def test_replan_keeps_the_split_and_adapt_runs(mixtral4):
    path, want_logits, (want_tokens,) = mixtral4
    llm = LLM(path, dtype="float32", devices=CPU2, gpu_memory="8GiB", offload_policy="cpu")
    try:
        assert llm.placement.resident_count == llm.placement.total_experts  # 8 GiB each holds everything
        counts = llm.split.counts
        b = per_device_budget(path, 2)
        placement = llm.replan(gpu_memory=[b, b], offload_policy="fetch")
        assert llm.split.counts == counts and placement.resident_count < placement.total_experts
        assert placement.fetch_slots == 2 * llm.orchestra.orchestras[0].placement.fetch_slots
        assert llm.generate(PROMPT[:6], GREEDY).token_ids == want_tokens
        assert llm.adapt_placement() >= 0
        assert (llm.score(PROMPT) - want_logits).abs().max().item() <= TOL
        with pytest.raises(CadenzaError, match="GPU 1 .*MoE layers"):
            llm.replan(gpu_memory=[b, 1024])
    finally:
        llm.close()


def test_layer_split_of_maps_dense_and_trailing_layers():
    from torch import nn

    from cadenza.moe.experts import Experts

    class Layer(nn.Module):
        def __init__(self, moe: bool):
            super().__init__()
            self.mlp = Experts.__new__(Experts) if moe else nn.Identity()
            if moe:
                nn.Module.__init__(self.mlp)

    class Model(nn.Module):
        def __init__(self, kinds):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(Layer(k) for k in kinds)

    a, b = torch.device("cuda:0"), torch.device("cuda:1")
    # dense, moe, moe, dense, moe, dense: the dense layers go with the next MoE layer, the last with the last device
    split = LayerSplit.of(Model([0, 1, 1, 0, 1, 0]), [a, b], [2, 1])
    assert split.layer_devices == (a, a, a, b, b, b)
    assert split.layer_blocks == (0, 0, 0, 1, 1, 1)
    twice = LayerSplit.of(Model([0, 1, 1, 0, 1, 0]), [a, a], [2, 1])  # one device named twice: blocks still differ
    assert twice.layer_blocks == (0, 0, 0, 1, 1, 1)
    assert [list(r) for r in split.moe_ranges] == [[0, 1], [2]]
    assert split.device_of("model.layers.3.self_attn.q_proj.weight") == b
    assert split.device_of("model.embed_tokens.weight") == a and split.device_of("model.norm.weight") == a
    with pytest.raises(ValueError):
        LayerSplit.of(Model([1, 1]), [a, b], [2, 1])


def test_mistakes_are_refused_with_the_fix(mixtral4, monkeypatch):
    path = mixtral4[0]
    with pytest.raises(CadenzaError, match="a split needs two or more"):
        parse_devices("cpu")
    with pytest.raises(CadenzaError, match="is not a device"):
        parse_devices("gpu0,gpu1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs, as far as this goes
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_devices("0,1") == parse_devices(["cuda:0", 1]) == [torch.device("cuda:0"), torch.device("cuda:1")]
    with pytest.raises(CadenzaError, match="sees 2 CUDA GPU.*numbers below 2"):
        parse_devices("0,2")
    with pytest.raises(CadenzaError, match="named twice"):
        parse_devices("1,cuda:1")
    with pytest.raises(CadenzaError, match="names no GPU"):
        parse_devices("cuda,cuda:1")
    with pytest.raises(CadenzaError, match="mixes CUDA GPUs and the CPU"):
        parse_devices(["cpu", "cuda:0"])
    monkeypatch.undo()
    with pytest.raises(CadenzaError, match="gives 3 budgets for 2 GPUs"):
        budgets_for("1GiB,1GiB,1GiB", [torch.device("cpu")] * 2)
    with pytest.raises(CadenzaError, match="needed for emulated devices"):
        budgets_for(None, [torch.device("cpu")] * 2)
    with pytest.raises(CadenzaError, match="has no unit"):
        budgets_for("24,24", [torch.device("cpu")] * 2)
    with pytest.raises(CadenzaError, match="kv_cache='host'.*several GPUs"):
        LLM(path, dtype="float32", devices=CPU2, gpu_memory="8GiB", kv_cache="host")
    with pytest.raises(CadenzaError, match="disagree"):
        LLM(path, device="cuda:1", dtype="float32", devices=CPU2, gpu_memory="8GiB")
    with pytest.raises(CadenzaError, match="hold less than the model's always-on weights"):
        LLM(path, dtype="float32", devices=CPU2, gpu_memory="1KiB")
    with pytest.raises(CadenzaError, match="fewer than the 5 GPUs"):
        LLM(path, dtype="float32", devices=["cpu"] * 5, gpu_memory="8GiB")


def test_edge_bytes_sit_on_the_first_device(mixtral4):
    """The embeddings and the LM head are the first device's (not spread over the layers)."""
    from cadenza.layer_split import edge_bytes

    meta = build_meta(open_checkpoint(mixtral4[0]))
    edge = edge_bytes(meta, torch.float32)
    c = meta.config
    assert edge == (2 * c.vocab_size * c.hidden_size + c.hidden_size) * 4  # embeddings, LM head, final norm
    llm = LLM(mixtral4[0], dtype="float32", devices=CPU2, gpu_memory="8GiB")
    try:
        first, second = (s.placement.always_bytes for s in llm.orchestra.shares)
        assert first - second == pytest.approx(edge, abs=1024)
    finally:
        llm.close()


def test_cli_gpus_flag_and_info(mixtral4, monkeypatch, capsys):
    from cadenza.cli import flags, info

    p = argparse.ArgumentParser()
    flags.add_engine_args(p)
    seen = {}

    class Fake:
        placement, is_demo, split = None, False, None

        def __init__(self, *a, **kw):
            seen.update(kw)

    monkeypatch.setattr("cadenza.llm.LLM", Fake)
    flags.load(p.parse_args(["--gpus", "0,1", "--gpu-memory", "24GiB,16GiB"]))
    assert seen["devices"] == "0,1" and seen["gpu_memory"] == "24GiB,16GiB"
    with pytest.raises(CadenzaError, match="--gpu-memory '16' has no unit"):
        flags.load(p.parse_args(["--gpus", "0,1", "--gpu-memory", "24GiB,16"]))

    args = argparse.Namespace(
        model=str(mixtral4[0]), gpu_memory="8GiB", gpus="0,1", max_context=None, dtype="float32", placement=None,
        offload_policy="cpu", max_batch=1, experts="auto", expert_group=None, throughput=False,
    )  # fmt: skip
    out = info.offload_info(args)
    gpus = out["placement"]["gpus"]
    assert [g["gpu"] for g in gpus] == ["0", "1"] and [g["moe_layers"] for g in gpus] == [[0, 2], [2, 4]]
    assert out["placement"]["resident_count"] == sum(g["resident_count"] for g in gpus) == 32
    assert json.dumps(out)  # JSON-able


def test_cadenza_run_over_two_emulated_devices(mixtral_dir):
    """`cadenza run --gpus` end to end (devices "cpu" here): the same text as one device, each device's share on
    stderr; a budget list that does not match the devices is refused with the flag's name."""
    from tests.cli.test_cli import cli

    path = str(mixtral_dir[0])
    flags = ("--prompt", "Hello world", "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--dtype", "float32")
    r = cli("run", "--model", path, "--device", "cpu", "--gpus", "cpu,cpu", "--gpu-memory", "8GiB", *flags)
    assert r.returncode == 0, r.stderr
    want = LLM(path, device="cpu", dtype="float32").generate(
        "Hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )
    assert r.stdout == want.text + "\n"
    assert "cadenza: cpu: MoE layers 0-" in r.stderr, r.stderr
    bad = cli("run", "--model", path, "--gpus", "cpu,cpu", "--gpu-memory", "8GiB,8GiB,8GiB", *flags)
    assert bad.returncode == 2 and "--gpu-memory gives 3 budgets for 2 GPUs" in bad.stderr, bad.stderr
