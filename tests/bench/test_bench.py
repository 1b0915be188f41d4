"""The benchmark harness on the CPU: synthetic checkpoints, the baseline's weight mapping, results files, the
machine probe and a whole `cadenza bench` run on mixtral-tiny. Speed is never asserted here (benchmarks/README.md)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest
import torch

from cadenza.bench import baseline_hf
from cadenza.bench.machine import cpu_facts, machine_info, rss_gib
from cadenza.bench.report import (
    REQUIRED_KEYS,
    BenchResult,
    gpu_slug,
    plot_budget_sweep,
    result_path,
    roofline_fraction,
    write_results,
)
from cadenza.bench.run import run_bench
from cadenza.bench.scenarios import add_bench_parser, parse_budgets, parse_scenarios, plan_configs
from cadenza.bench.synthetic import SyntheticCheckpoint
from cadenza.errors import CadenzaError
from cadenza.kernels import cpu_moe
from cadenza.loader import build_meta, expected_tensors, load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return SyntheticCheckpoint("mixtral-tiny")


# --- synthetic checkpoints ---------------------------------------------------------------------------------------


def test_tiny_has_what_the_loader_expects_and_runs(tiny):
    expected = expected_tensors(build_meta(tiny))
    assert {n: t.shape for n, t in tiny.tensors.items()} == expected
    assert all(t.dtype == "BF16" for t in tiny.tensors.values())
    assert tiny.torch_dtype() == torch.bfloat16 and tiny.architecture == "MixtralForCausalLM"
    assert tiny.bytes_by_dtype() == {"BF16": tiny.total_bytes} and len(tiny.files()) == 1

    model = load_model(tiny, CPU, torch.bfloat16)
    ids = torch.randint(3, 1024, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(ids, model.new_cache(24, torch.bfloat16, CPU))[0]
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.3  # scaled like trained weights: logits neither vanish nor blow up
    assert len(set(logits.argmax(-1).tolist())) > 3  # greedy does not collapse to one token


def test_weights_are_deterministic_and_distinct(tiny):
    again = dict(SyntheticCheckpoint("mixtral-tiny").iter_tensors())
    mine = dict(tiny.iter_tensors())
    assert mine.keys() == again.keys()
    assert all(torch.equal(mine[n], again[n]) for n in mine)
    p = "model.layers.1.block_sparse_moe.experts"
    assert not torch.equal(mine[f"{p}.0.w1.weight"], mine[f"{p}.1.w1.weight"])
    assert not torch.equal(mine[f"{p}.0.w1.weight"], mine[f"{p}.0.w3.weight"])
    # Experts are views into the shared pools (one copy: the loader's); what a loader may keep as-is owns its bytes.
    assert mine[f"{p}.0.w1.weight"].untyped_storage().nbytes() > mine[f"{p}.0.w1.weight"].nbytes
    q = mine["model.layers.0.self_attn.q_proj.weight"]
    assert q.untyped_storage().nbytes() == q.nbytes
    other_seed = dict(SyntheticCheckpoint("mixtral-tiny", seed=1).iter_tensors([f"{p}.0.w1.weight"]))
    assert not torch.equal(other_seed[f"{p}.0.w1.weight"], mine[f"{p}.0.w1.weight"])


def test_weight_scales(tiny):
    w = dict(tiny.iter_tensors())
    assert torch.equal(w["model.norm.weight"], torch.ones(256, dtype=torch.bfloat16))
    emb = w["model.embed_tokens.weight"].float()
    assert 0.015 < emb.std() < 0.025
    for name, fan_in in (
        ("model.layers.0.block_sparse_moe.experts.3.w1.weight", 256),
        ("model.layers.0.block_sparse_moe.experts.3.w2.weight", 512),
        ("model.layers.0.self_attn.q_proj.weight", 256),
    ):
        std = w[name].float().std().item()
        assert abs(std * fan_in**0.5 - 1) < 0.05, name


def test_mixtral_8x7b_size_without_materialising():
    ckpt = SyntheticCheckpoint("mixtral-8x7b")
    v, h, i, layers, experts, kv = 32000, 4096, 14336, 32, 8, 8 * 128
    per_layer = 2 * h * h + 2 * kv * h + experts * h + experts * 3 * h * i + 2 * h
    params = 2 * v * h + layers * per_layer + h
    assert params == 46_702_792_704  # Mixtral-8x7B's published 46.7 B parameters
    assert ckpt.total_bytes == 2 * params  # 93.4 GB in bf16
    wb = ckpt.weight_bytes()
    assert wb.expert_bytes == 3 * h * i * 2 and wb.num_moe_layers == 32
    assert wb.embedding + wb.routed_experts + wb.other == ckpt.total_bytes
    assert not ckpt._pools  # shapes only: nothing was generated


@pytest.mark.parametrize(
    ("full", "tiny", "billions"),
    [("qwen3-next-80b-a3b", "qwen3-next-tiny", 79.7), ("glm-4.7-flash", "glm-4.7-flash-tiny", 29.9)],
)
def test_synthetic_hybrid_and_mla_families(full, tiny, billions):
    """The synthetic full-size models hold the published parameter counts (without their multi-token-prediction
    weights), from shapes alone; their tiny layouts load with int8 experts and generate."""
    from cadenza import LLM, SamplingParams

    assert SyntheticCheckpoint(full).total_bytes / 2 / 1e9 == pytest.approx(billions, abs=0.1)
    llm = LLM(checkpoint=SyntheticCheckpoint(tiny), device="cpu", experts="int8", expert_cache=False)
    out = llm.generate(list(range(5, 75)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4


def test_unknown_synthetic_model():
    with pytest.raises(CadenzaError, match="mixtral-tiny"):
        SyntheticCheckpoint("mixtral-9x9b")


# --- the transformers baseline's weights (CPU part) -----------------------------------------------------------------

# a device map of the tiny model: layers 0 and 1 on GPU 0, layers 2 and 3 offloaded to the host
DEVICE_MAP = {
    "model.embed_tokens": 0,
    "model.layers.0": 0,
    "model.layers.1": 0,
    "model.layers.2": "cpu",
    "model.layers.3": "cpu",
    "model.norm": 0,
    "model.rotary_emb": 0,
    "lm_head": 0,
}


def test_transformers_model_gets_the_same_weights(tiny):
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, tiny.architecture)(baseline_hf.hf_config(tiny)).eval()
    baseline_hf.fill_hf_model(hf, tiny, torch.float32)
    ours = load_model(tiny, CPU, torch.float32)
    ids = torch.randint(3, 1024, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = hf(ids).logits[0].float()
        got = ours(ids, ours.new_cache(20, torch.float32, CPU))[0]
    assert (want - got).abs().max() < 1e-4


def test_per_token_bytes_of_a_device_map(tiny):
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, tiny.architecture)(baseline_hf.hf_config(tiny))
    baseline_hf.fill_hf_model(hf, tiny, torch.bfloat16)
    dm = dict(DEVICE_MAP)
    b = baseline_hf._per_token_bytes(hf, dm, top_k=2, num_experts=8)
    layer = sum(p.numel() * 2 for n, p in hf.named_parameters() if n.startswith("model.layers.2."))
    experts = sum(p.numel() * 2 for n, p in hf.named_parameters() if n.startswith("model.layers.2.mlp.experts"))
    assert b["copied"] == 2 * layer  # accelerate copies every weight of an offloaded layer
    assert b["host_needed"] == 2 * (layer - experts + experts * 2 / 8)
    assert baseline_hf._layer_devices(hf, dm) == ["0", "0", "cpu", "cpu"]


def test_baseline_refuses_without_cuda(tiny):
    assert "CUDA" in baseline_hf.baseline_unavailable(CPU)
    if not torch.cuda.is_available():
        with pytest.raises(CadenzaError, match="--no-baseline"):
            baseline_hf.run_transformers_offload(tiny, 24, [5, 6, 7], 2)


def test_baseline_runner_control_flow(tiny, monkeypatch):
    """run_transformers_offload end to end with CUDA and accelerate stubbed (the real run needs a GPU): the
    device map's consequences land in the result, and the model is freed."""
    import contextlib
    import sys
    import types

    pytest.importorskip("transformers")
    dm = dict(DEVICE_MAP)
    seen = {}
    fake = types.ModuleType("accelerate")
    fake.__version__ = "stub"
    fake.init_empty_weights = lambda include_buffers=None: contextlib.nullcontext()
    fake.infer_auto_device_map = lambda model, max_memory, no_split_module_classes: seen.update(mm=max_memory) or dm
    fake.dispatch_model = lambda model, device_map, skip_keys=None: model
    fake.hooks = types.ModuleType("accelerate.hooks")
    fake.hooks.remove_hook_from_submodules = lambda model: seen.update(freed=True)
    monkeypatch.setitem(sys.modules, "accelerate", fake)
    monkeypatch.setitem(sys.modules, "accelerate.hooks", fake.hooks)
    monkeypatch.setattr(baseline_hf, "baseline_unavailable", lambda device: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    machine = {"host_mem_gib": 100, "dram_read_gb_s": 50.0, "gpu_mem_bw_gb_s": 2000.0}
    r = baseline_hf.run_transformers_offload(tiny, 24, list(range(3, 19)), 4, trials=2, machine=machine)
    assert seen["freed"] and seen["mm"]["cpu"] == "100GiB" and "24GiB" in seen["mm"].values()
    assert r["system"] == "transformers+accelerate" and set(r) >= set(REQUIRED_KEYS)
    assert r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and len(r["trial_times_s"]) == 2
    assert r["peak_gpu_mem_gib"] == 3.0
    assert r["placement"]["resident_per_layer"] == [8, 8, 0, 0]
    assert r["expert_work_share"] == {"gpu": 0.5, "cpu": 0.0, "fetched": 0.5}
    assert r["roofline_fraction"] > 0


# --- results files -------------------------------------------------------------------------------------------------


def test_result_path_and_gpu_slug(tmp_path):
    from datetime import date

    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_slug("NVIDIA H200") == "h200"
    assert gpu_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_slug("NVIDIA GeForce RTX 4090") == "rtx-4090"
    assert gpu_slug(None) == "cpu"
    assert result_path(tmp_path, "D1", "NVIDIA H200", date(2026, 11, 22)) == tmp_path / "D1-h200-2026-11-22.json"


def test_roofline_fraction():
    # host part 1 GB at 100 GB/s = 10 ms; GPU part 20 GB at 2000 GB/s = 10 ms... take the larger, over 40 ms
    assert roofline_fraction(1e9, 20e9, 100, 2000, 0.040) == pytest.approx(0.25)
    assert roofline_fraction(3e9, 20e9, 100, 2000, 0.040) == pytest.approx(0.75)  # host-bound
    assert roofline_fraction(1e9, 1e9, 100, None, 0.040) == pytest.approx(0.5)  # no GPU: all bytes from DRAM
    assert roofline_fraction(None, 1e9, 100, 2000, 0.04) is None
    assert roofline_fraction(1e9, 1e9, 100, 2000, 0.0) is None


def test_write_results_schema(tmp_path):
    r = BenchResult("D1", "cadenza", "mixtral-tiny", policy="auto", gpu_budget_gib=24, decode_tok_s=12.34567)
    skipped = BenchResult("D1", "cadenza", "mixtral-tiny", policy="fetch").skip("no GPU")
    path = write_results(tmp_path / "out" / "D1.json", "cadenza bench", {"git_commit": "abc"}, [r, skipped])
    doc = json.loads(path.read_text())
    assert set(doc) >= {"command", "commit", "machine", "results"} and doc["commit"] == "abc"
    for res in doc["results"]:
        assert set(res) >= set(REQUIRED_KEYS) | {"trial_times_s", "placement", "expert_work_share", "notes"}
    assert doc["results"][0]["decode_tok_s"] == 12.346
    assert doc["results"][1]["skipped"] and doc["results"][1]["decode_tok_s"] is None
    assert "skipped: no GPU" in doc["results"][1]["notes"]
    assert [p.name for p in path.parent.iterdir()] == ["D1.json"]  # no temporary file left behind


def test_plot_budget_sweep(tmp_path):
    rows = [
        BenchResult("S1", "cadenza", "m", gpu_budget_gib=b, decode_tok_s=v, model_bytes=40 << 30)
        for b, v in ((0, 5.0), (12, 6.0), ("all", 30.0))
    ]
    rows.append(BenchResult("S1", "cadenza", "m", gpu_budget_gib=48).skip("does not fit"))
    png = plot_budget_sweep(rows, tmp_path / "S1.png")
    if importlib.util.find_spec("matplotlib") is None:
        assert png is None
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the machine ---------------------------------------------------------------------------------------------------


def test_machine_info_on_cpu():
    m = machine_info("cpu")
    assert m["dram_read_gb_s"] > 0
    assert m["gpu_name"] is None and m["pinned_h2d_gb_s"] is None and m["gpu_mem_bw_gb_s"] is None
    assert m["logical_cpus"] >= m["physical_cores"] >= 1 and m["host_mem_gib"] > 0
    assert m["torch"] == torch.__version__
    assert rss_gib() > 0
    import cadenza  # the peers' OpenMP setting beside cadenza's: without what cadenza set itself

    want = {"cadenza": os.environ.get("GOMP_SPINCOUNT"), "peers": cadenza.foreign_environment().get("GOMP_SPINCOUNT")}
    assert m["gomp_spincount"] == want


def test_cpu_facts_counts_physical_cores():
    block = (
        "processor\t: {p}\nmodel name\t: Xeon X\nflags\t\t: avx2 avx512f amx_bf16\nphysical id\t: 0\ncore id\t: {c}\n"
    )
    text = "\n".join(block.format(p=p, c=p % 2) for p in range(4)) + "\n"  # 2 cores, 2 threads each
    assert cpu_facts(text) == {
        "model": "Xeon X",
        "physical_cores": 2,
        "logical_cpus": 4,
        "flags": ["avx2", "avx512f", "amx_bf16"],
    }


# --- the runner ----------------------------------------------------------------------------------------------------


def bench_args(*argv: str) -> argparse.Namespace:
    """`cadenza bench` parsed from argv (also tests/bench/test_llama_cpp_peer.py)."""
    parser = argparse.ArgumentParser(prog="cadenza")
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def cpu_bench_args(out, new_tokens: int, *flags: str) -> argparse.Namespace:
    """`cadenza bench` on the CPU: 8 prompt tokens, `new_tokens` new ones, one trial, JSON into `out`, then `flags`."""
    common = ("--device", "cpu", "--prompt-tokens", "8", "--new-tokens", str(new_tokens), "--trials", "1")
    return bench_args(*common, *flags, "--out", str(out))


def test_scenario_plan():
    assert parse_scenarios("d1, S1") == ["D1", "S1"]
    assert parse_budgets("0,12,1.5,all") == [0, 12, 1.5, "all"]
    configs = plan_configs(["D1", "P1", "S1"], [0, "all"])
    assert [(c.scenario, c.policy, c.budget, c.prompt_tokens, c.new_tokens) for c in configs] == [
        ("D1", "auto", 24, 64, 128), ("D1", "cpu", 24, 64, 128), ("D1", "fetch", 24, 64, 128),
        ("P1", "auto", 24, 512, 1), ("P1", "cpu", 24, 512, 1), ("P1", "auto", 24, 2048, 1),
        ("P1", "cpu", 24, 2048, 1), ("S1", "auto", 0, 64, 64), ("S1", "auto", "all", 64, 64),
    ]  # fmt: skip
    for bad in ("D9", ""):
        with pytest.raises(CadenzaError, match="scenario"):
            parse_scenarios(bad)
    with pytest.raises(CadenzaError, match="budget"):
        parse_budgets("12,lots")


def test_quantized_and_resident_scenarios_plan():
    """D3 / D4: 24 GiB and every expert on the host, decode, then a 512-token prefill; R1: all resident."""
    for s in ("D3", "D4"):
        got = [(c.scenario, c.policy, c.budget, c.prompt_tokens, c.new_tokens) for c in plan_configs([s], [])]
        assert got == [
            (s, "auto", 24, 64, 128), (s, "cpu", 24, 64, 128), (s, "cpu", 0, 64, 128), (s, "auto", 24, 512, 1)
        ]  # fmt: skip
    d4 = [(c.policy, c.budget, c.new_tokens) for c in plan_configs(["D4", "D1"], [], budget=48)]
    assert d4 == [("auto", 48, 128), ("cpu", 48, 128), ("cpu", 0, 128), ("auto", 48, 1)] + [
        (p, 48, 128) for p in ("auto", "cpu", "fetch")
    ]  # --budget: in place of the 24 GiB
    [r1] = plan_configs(["R1"], [])
    assert (r1.budget, r1.new_tokens) == ("all", 128)


def test_run_bench_d4_with_error_and_step_profile(tmp_path):
    """D4 on the CPU's tiny model: int4 experts, the int4-vs-bf16 error next to each result, a step profile."""
    args = cpu_bench_args(tmp_path, 3, "--scenario", "D4", "--profile-step")
    assert run_bench(args) == 0
    data = json.loads(next(tmp_path.glob("D4-*.json")).read_text())
    assert "--profile-step" in data["command"]
    results = data["results"]
    assert [r["cpu_experts"] for r in results] == ["int4"] * 4
    if cpu_moe.available():
        for r in results:  # cpu streams its decode layers; auto where its measured CPU is not much slower than the link
            assert r["cpu_launch"] == "stream" or r["policy"] == "auto" and "link's time" in r["cpu_launch"], r
        assert [r["cpu_launch"] for r in results if r["policy"] == "cpu"] == ["stream"] * 2
        assert all(r["cpu_handoff"]["launch"] == "inline" for r in results if r["cpu_launch"] == "stream")
    else:  # no fused CPU kernel on this machine (no AVX-512): every layer keeps its host synchronisation, and says why
        assert all("fused CPU kernel is not in use" in r["cpu_launch"] for r in results), results
    from cadenza.moe.offload.costmodel import PREFETCH_CANDIDATES

    for r in results:
        err = r["error_vs_bf16"]
        assert err["format"] == "int4" and 0 < err["relative_logit_error"] < 1 and 0 <= err["top1_agreement"] <= 1
        # the calibrated prefetch distance and one expert's CPU time ride along (the distance: up to 30% of the rate)
        one = r["cpu_prefetch"]["one_expert_ms"]
        assert r["cpu_prefetch"]["bytes"] in PREFETCH_CANDIDATES and (one is None or one > 0), r["cpu_prefetch"]
    decode = [r for r in results if r["new_tokens"] > 1]
    assert all(r["step_profile"]["step"]["wall_ms"] > 0 for r in decode)
    assert all("no CUDA device" in r["cuda_graphs"] for r in results)


def test_run_bench_tiny_on_cpu(tmp_path, capsys):
    args = cpu_bench_args(tmp_path, 4, "--budgets", "0,24,all")
    assert run_bench(args) == 0
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert [f.split("-cpu-")[0] for f in files] == ["D1", "P1", "S1"]
    for f in files:
        doc = json.loads((tmp_path / f).read_text())
        assert doc["complete"] and doc["command"].startswith("cadenza bench --model mixtral-tiny")
        assert doc["machine"]["dram_read_gb_s"] > 0
        for r in doc["results"]:
            assert set(r) >= set(REQUIRED_KEYS)
            assert r["system"] == "cadenza" and r["model"] == "mixtral-tiny"  # no baseline without CUDA
            assert not r["skipped"], r["notes"]
            assert r["trial_times_s"] and r["ttft_s"] > 0 and r["prefill_tok_s"] > 0
            if r["scenario"] == "P1":
                assert r["new_tokens"] == 1 and r["decode_tok_s"] is None
            else:
                assert r["decode_tok_s"] > 0 and r["roofline_fraction"] > 0
                assert sum(r["expert_work_share"].values()) == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert "[bench" in out and "D1 cadenza policy=fetch" in out


def test_run_bench_refuses_bad_requests(tmp_path):
    with pytest.raises(CadenzaError, match="--baseline"):
        run_bench(bench_args("--device", "cpu", "--baseline", "--out", str(tmp_path)))
    with pytest.raises(CadenzaError, match="mixtral-tiny"):
        run_bench(bench_args("--device", "cpu", "--model", "nope", "--out", str(tmp_path)))
    with pytest.raises(CadenzaError, match="--trials"):
        run_bench(bench_args("--device", "cpu", "--trials", "0", "--out", str(tmp_path)))
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_run_bench_over_several_devices(tmp_path):
    """--gpus: cadenza's layers split over the devices (two emulated ones here), each row says how."""
    args = cpu_bench_args(tmp_path, 3, "--scenario", "D1", "--policies", "cpu", "--gpus", "cpu,cpu", "--budgets", "0")
    assert run_bench(args) == 0
    (f,) = tmp_path.glob("D1-*.json")
    doc = json.loads(f.read_text())
    assert "--gpus cpu,cpu" in doc["command"]
    (row,) = doc["results"]
    assert [g["device"] for g in row["gpus"]] == ["cpu", "cpu"] and row["decode_tok_s"] > 0
    assert "no CUDA device" in row["cuda_graphs"]  # (on GPUs: one graph per GPU segment)
    assert row["cpu_prefetch"]["bytes"] >= 0  # the devices' one calibration


def test_run_bench_policies_and_tag(tmp_path):
    args = cpu_bench_args(tmp_path, 3, "--scenario", "D1", "--policies", "cpu", "--tag", "b")
    assert run_bench(args) == 0
    (f,) = tmp_path.glob("*.json")
    assert f.name.startswith("D1-cpu-") and f.name.endswith("-b.json")
    doc = json.loads(f.read_text())
    assert [r["policy"] for r in doc["results"]] == ["cpu"]
    assert "--policies cpu --tag b" in doc["command"]
    with pytest.raises(CadenzaError, match="Nothing to measure"):
        run_bench(bench_args("--device", "cpu", "--scenario", "D1", "--policies", "none", "--out", str(tmp_path)))
    with pytest.raises(CadenzaError, match="--policies"):
        run_bench(bench_args("--device", "cpu", "--policies", "gpu", "--out", str(tmp_path)))


# --- DeepSeek-V2-Lite (F2) -------------------------------------------------------------------------------------------


def test_deepseek_v2_lite_size_without_materialising():
    ckpt = SyntheticCheckpoint("deepseek-v2-lite")
    v, h, layers, heads, experts, moe_i, dense_i = 102400, 2048, 27, 16, 64, 1408, 10944
    attn = h * heads * (128 + 64) + h * (512 + 64) + 512 + 512 * heads * (128 + 128) + heads * 128 * h
    moe = experts * 3 * h * moe_i + 3 * h * 2 * moe_i + experts * h  # routed, 2 shared, router
    params = 2 * v * h + layers * (attn + 2 * h) + 3 * h * dense_i + (layers - 1) * moe + h
    assert params == 15_706_484_224  # DeepSeek-V2-Lite's published 15.7 B parameters
    assert ckpt.total_bytes == 2 * params  # 31.4 GB in bf16
    wb = ckpt.weight_bytes()
    assert wb.num_moe_layers == 26 and wb.num_experts == 64 and wb.experts_per_token == 6
    assert wb.expert_bytes == 3 * h * moe_i * 2
    assert not ckpt._pools


def test_deepseek_tiny_builds_and_runs():
    tiny = SyntheticCheckpoint("deepseek-v2-tiny")
    assert {n: t.shape for n, t in tiny.tensors.items()} == expected_tensors(build_meta(tiny))
    model = load_model(tiny, CPU, torch.bfloat16)
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    ids = torch.randint(3, 1024, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(ids, model.new_cache(24, torch.bfloat16, CPU))[0]
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.3
    assert len(set(logits.argmax(-1).tolist())) > 3


def test_run_bench_f2_tiny_on_cpu(tmp_path):
    args = cpu_bench_args(tmp_path, 4, "--scenario", "F2", "--policies", "cpu,auto")
    assert run_bench(args) == 0
    (f,) = tmp_path.glob("*.json")
    doc = json.loads(f.read_text())
    assert f.name.startswith("F2-cpu-") and doc["command"].startswith("cadenza bench --model deepseek-v2-tiny")
    assert [r["policy"] for r in doc["results"]] == ["auto", "cpu"]
    layers, heads = 4, 4
    for r in doc["results"]:
        assert set(r) >= set(REQUIRED_KEYS) and not r["skipped"], r["notes"]
        assert r["scenario"] == "F2" and r["gpu_budget_gib"] == 6
        assert r["decode_tok_s"] > 0 and r["roofline_fraction"] > 0
        assert r["kv_bytes_per_token"] == layers * (64 + 16) * 2  # MLA: latent + rope key, bf16
        assert r["kv_bytes_per_token_decompressed"] == layers * heads * (32 + 16 + 32) * 2
    with pytest.raises(CadenzaError, match="F2"):
        run_bench(bench_args("--device", "cpu", "--scenario", "F2,D1", "--out", str(tmp_path)))


def test_zerocopy_bench_needs_cuda():
    from cadenza.bench import zerocopy

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the bench runs there")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        zerocopy.main([])


def test_results_go_where_out_says_or_to_the_cache(tmp_path, monkeypatch):
    """--out wins; without it, benchmarks/results only inside a cadenza checkout, else the cache's bench folder (not
    whatever folder the user stands in)."""
    from cadenza.bench.run import results_dir

    monkeypatch.setenv("CADENZA_CACHE", str(tmp_path / "cache"))
    assert results_dir(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.chdir(tmp_path)
    assert results_dir(None) == tmp_path / "cache" / "bench"
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "cadenza" / "bench").mkdir(parents=True)
    assert results_dir(None) == tmp_path / "benchmarks" / "results"


def test_decode_line_reports_the_trials_spread():
    from cadenza.bench.run import _describe

    line = _describe({"decode_tok_s": 10.0, "decode_tok_s_trials": [4.0, 10.0, 16.0]})
    assert "decode 10.00 tok/s (trials 4.00-16.00)" in line
