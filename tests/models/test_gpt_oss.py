"""GPT-OSS computed by cadenza equals transformers' GptOssForCausalLM on tiny random checkpoints, plain and MXFP4."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cadenza import LLM, SamplingParams
from cadenza.models.mxfp4 import dequantize_mxfp4
from tests.conftest import (
    assert_config_refused,
    assert_hybrid_matches,
    assert_score_matches,
    edit_config,
    make_hf_model,
    prompt_ids,
    reference_logits,
    tiny_config,
)

TOL = 1e-4
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 64,
    "rope_theta": 150000.0,
}


def _vectors(name, p):
    # biases away from zero (norm weights around 1), so that routing, sinks and the clamp (limit 7) all matter
    p.copy_(0.3 * torch.randn_like(p) + (1.0 if "norm" in name else 0.0))


def make_gpt_oss(path, seed: int = 0, **overrides):
    """A tiny random GptOssForCausalLM saved to `path` (fp32); returns (folder, the transformers model). The window
    (5) is shorter than the prompts, so the sliding layers really slide."""
    kw = dict(
        intermediate_size=32,
        num_hidden_layers=4,
        head_dim=16,
        num_local_experts=8,
        sliding_window=5,
        pad_token_id=None,
        rope_parameters=YARN,
    )
    return make_hf_model(path, tiny_config("GptOss", kw, overrides), seed, _vectors)


CONFIGS = {
    "gqa-yarn-window5": {},
    "no-attention-bias-top3": dict(attention_bias=False, num_experts_per_tok=3),
    "all-full-attention": dict(layer_types=["full_attention"] * 4),
    "tight-clamp": dict(swiglu_limit=0.5, swiglu_alpha=2.5),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_gpt_oss(tmp_path_factory.mktemp("gpt_oss"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_score_matches_transformers(tmp_path, name):
    assert_score_matches(*make_gpt_oss(tmp_path / name, **CONFIGS[name]), n=20, tol=TOL)


def test_sinks_window_and_clamp_matter(base, tmp_path):
    """Each of the family's differences changes the logits, so the configurations above test them."""
    path, hf = base
    ids = prompt_ids(20)
    want = LLM(path, device="cpu", dtype="float32").score(ids)
    for name, change in {
        "window": dict(sliding_window=64),
        "clamp": dict(swiglu_limit=0.2),
        "layer types": dict(layer_types=["full_attention"] * 4),
    }.items():
        other = tmp_path / name.replace(" ", "-")
        shutil.copytree(path, other)
        edit_config(other, **change)
        got = LLM(other, device="cpu", dtype="float32").score(ids)
        assert (got - want).abs().max().item() > 1e-2, name
    zeroed = LLM(path, device="cpu", dtype="float32")
    for layer in zeroed.model.model.layers:
        layer.self_attn.sinks.data.fill_(-1e4)  # a sink that takes no probability: plain softmax attention
    assert (zeroed.score(ids) - want).abs().max().item() > 1e-2


def _to_mxfp4(path, dst, seed: int = 0):
    """`path`'s checkpoint with its experts replaced by random MXFP4 blocks and scales, as the hub publishes gpt-oss
    (blocks [E, rows, cols / 32, 16], scales [E, rows, cols / 32], rows the output features)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(path, dst)
    tensors = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, cols, rows = t.shape
            out[f"{name}_blocks"] = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
            out[f"{name}_scales"] = torch.randint(122, 128, (e, rows, cols // 32), generator=g, dtype=torch.uint8)
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_mxfp4_checkpoint_matches_transformers(base, tmp_path):
    """An MXFP4 checkpoint: cadenza's exact dequantization at load gives transformers' logits (its own MXFP4 loader,
    dequantizing)."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    path = _to_mxfp4(base[0], tmp_path / "mxfp4")
    hf = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True))
    ids = prompt_ids(16, seed=4)
    got = LLM(path, device="cpu", dtype="float32").score(ids)
    assert (got - reference_logits(hf.eval(), ids)).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def mxfp4(base, tmp_path_factory):
    return _to_mxfp4(base[0], tmp_path_factory.mktemp("gpt-oss-mxfp4") / "m")


