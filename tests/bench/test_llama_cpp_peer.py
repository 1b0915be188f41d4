"""The llama.cpp peer of `cadenza bench --peer llama.cpp=PATH`, on the CPU and without llama.cpp: the Q8_0 / Q4_0
bytes against gguf-py's reference quantizer, the GGUF of tiny synthetic models read back with gguf-py, the
--n-cpu-moe choice, llama-bench's JSON and log lines, and the run's plumbing with a stand-in llama-bench that only
replays a canned answer (no speed is measured or asserted here)."""

from __future__ import annotations

import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cadenza.bench import gguf_quants, llama_cpp_peer
from cadenza.bench.gguf_export import gguf_plan, gpt2_byte_chars, interleave_rope_halves, write_gguf
from cadenza.bench.gguf_quants import quantize, single_threaded_ops
from cadenza.bench.llama_bench import (
    BenchTest,
    bench_command,
    device_mib,
    find_test,
    parse_bench_json,
    parse_buffer_sizes,
    run_llama_bench,
)
from cadenza.bench.llama_cpp_peer import (
    choose_n_cpu_moe,
    estimate_for,
    kv_cache_bytes,
    parse_peers,
    peer_test,
)
from cadenza.bench.report import REQUIRED_KEYS
from cadenza.bench.run import run_bench
from cadenza.bench.scenarios import plan_configs
from cadenza.bench.synthetic import SyntheticCheckpoint
from cadenza.errors import CadenzaError
from tests.bench.test_bench import bench_args, cpu_bench_args

GiB = 1 << 30


# --- the quantizers ---------------------------------------------------------------------------------------------------


