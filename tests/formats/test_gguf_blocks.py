"""GGUF experts kept in their blocks (`--experts auto`): K-quant files (Q4_K experts with Q6_K down projections,
as llama.cpp's Q4_K_M writes them; layers mixing q4_k and q4_k+q6_k) score as the same file dequantized at load
(gguf-py's dequantizers: the reference), on the CPU and offloaded; `cadenza info` names each layer's format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cadenza import LLM, SamplingParams
from tests.conftest import prompt_ids
from tests.formats.gguf_files import fuse_gate_up, rewrite_gguf, write_gguf
from tests.kernels.block_data import random_blocks
from tests.models.test_qwen3_moe import make_qwen3_moe

pytest.importorskip("gguf")


def write_kquant_gguf(folder, out, down_types=("Q6_K", "Q4_K"), gate_type="Q4_K"):
    """`folder`'s model as GGUF with routed experts of random K-quant blocks (gate/up `gate_type`, layer l's down
    projections down_types[l % len]) and every other tensor F32."""
    import gguf

    path = write_gguf(folder, out.with_suffix(".f32.gguf"))

    def edit(tensors: dict) -> dict:
        for name, (data, _) in list(tensors.items()):
            if "_exps" in name:
                e, rows, cols = data.shape
                layer = int(name.split(".")[1])
                qtype = down_types[layer % len(down_types)] if "down" in name else gate_type
                raw = np.stack(
                    [random_blocks(qtype, rows, cols, seed=1000 * layer + 10 * i + hash(name) % 7) for i in range(e)]
                )
                tensors[name] = (raw, gguf.GGMLQuantizationType[qtype])
        return tensors

    rewrite_gguf(path, out, edit)
    path.unlink()
    return out


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("kq")
    folder, _ = make_qwen3_moe(
        root / "hf", hidden_size=256, moe_intermediate_size=256, intermediate_size=256, num_hidden_layers=2,
        norm_topk_prob=True,
    )  # fmt: skip
    return write_kquant_gguf(folder, root / "m.gguf")


def test_kquant_experts_kept_equal_dequantized(kquant_file):
    ids = prompt_ids(10)
    ref = LLM(kquant_file, device="cpu", dtype="float32", experts="bf16")
    llm = LLM(kquant_file, device="cpu", dtype="float32")
    assert llm.expert_format.fmt == "blocks"
    assert list(llm.expert_format.layer_formats) == ["q4_k+q6_k", "q4_k"]
    torch.testing.assert_close(llm.score(ids), ref.score(ids), rtol=0, atol=2e-5)
    want = ref.generate(ids[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)).token_ids
    # offloaded: some experts on the "GPU side" (emulated on the CPU), the others computed by the CPU path or
    # fetched into slots sized for the larger layer's experts (q4_k+q6_k) and viewed as the other's (q4_k)
    for policy in ("cpu", "fetch", "auto"):
        off = LLM(kquant_file, device="cpu", dtype="float32", gpu_memory="32.8MiB", offload_policy=policy)
        small, large = sorted(off.placement.layer_expert_bytes)  # planned at each layer's own size
        assert small < large == off.placement.expert_bytes and off.placement.gpu_bytes <= 32.8 * 2**20
        torch.testing.assert_close(off.score(ids), ref.score(ids), rtol=0, atol=2e-5)
        out = off.generate(ids[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert out.token_ids == want
        if policy == "fetch":
            assert out.stats.expert_work["fetched"] > 0


def test_fused_gate_up_kquant_experts_kept(kquant_file, tmp_path):
    """Q4_K gate and up fused in ffn_gate_up_exps (--fuse-gate-up-exps) move into the tiles as the separate ones do
    (repack.cpp's whole-layer path reads each half's rows): the same scores, bit for bit."""
    fused = fuse_gate_up(kquant_file, tmp_path / "fused.gguf")
    ids = prompt_ids(10)
    want, llm = (LLM(f, device="cpu", dtype="float32") for f in (kquant_file, fused))
    assert list(llm.expert_format.layer_formats) == ["q4_k+q6_k", "q4_k"]
    assert torch.equal(llm.score(ids), want.score(ids))


def test_info_names_each_layers_format(kquant_file):
    from tests.cli.test_cli import cli

    r = cli("info", "--model", str(kquant_file), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["expert_formats_per_layer"] == ["q4_k+q6_k", "q4_k"]
    assert d["gguf_types"]["experts"].keys() == {"Q4_K", "Q6_K"}
    assert d["expert_bytes"] > 0
    r = cli("info", "--model", str(kquant_file), "--dtype", "float32", "--json")
    assert json.loads(r.stdout)["cpu_activations"].startswith("exact")  # an fp32 run: the exact products
    from cadenza.kernels import cpu_moe

    r = cli("info", "--model", str(kquant_file), "--dtype", "bfloat16", "--gpu-memory", "1GiB")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("cpu products"))
    if cpu_moe.has_int8_dot():  # auto: int8 activations for the K-quant experts of a bf16 run
        assert "int8 activations for the q4_k, q6_k experts" in line, line
    else:
        assert "exact" in line, line


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
@pytest.mark.parametrize("residents", [0, 6, 16])
def test_cuda_kept_blocks_equal_cpu(kquant_file, policy, residents):
    """On a CUDA GPU, the kept q4_k / q4_k+q6_k experts resident (Triton's block-format kernels), fetched, or on the
    host (the CPU kernel), CUDA graphs on: the CPU run's logits and greedy tokens."""
    from tests.conftest import budget_for

    ids = prompt_ids(12)
    cpu = LLM(kquant_file, device="cpu", dtype="float32")
    want = cpu.score(ids)
    tokens = cpu.generate(ids[:6], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)).token_ids
    from cadenza.moe.offload.policy import fetch_slots

    slots = fetch_slots(policy, cpu.config.num_experts_per_tok)  # what the policy reserves: max(2, top_k) or 0
    budget = "0" if residents == 0 and policy == "cpu" else budget_for(kquant_file, residents, slots, device="cuda")
    llm = LLM(kquant_file, device="cuda", dtype="float32", gpu_memory=budget, offload_policy=policy)
    try:
        assert llm.placement.resident_count == residents
        torch.testing.assert_close(llm.score(ids).cpu(), want, rtol=0, atol=1e-4)
        got = llm.generate(ids[:6], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)).token_ids
        assert got == tokens
    finally:
        llm.close()


