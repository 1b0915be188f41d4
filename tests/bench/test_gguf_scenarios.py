"""G1 / G2 (`cadenza bench --scenario G1`): a Q4_K_M-like GGUF (gate / up Q4_K, down Q6_K, random blocks of the
synthetic weights' scale) written once, loaded by cadenza's own loader and handed to the llama.cpp peer. On the CPU,
with tiny shapes and a stand-in llama-bench (no speed is measured or asserted here)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from cadenza.bench.gguf_export import gguf_plan, write_gguf
from cadenza.bench.gguf_quants import K_BLOCK_BYTES, random_kquant, single_threaded_ops
from cadenza.bench.llama_cpp_peer import estimate_for
from cadenza.bench.report import REQUIRED_KEYS
from cadenza.bench.run import run_bench
from cadenza.bench.scenarios import plan_configs
from cadenza.bench.synthetic import SyntheticCheckpoint
from cadenza.errors import CadenzaError
from tests.bench.test_bench import cpu_bench_args
from tests.bench.test_llama_cpp_peer import _LOG, _REPLAY, _stand_in, llama_bench_json

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("qtype, fan_in", [("Q4_K", 4096), ("Q6_K", 14336), ("Q6_K", 768)])
def test_random_kquant_blocks_dequantize_to_the_weights_scale(qtype, fan_in):
    std = fan_in**-0.5  # synthetic.py's N(0, 1/fan_in)
    out = torch.empty(40, 8 * K_BLOCK_BYTES[qtype], dtype=torch.uint8)  # 40 rows of 2048 weights
    random_kquant(out, qtype, std, seed=7)
    w = gguf.quants.dequantize(out.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    assert w.shape == (40, 2048) and np.isfinite(w).all()
    assert abs(w.std() / std - 1) < 0.05 and abs(w.mean()) < 0.02 * std
    assert len(np.unique(w)) >= 48  # codes and scales vary (Q4_K: 3 scales x 16 codes, one d)
    again = torch.empty_like(out)
    with single_threaded_ops(), ThreadPoolExecutor(2) as pool:
        random_kquant(again, qtype, std, seed=7, pool=pool)
    assert torch.equal(out, again)  # the seed decides, not the threads
    random_kquant(again, qtype, std, seed=8)
    assert not torch.equal(out, again)


@pytest.mark.parametrize("model, arch", [("mixtral-tiny", "llama"), ("qwen3-tiny-256", "qwen3moe")])
def test_q4_k_m_gguf_reads_back_and_cadenza_generates(tmp_path, model, arch):
    ckpt = SyntheticCheckpoint(model)
    c = ckpt.config
    written = write_gguf(ckpt, tmp_path / "m.gguf", "q4_k_m", threads=2)
    assert written.nbytes == (tmp_path / "m.gguf").stat().st_size <= written.plan.file_bytes_bound()
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert r.fields["general.architecture"].contents() == arch
    assert r.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    tensors = {t.name: t for t in r.tensors}
    h = c["hidden_size"]
    n_ff = c.get("moe_intermediate_size") or c["intermediate_size"]
    n_experts = c.get("num_local_experts") or c["num_experts"]
    types = gguf.GGMLQuantizationType
    for i in range(c["num_hidden_layers"]):
        for kind, qtype, shape in (("gate", types.Q4_K, [h, n_ff]), ("up", types.Q4_K, [h, n_ff]),
                                   ("down", types.Q6_K, [n_ff, h])):  # fmt: skip
            t = tensors[f"blk.{i}.ffn_{kind}_exps.weight"]
            assert t.tensor_type == qtype and t.shape.tolist() == [*shape, n_experts], t.name
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            assert w.shape == (n_experts, shape[1], shape[0]) and np.isfinite(w).all()
            assert abs(w.std() * shape[0] ** 0.5 - 1) < 0.1, t.name  # N(0, 1/fan_in), as the synthetic weights
    # attention and the LM head as Q4_K_M quantizes them (where rows are whole super-blocks), the embedding F16
    qkvo = [tensors[f"blk.0.attn_{x}.weight"].tensor_type for x in ("q", "k", "v", "output")]
    assert qkvo == ([types.Q4_K, types.Q4_K, types.Q6_K, types.Q4_K] if h % 256 == 0 else [types.F16] * 4)
    assert tensors["token_embd.weight"].tensor_type == types.F16
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == types.F32
    # the estimate for llama.cpp's --n-cpu-moe counts the K-quant bytes: 144 / 210 bytes per 256 weights
    per_layer = n_experts * h * n_ff // 256 * (2 * 144 + 210)
    assert written.plan.expert_bytes_per_layer() == [per_layer] * c["num_hidden_layers"]
    assert estimate_for(written.plan, 0, 64).expert_bytes == 0

    from cadenza import LLM
    from cadenza.sampling import SamplingParams

    llm = LLM(str(tmp_path / "m.gguf"), device="cpu")
    try:
        out = llm.generate([5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        assert out.stats.generated_tokens == 3 and all(0 <= t < c["vocab_size"] for t in out.token_ids)
    finally:
        llm.close()


def test_q4_k_m_needs_rows_of_whole_blocks():
    with pytest.raises(CadenzaError, match="rows of 128 weights.*256"):
        gguf_plan(SyntheticCheckpoint("qwen3-tiny"), "q4_k_m")  # its experts' down projection: 128 inputs


def test_gguf_scenarios_plan():
    """G1: 24 GiB and every expert on the host, decode, then a 512-token prefill at 24 GiB; G2: the same at 8."""
    for s, budget in (("G1", 24), ("G2", 8)):
        got = [(c.scenario, c.policy, c.budget, c.prompt_tokens, c.new_tokens) for c in plan_configs([s], [])]
        assert got == [
            (s, "auto", budget, 64, 128), (s, "cpu", budget, 64, 128), (s, "cpu", 0, 64, 128),
            (s, "auto", budget, 512, 1),
        ]  # fmt: skip


def test_run_bench_g2_one_file_for_both_systems(tmp_path, monkeypatch):
    """G2 on the CPU (qwen3-tiny-256): cadenza's rows from LLM(file) with its load time, then llama-bench on the same
    file; the file is gone afterwards."""
    tests = {(0, 3, 8, 1): [300_000_000], (8, 0, 0, 1): [20_000_000], (0, 1, 10, 1): [1_000_000]}
    canned = {k: llama_bench_json([(*k[:3], ns)]) for k, ns in tests.items()}
    binary = _stand_in(tmp_path, f"LOG = {_LOG!r}\nJSON = {canned!r}\n" + _REPLAY)
    log = tmp_path / "argv.log"
    monkeypatch.setenv("STAND_IN_LOG", str(log))
    folder = tmp_path / "gguf"
    args = cpu_bench_args(
        tmp_path / "o", 3, "--scenario", "G2", "--policies", "cpu", "--peer", f"llama.cpp={binary}",
        "--peer-dir", str(folder),
    )  # fmt: skip
    assert run_bench(args) == 0
    assert not list(folder.iterdir())  # deleted at the end
    (f,) = (tmp_path / "o").glob("G2-*.json")
    doc = json.loads(f.read_text())
    assert doc["complete"]
    rows = doc["results"]
    cadenza = [r for r in rows if r["system"] == "cadenza"]
    peer = [r for r in rows if r["system"] == "llama.cpp"]
    assert [(r["gpu_budget_gib"], r["new_tokens"]) for r in cadenza] == [(8, 3), (0, 3)]
    for r in cadenza:
        assert set(r) >= set(REQUIRED_KEYS) and r["model"] == "qwen3-tiny-256" and not r.get("skipped")
        g = r["gguf"]
        assert g["file"] == "cadenza-qwen3-tiny-256-Q4_K_M.gguf" and g["expert_types"] == "Q4_K_M"
        assert g["load_s"] > 0 and g["load_budget_gib"] == 8 and g["load_target_s"] == 30
        assert set(g["bytes_by_type"]) == {"F16", "F32", "Q4_K", "Q6_K"}
        assert r["decode_tok_s"] > 0
    assert [(r["gpu_budget_gib"], r["prompt_tokens"], r["new_tokens"]) for r in peer] == [(8, 8, 3), (0, 8, 3)]
    assert all(r["gguf_type"] == "Q4_K_M" and r["cpu_experts"] == "q4_k_m" for r in peer)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert {c[c.index("-m") + 1] for c in calls} == {str(folder / "cadenza-qwen3-tiny-256-Q4_K_M.gguf")}
    assert peer[1]["n_cpu_moe"] == 4  # every layer's experts on the host at 0
    # no GPU: a decode token reads its experts and the other weights from host memory, the other weights in the
    # file's blocks in both systems (not the checkpoint's bf16)
    plan = gguf_plan(SyntheticCheckpoint("qwen3-tiny-256"), "q4_k_m")
    k, e = plan.config["num_experts_per_tok"], plan.config["num_experts"]
    for r in cadenza:
        s = r["engine_stats"]
        # the emulated GPU side reads host memory too
        experts = (s["decode_host_bytes"] + s["decode_gpu_bytes"]) / (s["generated_tokens"] - 1)
        assert r["host_bytes_per_token"] == experts + plan.other_bytes()
        assert r["gpu_bytes_per_token"] == 0
    for r in peer:
        assert r["host_bytes_per_token"] == sum(b * k // e for b in plan.expert_bytes_per_layer()) + plan.other_bytes()
        assert r["gpu_bytes_per_token"] == 0


# --- O1 / Z1: gpt-oss with MXFP4 experts, GLM-4.5-Air with Q4_0 experts ----------------------------------------------


def test_random_mxfp4_blocks_dequantize_to_the_weights_scale():
    from cadenza.bench.gguf_quants import MXFP4_BYTES, random_mxfp4

    std = 2880**-0.5  # gpt-oss-120b's fan-in
    out = torch.empty(64, 90 * MXFP4_BYTES, dtype=torch.uint8)  # 64 rows of 2880 weights
    random_mxfp4(out, std, seed=3)
    w = gguf.quants.dequantize(out.numpy(), gguf.GGMLQuantizationType.MXFP4)
    assert w.shape == (64, 2880) and np.isfinite(w).all()
    assert abs(w.std() / std - 1) < 0.05 and abs(w.mean()) < 0.02 * std
    assert len(np.unique(out.view(-1, MXFP4_BYTES)[:, 0].numpy())) == 2  # two neighbouring exponents
    again = torch.empty_like(out)
    with single_threaded_ops(), ThreadPoolExecutor(2) as pool:
        random_mxfp4(again, std, seed=3, pool=pool)
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    "model, fmt, arch, qtype, file_type",
    [("gpt-oss-tiny", "mxfp4", "gpt-oss", "MXFP4", 38), ("glm-4.5-air-tiny", "int4", "glm4moe", "Q4_0", 2)],
)
def test_o1_z1_gguf_reads_back_and_cadenza_generates(tmp_path, model, fmt, arch, qtype, file_type):
    ckpt = SyntheticCheckpoint(model)
    c = ckpt.config
    written = write_gguf(ckpt, tmp_path / "m.gguf", fmt, threads=2)
    assert written.nbytes == (tmp_path / "m.gguf").stat().st_size <= written.plan.file_bytes_bound()
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert r.fields["general.architecture"].contents() == arch
    assert r.fields["general.file_type"].contents() == file_type
    tensors = {t.name: t for t in r.tensors}
    types = gguf.GGMLQuantizationType
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    n_ff = c.get("moe_intermediate_size") or c["intermediate_size"]
    n_experts = c.get("num_local_experts") or c["n_routed_experts"]
    dense = c.get("first_k_dense_replace", 0)
    for i in range(dense, layers):
        for kind, shape in (("gate", [h, n_ff]), ("up", [h, n_ff]), ("down", [n_ff, h])):
            t = tensors[f"blk.{i}.ffn_{kind}_exps.weight"]
            assert t.tensor_type == getattr(types, qtype) and t.shape.tolist() == [*shape, n_experts], t.name
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            assert abs(w.std() * shape[0] ** 0.5 - 1) < 0.1, t.name  # N(0, 1/fan_in), as the synthetic weights
        assert tensors[f"blk.{i}.post_attention_norm.weight"].tensor_type == types.F32
        assert tensors[f"blk.{i}.attn_q.bias"].tensor_type == types.F32  # both families have attention biases
    if arch == "gpt-oss":
        assert r.fields["gpt-oss.attention.sliding_window"].contents() == c["sliding_window"]
        assert r.fields["gpt-oss.rope.scaling.factor"].contents() == 32.0
        assert tensors["blk.0.attn_sinks.weight"].shape.tolist() == [c["num_attention_heads"]]
        assert tensors["blk.0.ffn_gate_exps.bias"].shape.tolist() == [n_ff, n_experts]
        assert tensors["blk.0.ffn_gate_inp.bias"].tensor_type == types.F32
    else:
        assert r.fields["glm4moe.leading_dense_block_count"].contents() == 1
        assert r.fields["glm4moe.rope.dimension_count"].contents() == c["head_dim"] // 2  # partial rotary 0.5
        assert r.fields["glm4moe.expert_shared_count"].contents() == 1
        assert tensors["blk.0.ffn_gate.weight"].shape.tolist() == [h, c["intermediate_size"]]  # the dense layer
        assert "blk.0.ffn_gate_exps.weight" not in tensors
        assert tensors["blk.1.exp_probs_b.bias"].shape.tolist() == [n_experts]
        assert tensors["blk.1.ffn_up_shexp.weight"].shape.tolist() == [h, n_ff]

    from cadenza import LLM
    from cadenza.sampling import SamplingParams

    llm = LLM(str(tmp_path / "m.gguf"), device="cpu")
    try:
        assert llm.checkpoint.architecture == c["architectures"][0]
        out = llm.generate([5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        assert out.stats.generated_tokens == 3 and all(0 <= t < c["vocab_size"] for t in out.token_ids)
    finally:
        llm.close()


def test_mxfp4_experts_only_for_gpt_oss():
    with pytest.raises(CadenzaError, match="MXFP4.*gpt-oss"):
        gguf_plan(SyntheticCheckpoint("glm-4.5-air-tiny"), "mxfp4")


def test_o1_z1_plans():
    """O1: 24 GiB (auto, cpu) and every expert on the host (cpu), then a 512-token prefill at 24 GiB; Z1: 24 GiB."""
    got = [(c.scenario, c.policy, c.budget, c.prompt_tokens, c.new_tokens) for c in plan_configs(["O1"], [])]
    assert got == [
        ("O1", "auto", 24, 64, 128), ("O1", "cpu", 24, 64, 128), ("O1", "cpu", 0, 64, 128), ("O1", "auto", 24, 512, 1),
    ]  # fmt: skip
    got = [(c.scenario, c.policy, c.budget, c.prompt_tokens, c.new_tokens) for c in plan_configs(["Z1"], [])]
    assert got == [("Z1", "auto", 24, 64, 128), ("Z1", "cpu", 24, 64, 128), ("Z1", "auto", 24, 512, 1)]
    from cadenza.bench.scenarios import GGUF_EXPERTS, SOLO

    assert SOLO["O1"] == ("gpt-oss-120b", "gpt-oss-tiny") and SOLO["Z1"] == ("glm-4.5-air", "glm-4.5-air-tiny")
    assert GGUF_EXPERTS["O1"] == "mxfp4" and GGUF_EXPERTS["Z1"] == "int4"


@pytest.mark.parametrize("model", ["gpt-oss-120b", "glm-4.5-air"])
def test_full_size_plans(model):
    """The full-size files, from shapes alone: gpt-oss-120b's MXFP4 experts ~61 GB (4.25 bits a weight), GLM-4.5-Air's
    Q4_0 experts ~40 GB (4.5 bits), each with its published parameter count."""
    ckpt = SyntheticCheckpoint(model)
    plan = gguf_plan(ckpt, "mxfp4" if model.startswith("gpt") else "int4")
    matrices = [t for t in plan.tensors if t.is_expert and t.name.endswith(".weight")]
    weights = sum(int(np.prod(t.shape)) for t in matrices)
    assert sum(t.nbytes for t in matrices) == weights * (17 if model.startswith("gpt") else 18) // 32
    assert weights == {"gpt-oss-120b": 36 * 3 * 128 * 2880 * 2880, "glm-4.5-air": 45 * 3 * 128 * 4096 * 1408}[model]
    assert {"gpt-oss-120b": 116.8e9, "glm-4.5-air": 106.9e9}[model] == pytest.approx(ckpt.total_bytes / 2, rel=0.01)


def test_f16_experts_gguf_is_the_synthetic_model_and_perplexity_compares_int4_to_it(tmp_path):
    """A synthetic model written with f16 experts (the baseline file for `cadenza perplexity`, which needs the GGUF's
    vocabulary to read text) loads as the model cadenza builds from the same weights, to f16's rounding, and
    `cadenza perplexity --experts int4 --baseline` reads it."""
    from cadenza import LLM
    from tests.cli.test_cli import cli

    ckpt = SyntheticCheckpoint("mixtral-tiny")
    written = write_gguf(ckpt, tmp_path / "m.gguf", "f16", threads=2)
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert r.fields["general.file_type"].contents() == 1  # LLAMA_FTYPE_MOSTLY_F16
    assert {t.tensor_type for t in r.tensors if "_exps" in t.name} == {gguf.GGMLQuantizationType.F16}
    ids = [5, 6, 7, 8, 9, 10]
    direct = LLM(checkpoint=SyntheticCheckpoint("mixtral-tiny"), device="cpu", dtype="float32")
    from_file = LLM(str(written.path), device="cpu", dtype="float32")
    try:
        want, got = direct.score(ids), from_file.score(ids)
        assert (got - want).abs().max() < 5e-3 * want.abs().max()  # (f16 storage of the same weights)
    finally:
        direct.close()
        from_file.close()
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 8)
    out = cli("perplexity", "--model", str(written.path), "--file", str(text), "--experts", "int4", "--baseline",
              "--device", "cpu", "--context", "32", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["experts"] == "int4" and res["baseline"]["experts"] == "bf16"
    assert 0 < res["kl_divergence"]["mean"] < 1 and res["top1_agreement"]["percent"] > 0