def _awkward(shape, scale, seed):
    """bf16 weights with what trips quantizers: an all-zero block, opposite-sign ties of the largest magnitude,
    tiny scales (fp16 subnormals) and values on rounding boundaries."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)
    flat = x.view(-1)
    flat[:32] = 0
    if flat.numel() >= 96:
        m = flat[32:64].abs().max()
        flat[40], flat[50] = -m, m  # tie: the first (negative) one must decide Q4_0's sign
        flat[64:96] = torch.arange(-16, 16, dtype=torch.bfloat16) * 0.5  # halves: x / d lands on .5 in Q8_0
    return x


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize(
    "shape, scale", [((3, 5, 96), 1.0), ((7, 32), 1e-6), ((2, 1, 64), 300.0), ((257, 160), 0.02), ((33, 4096), 0.01)]
)
def test_quantizer_bytes_equal_gguf_py(qtype, shape, scale, monkeypatch):
    gguf = pytest.importorskip("gguf")
    x = _awkward(shape, scale, seed=sum(shape))
    want = gguf.quants.quantize(x.float().numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    assert quantize(x, qtype).numpy().tobytes() == want.tobytes()
    monkeypatch.setattr(gguf_quants, "_CHUNK_BLOCKS", 7)  # many uneven chunks over a pool of threads
    with single_threaded_ops(), ThreadPoolExecutor(3) as pool:
        got = quantize(x, qtype, pool=pool)
    assert got.shape == want.shape and got.numpy().tobytes() == want.tobytes()


def test_round_half_away_is_roundf():
    gguf = pytest.importorskip("gguf")
    edges = [0.49999997, 0.5, 0.50000006, 1.4999999, 1.5, 2.4999998, 2.5, 3.5, 126.49999, 126.5, 127.00001, 0.0, 1e-30]
    v = torch.tensor(edges + [-e for e in edges], dtype=torch.float32)
    v = torch.cat([v, torch.empty(100_000).uniform_(-128, 128), torch.randint(-254, 255, (1000,)) / 2.0])
    got = gguf_quants.round_half_away(v.abs(), v)
    assert torch.equal(got, torch.from_numpy(gguf.quants.np_roundf(v.numpy())))


def test_quantizer_refuses_rows_off_the_block():
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize(torch.zeros(4, 48), "Q8_0")


# --- the GGUF file ----------------------------------------------------------------------------------------------------

# keys and tensor names as llama.cpp spells them (src/llama-arch.cpp)
_HPARAMS = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "rope.dimension_count",
    "rope.freq_base",
    "attention.layer_norm_rms_epsilon",
    "expert_count",
    "expert_used_count",
)
_LAYER = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate_inp",
    "ffn_gate_exps",
    "ffn_down_exps",
    "ffn_up_exps",
)


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("model, fmt, arch", [("mixtral-tiny", "int8", "llama"), ("qwen3-tiny", "int4", "qwen3moe")])
def test_gguf_of_a_tiny_model_reads_back(tmp_path, model, fmt, arch):
    gguf = pytest.importorskip("gguf")
    ckpt = SyntheticCheckpoint(model)
    c = ckpt.config
    written = write_gguf(ckpt, tmp_path / "m.gguf", fmt, threads=2)
    assert written.nbytes == (tmp_path / "m.gguf").stat().st_size <= written.plan.file_bytes_bound()
    r = gguf.GGUFReader(tmp_path / "m.gguf")

    assert _field(r, "general.architecture") == arch
    assert _field(r, "general.file_type") == {"int8": 7, "int4": 2}[fmt]
    for key in _HPARAMS:
        assert f"{arch}.{key}" in r.fields, key
    heads, layers, n_vocab = c["num_attention_heads"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    assert _field(r, f"{arch}.block_count") == layers and _field(r, f"{arch}.embedding_length") == c["hidden_size"]
    assert _field(r, f"{arch}.attention.head_count_kv") == c["num_key_value_heads"]
    assert _field(r, f"{arch}.expert_used_count") == c["num_experts_per_tok"]
    assert _field(r, f"{arch}.rope.dimension_count") == head_dim
    n_experts = c.get("num_local_experts") or c["num_experts"]
    assert _field(r, f"{arch}.expert_count") == n_experts
    n_ff = c["intermediate_size"] if arch == "llama" else c["moe_intermediate_size"]
    if arch == "qwen3moe":
        assert _field(r, "qwen3moe.expert_feed_forward_length") == n_ff
        assert _field(r, "qwen3moe.attention.key_length") == _field(r, "qwen3moe.attention.value_length") == head_dim

    # the vocabulary: n_vocab distinct tokens (llama.cpp asserts that), types as int32, the special ids
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == len(set(tokens)) == n_vocab
    types = _field(r, "tokenizer.ggml.token_type")
    assert len(types) == n_vocab and r.fields["tokenizer.ggml.token_type"].types[-1] == gguf.GGUFValueType.INT32
    assert _field(r, "tokenizer.ggml.bos_token_id") == c["bos_token_id"]
    assert _field(r, "tokenizer.ggml.eos_token_id") == c["eos_token_id"]
    if arch == "llama":
        assert _field(r, "tokenizer.ggml.model") == "llama" and len(_field(r, "tokenizer.ggml.scores")) == n_vocab
        assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 10] == "<0x0A>"  # llama.cpp's newline
    else:
        assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "qwen2"
        assert _field(r, "tokenizer.ggml.merges") == ["Ġ Ġ"]
        alphabet = set(gpt2_byte_chars())  # llama.cpp maps every piece's characters back to bytes through it
        assert all(set(t) <= alphabet for t, k in zip(tokens, types, strict=True) if k == 1)
        assert tokens[c["bos_token_id"]] == "<|endoftext|>" and tokens[c["eos_token_id"]] == "<|im_end|>"

    # tensors: llama.cpp's names, its shapes (innermost first), and their types
    tensors = {t.name: t for t in r.tensors}
    per_layer = _LAYER + (("attn_q_norm", "attn_k_norm") if arch == "qwen3moe" else ())
    want = {"token_embd", "output_norm", "output"} | {f"blk.{i}.{n}" for i in range(layers) for n in per_layer}
    assert set(tensors) == {f"{n}.weight" for n in want}
    h, kv = c["hidden_size"], c["num_key_value_heads"] * head_dim
    shapes = {
        "token_embd": [h, n_vocab],
        "output": [h, n_vocab],
        "blk.1.attn_q": [h, heads * head_dim],
        "blk.1.attn_k": [h, kv],
        "blk.1.attn_output": [heads * head_dim, h],
        "blk.1.ffn_gate_inp": [h, n_experts],
        "blk.1.ffn_gate_exps": [h, n_ff, n_experts],
        "blk.1.ffn_up_exps": [h, n_ff, n_experts],
        "blk.1.ffn_down_exps": [n_ff, h, n_experts],
        "blk.1.attn_norm": [h],
    }
    for name, shape in shapes.items():
        assert tensors[f"{name}.weight"].shape.tolist() == shape, name
    qtype = {"int8": gguf.GGMLQuantizationType.Q8_0, "int4": gguf.GGMLQuantizationType.Q4_0}[fmt]
    for name, t in tensors.items():
        kind = name.split(".")[-2]
        expect = qtype if kind.endswith("_exps") else gguf.GGMLQuantizationType.F16
        if kind.endswith("norm") or kind == "ffn_gate_inp":
            expect = gguf.GGMLQuantizationType.F32
        assert t.tensor_type == expect, name

    # the weights: cadenza's own, experts within the block format's error, the rest as written
    src = dict(SyntheticCheckpoint(model).iter_tensors())
    proj = {"gate": "w1", "down": "w2", "up": "w3"}
    if arch == "qwen3moe":
        proj = {k: f"{k}_proj" for k in proj}
    moe = "block_sparse_moe" if arch == "llama" else "mlp"
    for i in (0, layers - 1):
        for kind, p in proj.items():
            t = tensors[f"blk.{i}.ffn_{kind}_exps.weight"]
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            ref = torch.stack([src[f"model.layers.{i}.{moe}.experts.{e}.{p}.weight"] for e in range(n_experts)]).float()
            assert got.shape == ref.shape
            blocks_ref, err = ref.reshape(-1, 32), (got - ref).reshape(-1, 32).abs()
            amax = blocks_ref.abs().amax(1, keepdim=True)
            # half a step, or a whole one for Q4_0 (-8 d is reachable, +8 d is not: q stops at 15), plus the fp16
            # rounding of d (2^-11 relative) times |q| <= 127 or 8
            step = amax / 127 if fmt == "int8" else amax / 8
            bound = step * (0.5 + 127 / 2048 if fmt == "int8" else 1 + 8 / 2048)
            assert (err <= bound * 1.001 + 1e-7).all(), f"{i} {kind}"
            assert err.mean() < 0.3 * step.mean()
    emb = torch.from_numpy(np.array(tensors["token_embd.weight"].data)).float()
    assert torch.equal(emb, src["model.embed_tokens.weight"].to(torch.float16).float())
    q = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data)).float()
    want_q = src["model.layers.0.self_attn.q_proj.weight"].to(torch.float16).float()
    assert torch.equal(q, interleave_rope_halves(want_q, heads) if arch == "llama" else want_q)
    router = np.array(tensors["blk.0.ffn_gate_inp.weight"].data)
    assert router.dtype == np.float32
    assert torch.equal(torch.from_numpy(router), src[f"model.layers.0.{moe}.gate.weight"].float())


def test_interleaved_rope_matches_rotate_half():
    """llama's rotary on adjacent pairs of the reordered rows == HF's rotate-half rotary on the original rows."""
    heads, hd, pos, base = 2, 8, 5, 10000.0
    w = torch.randn(heads * hd, 3, dtype=torch.float64)
    x = torch.randn(3, dtype=torch.float64)
    theta = pos * base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    q = (w @ x).view(heads, hd)
    half = hd // 2
    hf = q * torch.cat([theta.cos()] * 2) + torch.cat([-q[:, half:], q[:, :half]], 1) * torch.cat([theta.sin()] * 2)
    p = (interleave_rope_halves(w, heads) @ x).view(heads, half, 2)
    pairs = torch.stack(
        [p[..., 0] * theta.cos() - p[..., 1] * theta.sin(), p[..., 0] * theta.sin() + p[..., 1] * theta.cos()], -1
    )
    assert torch.allclose(pairs.view(heads, hd), interleave_rope_halves(hf.reshape(-1, 1), heads).view(heads, hd))


def test_gguf_plan_refuses_other_families():
    with pytest.raises(CadenzaError, match="deepseek_v2"):
        gguf_plan(SyntheticCheckpoint("deepseek-v2-tiny"), "int8")
    with pytest.raises(CadenzaError, match="int8"):
        gguf_plan(SyntheticCheckpoint("mixtral-tiny"), "bf16")


# --- --n-cpu-moe ------------------------------------------------------------------------------------------------------


def test_choose_n_cpu_moe():
    layers = [10, 10, 10, 10]
    pick = lambda budget: choose_n_cpu_moe(budget, layers, 5, 1, 2)  # noqa: E731
    assert pick(None).n_cpu_moe == 0 and pick(10**9).n_cpu_moe == 0
    assert pick(48).n_cpu_moe == 0 and pick(48).total_bytes == 48  # 5 + 40 + 1 + 2: all on the GPU
    # N = 1: 5 + 30 + 1 + 2 = 38 (no room kept for a host layer's experts: llama.cpp's compute buffer has none)
    assert (pick(47).n_cpu_moe, pick(47).total_bytes) == (1, 38)
    assert pick(38).n_cpu_moe == 1 and pick(37).n_cpu_moe == 2 and pick(28).n_cpu_moe == 2
    zero = pick(0)
    assert zero.n_cpu_moe == 4 and zero.expert_bytes == 0 and not zero.fits
    assert pick(17).n_cpu_moe == 4 and pick(17).fits  # every expert on the host: 5 + 1 + 2
    small = pick(7)
    assert small.n_cpu_moe == 4 and not small.fits  # nothing fits: every expert on the host, said so
    uneven = choose_n_cpu_moe(27, [1, 20, 1, 1], 5, 0, 0)  # N = 0: 28; N = 1: 5 + 22 = 27
    assert uneven.n_cpu_moe == 1 and uneven.total_bytes == 27


def test_n_cpu_moe_for_the_benchmark_models():
    """Full-size shapes (no weights made): each budget's N, and the KV cache as llama.cpp sizes it."""
    mixtral, qwen = SyntheticCheckpoint("mixtral-8x7b"), SyntheticCheckpoint("qwen3-30b-a3b")
    assert kv_cache_bytes(mixtral.config, 192) == 32 * 256 * 2 * 8 * 128 * 2
    assert kv_cache_bytes(mixtral.config, 512) == 32 * 512 * 2 * 8 * 128 * 2
    n = {}
    for name, ckpt, budget in (("mixtral", mixtral, 24), ("qwen", qwen, 8)):
        for fmt in ("int8", "int4"):
            plan = gguf_plan(ckpt, fmt)
            est = estimate_for(plan, budget, 512)
            assert est.fits and est.total_bytes <= budget * GiB
            assert estimate_for(plan, 0, 192).n_cpu_moe == ckpt.config["num_hidden_layers"]
            n[name, fmt] = est.n_cpu_moe
    assert 15 <= n["mixtral", "int8"] <= 21 and 2 <= n["mixtral", "int4"] <= 7  # peers/README: 17 and 4
    assert 35 <= n["qwen", "int8"] <= 44 and n["qwen", "int4"] < n["qwen", "int8"]  # peers/README: 36-39
    assert gguf_plan(mixtral, "int8").tensor_bytes == pytest.approx(51.1e9, rel=0.01)
    assert gguf_plan(mixtral, "int4").tensor_bytes == pytest.approx(28.6e9, rel=0.01)


