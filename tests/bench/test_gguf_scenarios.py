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
    assert tensors["blk.0.attn_q.weight"].tensor_type == types.F16
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