@pytest.mark.parametrize(
    "gate_type,down_type",
    [("Q4_K", "Q6_K"), ("Q4_K", "Q4_K"), ("Q5_K", "Q6_K"), ("Q8_0", "Q8_0"), ("Q4_0", "Q4_0"), ("MXFP4", "MXFP4")],
)
def test_repack_writes_the_tiles_numpy_writes(gate_type, down_type):
    """repack.cpp (the loader's path for expert blocks) moves the blocks' bits into the same tile bytes as
    blocks.from_gguf + layout.write_block_expert (the reference), header padding included."""
    from cadenza.kernels import repack
    from cadenza.kernels.blocks import BY_GGUF, from_gguf
    from cadenza.kernels.layout import empty_packed, write_block_expert

    assert repack.moves(gate_type, 512) and repack.moves(down_type, 768), repack._library.reason
    assert not repack.moves("Q4_K", 384) and not repack.moves("Q8_0", 96)  # numpy's path for those
    e, h, i = 3, 512, 768
    gate, up = (random_blocks(gate_type, e * i, h, seed=s) for s in (1, 2))
    down = random_blocks(down_type, e * h, i, seed=3)
    gu, dn = BY_GGUF[gate_type], BY_GGUF[down_type]
    fmt = gu if gu == dn else f"{gu}+{dn}"
    want = empty_packed(fmt, None, e, h, i)
    write_block_expert(
        want, 0, from_gguf(gate_type, gate, h), from_gguf(gate_type, up, h), from_gguf(down_type, down, i)
    )
    got = empty_packed(fmt, None, e, h, i)
    got.gate_up.fill_(0xAB)  # (stale bytes: the padding must be written too)
    got.down.fill_(0xAB)
    repack.repack_layer(got, [(gate_type, gate, h), (gate_type, up, h), (down_type, down, i)], threads=2)
    assert torch.equal(got.gate_up, want.gate_up) and torch.equal(got.down, want.down)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0"])
def test_native_dequantize_equals_gguf_py(qtype):
    """repack.cpp's dequantizer (dense tensors and experts not kept in blocks) gives gguf-py's values bit for bit,
    subnormal and zero scales included; lengths it does not take go back to gguf-py."""
    from cadenza.kernels import repack
    from tests.kernels.block_data import reference

    raw = random_blocks(qtype, 37, 512, seed=7)
    at = 208 if qtype == "Q6_K" else 0  # the first block's d
    raw[:3, at : at + 2] = 0  # a zero d, and a subnormal one
    raw[3:6, at : at + 2] = np.frombuffer(np.float16(3e-7).tobytes(), np.uint8)
    got = repack.dequantize(qtype, raw, 512, threads=2)
    assert got is not None and torch.equal(got, reference(qtype, raw))
    stacked = raw.reshape(37, 1, -1)[:36].reshape(4, 9, -1)  # experts' stacks: [E, rows, bytes]
    assert torch.equal(repack.dequantize(qtype, stacked, 512), reference(qtype, raw[:36]).reshape(4, 9, 512))
    assert repack.dequantize("Q4_K", raw, 384) is None and repack.dequantize("Q2_K", raw, 512) is None