def test_mxfp4_experts_stay_mxfp4(mxfp4):
    """Host experts are the checkpoint's blocks and scales moved into the kernels' mxfp4 tiles (0.53 bytes a weight,
    rows and columns padded to 128, plus the biases), and the planner sizes them so."""
    from cadenza.kernels.layout import expert_nbytes

    llm = LLM(mxfp4, device="cpu", dtype="float32")
    experts = llm.model.model.layers[0].mlp.experts
    assert experts.storage == "mxfp4" and experts.packed is not None and experts.packed.fmt == "mxfp4"
    h, i = 64, 32
    assert experts.expert_nbytes == expert_nbytes("mxfp4", None, h, i) + 4 * (2 * i + h)  # tiles, fp32 biases
    assert llm.sizes.expert_bytes == experts.expert_nbytes
    dropped = {f"model.layers.{n}.mlp.experts.{s}" for n in range(4) for s in experts.MXFP4_STACKS}
    assert not any(p.is_meta for n, p in llm.model.named_parameters() if n not in dropped)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_mxfp4_hybrid_equals_single_device(mxfp4, policy):
    """MXFP4 experts resident on the (emulated) GPU, fetched into slots and computed on the CPU, all as blocks: the
    all-resident model's logits and tokens."""
    assert_hybrid_matches(mxfp4, policy, 12, 2, prompt_ids(20, seed=9), 8, None, "either", TOL)


def test_mxfp4_dequantization_is_the_format():
    """Nibbles low first, sign in bit 3, e2m1 magnitudes, a power-of-two scale per 32 values, written out by hand."""
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)  # one row of one block
    blocks[0, 0, 0] = 0x9 << 4 | 0x7  # value 0: +6, value 1: -0.5
    blocks[0, 0, 15] = 0xA << 4 | 0x3  # value 30: +1.5, value 31: -1
    w = dequantize_mxfp4(blocks, torch.tensor([[129]], dtype=torch.uint8))  # scale 2^2
    assert w.shape == (1, 32)
    assert w[0, :2].tolist() == [24.0, -2.0] and w[0, 30:].tolist() == [6.0, -4.0]
    assert w[0, 2:30].abs().sum().item() == 0.0


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_single_device(base, policy):
    """Some experts off the (emulated) GPU: every policy computes the all-resident model, biases and clamp included."""
    # 12 of 4 layers x 8 experts resident
    assert_hybrid_matches(base[0], policy, 12, 2, prompt_ids(20, seed=5), 10, None, "either", TOL)


def test_quantized_experts_run_with_biases(base):
    """--experts int8 on gpt-oss: the kernels compute the biased, clamped experts from int8 tiles; the logits stay
    within int8's quantization error of the exact ones (groups of 32: measured 2.6% on this tiny random model,
    whose logits are large; per channel 7.8%)."""
    ids = prompt_ids(12, seed=2)
    exact = LLM(base[0], device="cpu", dtype="float32").score(ids)
    got = LLM(base[0], device="cpu", dtype="float32", experts="int8", expert_group=32).score(ids)
    assert ((got - exact).norm() / exact.norm()).item() < 0.05
    # offloaded: int8 tiles with their bias rows resident on the (emulated) GPU side, fetched, or on the CPU
    probe = LLM(base[0], device="cpu", dtype="float32", experts="int8", expert_group=32, gpu_memory="8GiB")
    p = probe.placement
    probe.close()
    budget = p.always_bytes + p.kv_bytes + p.workspace_bytes + (12 + 2) * p.expert_bytes
    for policy in ("cpu", "fetch", "auto"):
        off = LLM(base[0], device="cpu", dtype="float32", experts="int8", expert_group=32, gpu_memory=budget,
                  offload_policy=policy)  # fmt: skip
        assert 0 < off.placement.resident_count < 32  # some resident, the rest fetched or on the CPU
        assert (off.score(ids) - got).abs().max().item() <= TOL
        off.close()


def test_config_mistakes_are_clear(base, tmp_path):
    bad = shutil.copytree(base[0], tmp_path / "bad")
    assert_config_refused(bad, "layer_types has 2 entries", layer_types=["full_attention", "sliding_attention"])
    assert_config_refused(bad, "num_local_experts", layer_types=None, num_local_experts=None)