# --- llama-bench's output ---------------------------------------------------------------------------------------------

# test::get_fields() and their JSON types, in order (tools/llama-bench/llama-bench.cpp)
_FIELDS = (
    ("build_commit", "s"), ("build_number", "i"), ("cpu_info", "s"), ("gpu_info", "s"), ("backends", "s"),
    ("model_filename", "s"), ("model_type", "s"), ("model_size", "i"), ("model_n_params", "i"), ("n_batch", "i"),
    ("n_ubatch", "i"), ("n_threads", "i"), ("cpu_mask", "s"), ("cpu_strict", "b"), ("poll", "i"), ("type_k", "s"),
    ("type_v", "s"), ("n_gpu_layers", "i"), ("n_cpu_moe", "i"), ("split_mode", "s"), ("main_gpu", "i"),
    ("no_kv_offload", "b"), ("flash_attn", "i"), ("devices", "s"), ("tensor_split", "s"),
    ("tensor_buft_overrides", "s"), ("load_mode", "s"), ("lazy_mode", "s"), ("embeddings", "b"),
    ("no_op_offload", "i"), ("no_host", "b"), ("repack", "b"), ("fit_target", "i"), ("fit_min_ctx", "i"),
    ("n_prompt", "i"), ("n_gen", "i"), ("n_depth", "i"), ("test_time", "s"), ("avg_ns", "i"), ("stddev_ns", "i"),
    ("avg_ts", "f"), ("stddev_ts", "f"),
)  # fmt: skip