def test_mxfp4_elsewhere_is_refused(tmp_path):
    from tests.conftest import make_mixtral

    path, _ = make_mixtral(tmp_path / "mixtral")
    assert_config_refused(path, "MXFP4 in gpt-oss checkpoints only", quantization_config={"quant_method": "mxfp4"})


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
@pytest.mark.parametrize("residents", [0, 12, 32])
def test_cuda_equals_transformers(base, policy, residents):
    """On a CUDA GPU, all resident or offloaded under each policy (CUDA graphs on by default): transformers' logits
    and the CPU run's greedy tokens."""
    from tests.conftest import budget_for

    path, hf = base
    ids = prompt_ids(20, seed=6)
    want = reference_logits(hf, ids)
    cpu = LLM(path, device="cpu", dtype="float32")
    tokens = cpu.generate(ids[:6], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)).token_ids
    slots = 0 if policy == "cpu" else 2
    budget = "0" if residents == 0 and policy == "cpu" else budget_for(path, residents, slots, device="cuda")
    llm = LLM(path, device="cuda", dtype="float32", gpu_memory=budget, offload_policy=policy)
    try:
        assert llm.placement.resident_count == residents
        assert (llm.score(ids) - want).abs().max().item() <= TOL
        out = llm.generate(ids[:6], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        assert out.token_ids == tokens
    finally:
        llm.close()


# --- GGUF files (llama.cpp's gpt-oss layout) ----------------------------------------------------------------------


def _gguf_reference(file, folder, dst, qtype):
    """What a GGUF with quantized matrices must score like: the HF folder with gguf-py's round trip of each plain
    matrix (`dequantized_folder`) and the GGUF's experts as gguf-py dequantizes them, put back in transformers' fused
    layout (the expert biases stay float, as in the file)."""
    import gguf
    from safetensors.torch import load_file, save_file

    from tests.formats.gguf_files import dequantized_folder

    reader = gguf.GGUFReader(file)
    deq = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    dequantized_folder(folder, dst, qtype)
    source = load_file(str(folder / "model.safetensors"))
    sd = load_file(str(dst / "model.safetensors"))
    for name in list(sd):
        if name.endswith("_bias") or ".router." in name:  # kept float in the file (ffn_gate_inp is never quantized)
            sd[name] = source[name]
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        layer = name.split(".")[2]
        if name.endswith("down_proj"):  # GGUF [E, H, I] -> HF [E, I, H]
            sd[name] = torch.from_numpy(deq[f"blk.{layer}.ffn_down_exps.weight"]).transpose(1, 2).contiguous()
            continue
        gate, up = (torch.from_numpy(deq[f"blk.{layer}.ffn_{k}_exps.weight"]) for k in ("gate", "up"))
        fused = torch.stack((gate, up), dim=2).reshape(gate.shape[0], -1, gate.shape[2])  # rows interleaved
        sd[name] = fused.transpose(1, 2).contiguous()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("qtype", ["F32", "MXFP4", "Q8_0"])
def test_gguf_matches_reference(base, tmp_path, qtype):
    """A gpt-oss GGUF as llama.cpp's converter writes it (experts split and de-interleaved, biases per matrix, sinks,
    the router's bias): F32 scores like transformers on the source; MXFP4 / Q8_0 experts like the HF model holding
    gguf-py's dequantized weights."""
    from tests.formats.gguf_files import write_gguf

    folder, hf = base
    file = write_gguf(folder, tmp_path / f"gpt-oss-{qtype}.gguf", qtype)
    llm = LLM(file, device="cpu", dtype="float32")
    assert llm.checkpoint.architecture == "GptOssForCausalLM"
    ids = prompt_ids(16, seed=8)
    got = llm.score(ids)
    if qtype == "F32":
        want = reference_logits(hf, ids)
    else:
        experts = llm.model.model.layers[0].mlp.experts
        if qtype == "MXFP4":  # kept in its blocks, rearranged into the HF layout (0.53 bytes a weight)
            assert llm.checkpoint.tensors["model.layers.0.mlp.experts.0.gate_blocks"].dtype == qtype
            assert experts.storage == "mxfp4" and experts.gate_blocks.dtype == torch.uint8
        else:
            assert llm.checkpoint.tensors["model.layers.0.mlp.experts.0.gate_proj.weight"].dtype == qtype
            assert experts.storage == "plain"
        # either way the kernels' tiles of the file's blocks, with the biases beside them
        assert experts.packed is not None and experts.packed.fmt == qtype.lower() and experts.kernel_biases()
        want = LLM(_gguf_reference(file, folder, tmp_path / "ref", qtype), device="cpu", dtype="float32").score(ids)
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_cuda_mxfp4_equals_cpu(mxfp4, policy):
    """MXFP4 experts on a CUDA GPU (residents and fetch slots hold blocks, dequantized per use): the CPU run's
    logits and greedy tokens."""
    from tests.conftest import budget_for

    ids = prompt_ids(20, seed=10)
    cpu = LLM(mxfp4, device="cpu", dtype="float32")
    want = cpu.score(ids)
    tokens = cpu.generate(ids[:6], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)).token_ids
    budget = budget_for(mxfp4, 12, 0 if policy == "cpu" else 2, device="cuda")
    llm = LLM(mxfp4, device="cuda", dtype="float32", gpu_memory=budget, offload_policy=policy)
    try:
        assert llm.placement.resident_count == 12
        assert (llm.score(ids) - want).abs().max().item() <= TOL
        out = llm.generate(ids[:6], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        assert out.token_ids == tokens
    finally:
        llm.close()


def test_prefetch_guesses_with_the_router(base):
    """The speculative prefetch finds gpt-oss's router (named `router`, not `gate`) and guesses with its weight."""
    from cadenza.loader import build_meta, moe_routers, open_checkpoint

    routers = moe_routers(build_meta(open_checkpoint(base[0])))
    assert len(routers) == 4 and all(r is not None and r[1] == 2 for r in routers)
    assert tuple(routers[0][0].shape) == (8, 64)