def llama_bench_json(tests: list[tuple[int, int, int, list[int]]], n_cpu_moe: int = 19) -> str:
    """What llama-bench -o json prints for tests of (n_prompt, n_gen, n_depth, samples_ns): json_printer's
    header, one object per test (fields, then samples_ns and samples_ts), footer."""
    out = "[\n"
    for k, (p, g, d, ns) in enumerate(tests):
        ts = [1e9 * (p + g) / t for t in ns]
        avg_ts = sum(ts) / len(ts)
        values = {"build_commit": "6fa3b0c", "build_number": 1, "cpu_info": "Intel(R) Xeon(R) Platinum 8480+",
                  "gpu_info": "NVIDIA H200", "backends": "CUDA", "model_filename": "/tmp/m.gguf",
                  "model_type": "llama 8x7B Q8_0", "model_size": 51134005248, "model_n_params": 46702792704,
                  "n_batch": 2048, "n_ubatch": 512, "n_threads": 16, "cpu_mask": "0x0", "cpu_strict": "0",
                  "poll": 50, "type_k": "f16", "type_v": "f16", "n_gpu_layers": 99, "n_cpu_moe": n_cpu_moe,
                  "split_mode": "layer", "main_gpu": 0, "no_kv_offload": "0", "flash_attn": -1, "devices": "auto",
                  "tensor_split": "0.00", "tensor_buft_overrides": "none", "load_mode": "auto", "lazy_mode": "auto",
                  "embeddings": "0", "no_op_offload": 0, "no_host": "0", "repack": "1", "fit_target": 0,
                  "fit_min_ctx": 0, "n_prompt": p, "n_gen": g, "n_depth": d, "test_time": "2026-12-02T09:00:00Z",
                  "avg_ns": sum(ns) // len(ns), "stddev_ns": 1234567, "avg_ts": f"{avg_ts:f}",
                  "stddev_ts": "0.012345"}  # fmt: skip
        fmt = {"s": lambda v: json.dumps(v), "b": lambda v: "false" if v == "0" else "true", "i": str, "f": str}
        out += (",\n" if k else "") + "  {\n"
        out += "".join(f'    "{f}": {fmt[t](values[f])},\n' for f, t in _FIELDS)
        out += f'    "samples_ns": [ {", ".join(map(str, ns))} ],\n'
        out += f'    "samples_ts": [ {", ".join(f"{x:.6g}" for x in ts)} ]\n  }}'
    return out + "\n]\n"


def test_parse_llama_bench_json():
    text = llama_bench_json([(512, 0, 0, [2_890_000_000, 2_900_000_000, 2_910_000_000]),
                             (0, 128, 64, [10_600_000_000, 10_500_000_000, 10_700_000_000])])  # fmt: skip
    tests = parse_bench_json(text)
    tg = find_test(tests, BenchTest(0, 128, 64))
    assert tg["n_cpu_moe"] == 19 and tg["cpu_strict"] is False and tg["repack"] is True
    assert tg["samples_ns"] == [10_600_000_000, 10_500_000_000, 10_700_000_000]
    assert tg["samples_ts"][1] == pytest.approx(128 / 10.5, rel=1e-5)
    assert find_test(tests, BenchTest(512, 0, 0))["avg_ts"] == pytest.approx(512 / 2.9, rel=1e-3)
    with pytest.raises(CadenzaError, match="pp64"):
        find_test(tests, BenchTest(64, 0, 0))
    with pytest.raises(CadenzaError, match="not the JSON"):
        parse_bench_json(text[: len(text) // 2])  # a run cut short


def test_peer_tests_and_command():
    assert peer_test(64, 128) == BenchTest(0, 128, 64) and peer_test(64, 128).label == "tg128 @ d64"
    assert peer_test(512, 1) == BenchTest(512, 0, 0) and peer_test(512, 1).n_ctx == 512
    argv = bench_command("/x/llama-bench", "/t/m.gguf", BenchTest(0, 128, 64), 19, 16, 3)
    assert argv == ["/x/llama-bench", "-m", "/t/m.gguf", "-ngl", "99", "--n-cpu-moe", "19", "-t", "16", "-p", "0",
                    "-n", "128", "-d", "64", "-r", "3", "-o", "json"]  # fmt: skip
    assert bench_command("b", "m", BenchTest(0, 1, 511), 0, 4, 1, verbose=True)[-2:] == ["--no-warmup", "-v"]


_LOG = """\
load_tensors: offloading output layer to GPU
load_tensors:   CPU_Mapped model buffer size = 24576.12 MiB
load_tensors:        CUDA0 model buffer size = 20123.50 MiB
load_tensors:        CUDA0 model buffer size =   900.25 MiB
llama_context: n_ctx                 = 512
llama_context:  CUDA_Host  output buffer size =     0.12 MiB
llama_kv_cache:      CUDA0 KV buffer size =    64.00 MiB
llama_context:      CUDA0 compute buffer size =  1532.00 MiB
llama_context:  CUDA_Host compute buffer size =    12.01 MiB
llama_context:      CUDA0 compute buffer size is 1532.0000 MiB, matches expectation of 1532.0000 MiB
"""


def test_parse_buffer_sizes():
    sizes = parse_buffer_sizes(_LOG)
    assert sizes["model"] == {"CPU_Mapped": 24576.12, "CUDA0": 21023.75}
    assert sizes["KV"] == {"CUDA0": 64.0} and sizes["compute"] == {"CUDA0": 1532.0, "CUDA_Host": 12.01}
    gpu = device_mib(sizes)
    assert gpu["model"] == 21023.75 and gpu["output"] == 0 and gpu["total"] == pytest.approx(21023.75 + 64 + 1532)
    assert parse_buffer_sizes("no such lines") == {} and device_mib({}) == {"total": 0}


# --- the run ----------------------------------------------------------------------------------------------------------


def _stand_in(tmp_path, body: str):
    """An executable in place of llama-bench; `body` is Python with `argv` (its arguments) and `a(flag)`."""
    path = tmp_path / "llama-bench"
    path.write_text(
        f"#!{sys.executable}\nimport json, os, sys\nargv = sys.argv[1:]\na = lambda f: argv[argv.index(f) + 1]\n" + body
    )
    path.chmod(0o755)
    return path


def test_peer_argument_errors(tmp_path):
    out = tmp_path / "out"
    not_exec = tmp_path / "plain"
    not_exec.write_text("")
    run = lambda *a: run_bench(bench_args("--device", "cpu", "--out", str(out), *a))  # noqa: E731
    with pytest.raises(CadenzaError, match="unknown peer"):
        run("--scenario", "F3", "--peer", "vllm=/bin/true")
    with pytest.raises(CadenzaError, match="NAME=PATH"):
        run("--scenario", "F3", "--peer", "llama.cpp")
    with pytest.raises(CadenzaError, match="does not exist"):
        run("--scenario", "F3", "--peer", f"llama.cpp={tmp_path / 'nope'}")
    with pytest.raises(CadenzaError, match="not an executable"):
        run("--scenario", "F3", "--peer", f"llama.cpp={not_exec}")
    with pytest.raises(CadenzaError, match="not an executable"):
        run("--scenario", "F3", "--peer", f"llama.cpp={tmp_path}")
    with pytest.raises(CadenzaError, match="twice"):
        run("--scenario", "D4", "--peer", "llama.cpp=/bin/true", "--peer", "llama.cpp=/bin/true")
    with pytest.raises(CadenzaError, match="quantized experts"):
        run("--scenario", "D1", "--peer", "llama.cpp=/bin/true")
    assert not out.exists()  # refused before measuring anything
    assert parse_peers(["llama.cpp=/bin/true"])[0].path.name in ("true", "coreutils")


def test_not_enough_disk_says_how_much(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp_peer.shutil, "disk_usage", lambda p: SimpleNamespace(free=3 * GiB))
    with pytest.raises(CadenzaError, match=r"needs 47\.\d GiB .* 3\.0 GiB are free.*--peer-dir"):
        llama_cpp_peer.check_disk(tmp_path, gguf_plan(SyntheticCheckpoint("mixtral-8x7b"), "int8").file_bytes_bound())
    with pytest.raises(CadenzaError, match="GiB are free"):
        run_bench(
            bench_args(
                "--device",
                "cpu",
                "--scenario",
                "D4",
                "--peer",
                "llama.cpp=/bin/true",
                "--model",
                "mixtral-8x7b",
                "--out",
                str(tmp_path / "out"),
            )
        )


def test_llama_bench_failure_shows_its_stderr(tmp_path):
    binary = _stand_in(
        tmp_path, "print('llama_model_load: error loading model: bad tensor', file=sys.stderr)\nsys.exit(1)\n"
    )
    with pytest.raises(CadenzaError, match=r"exit status 1(.|\n)*error loading model: bad tensor"):
        run_llama_bench([str(binary), "-m", "x"], timeout_s=60)
    slow = _stand_in(tmp_path, "import time\nprint('loading', file=sys.stderr, flush=True)\ntime.sleep(30)\n")
    with pytest.raises(CadenzaError, match=r"past 1 s(.|\n)*loading"):
        run_llama_bench([str(slow)], timeout_s=1)


_REPLAY = """\
assert os.path.exists(a("-m")), "the GGUF must exist while llama-bench runs"
with open(os.environ["STAND_IN_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
if "-v" in argv:
    sys.stderr.write(LOG)
p, g, d, r = int(a("-p")), int(a("-n")), int(a("-d")), int(a("-r"))
print(JSON[(p, g, d, r)], end="")
"""


@pytest.mark.parametrize("fails", [False, True])
def test_run_bench_f3_with_the_peer(tmp_path, monkeypatch, fails):
    """F3 on qwen3-tiny: cadenza's rows, then the peer's in the same JSON; the GGUF exists only during the peer."""
    pytest.importorskip("gguf")
    tests = {(0, 3, 8, 1): [300_000_000], (8, 0, 0, 1): [20_000_000], (0, 1, 10, 1): [1_000_000]}
    canned = {k: llama_bench_json([(*k[:3], ns)]) for k, ns in tests.items()}
    body = f"LOG = {_LOG!r}\nJSON = {canned!r}\n" + ("sys.exit('boom')\n" if fails else "") + _REPLAY
    binary = _stand_in(tmp_path, body)
    log = tmp_path / "argv.log"
    monkeypatch.setenv("STAND_IN_LOG", str(log))
    args = cpu_bench_args(
        tmp_path / "o", 3, "--scenario", "F3", "--peer", f"llama.cpp={binary}", "--peer-dir", str(tmp_path / "gguf")
    )
    if fails:
        with pytest.raises(CadenzaError, match="exit status 1(.|\n)*boom"):
            run_bench(args)
    else:
        assert run_bench(args) == 0
    assert not list((tmp_path / "gguf").iterdir())  # deleted after llama-bench
    (f,) = (tmp_path / "o").glob("F3-*.json")
    doc = json.loads(f.read_text())
    assert doc["complete"] and "--peer" in doc["command"]
    rows = doc["results"]
    cadenza = [r for r in rows if r["system"] == "cadenza"]
    peer = [r for r in rows if r["system"] == "llama.cpp"]
    assert rows[: len(cadenza)] == cadenza  # the peer runs after cadenza's configurations
    got = [(r["gpu_budget_gib"], r["prompt_tokens"], r["new_tokens"]) for r in peer]
    assert got == [(8, 8, 3), (0, 8, 3), (8, 8, 1)]
    assert {c.budget for c in plan_configs(["F3"], [])} == {8, 0}
    for r in peer:
        assert set(r) >= set(REQUIRED_KEYS) and r["model"] == "qwen3-tiny" and r["cpu_experts"] == "int8"
        assert "error_vs_bf16" not in r  # cadenza's int8 error is not llama.cpp's Q8_0 one
    if fails:
        assert all(r["skipped"] and "boom" in r["notes"][-1] for r in peer)
        return
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # per budget: the -v run for the buffer sizes (the budget's largest context: 8 + 3), then the timed tests
    assert [("-v" in c, c[c.index("-d") + 1]) for c in calls] == [(True, "10"), (False, "8"), (True, "10"),
                                                                   (False, "8"), (False, "0")]  # fmt: skip
    decode, host, prefill = peer
    assert decode["n_cpu_moe"] == decode["gpu_estimate"]["n_cpu_moe"] and decode["gguf_type"] == "Q8_0"
    assert host["n_cpu_moe"] == 4 and host["placement"]["resident_per_layer"] == [0] * 4
    assert decode["decode_tok_s"] == pytest.approx(3 / 0.3) and decode["trial_times_s"] == [0.3]
    assert math.isfinite(decode["roofline_fraction"]) and decode["host_bytes_per_token"] >= 0
    assert prefill["prefill_tok_s"] == pytest.approx(8 / 0.02) and prefill["ttft_s"] == pytest.approx(0.02)
    assert prefill["decode_tok_s"] is None
    assert decode["peak_gpu_mem_gib"] == pytest.approx((21023.75 + 64 + 1532) / 1024, abs=1e-3)
    assert decode["command"].startswith(str(binary)) and "--n-cpu-moe" in decode["command"]
    assert decode["gpu_buffers_reported"]["gpu_mib"]["model"] == 21023.75
