"""DeepSeek-V3 computed by cadenza equals transformers' DeepseekV3ForCausalLM on tiny random checkpoints: noaux_tc
routing (sigmoid, score correction bias, expert groups), dense first layers, both rope layouts, absorbed and
decompressed MLA, offloaded experts, and block-fp8 checkpoints (dequantized at load, multi-token-prediction layer
ignored)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from cadenza import LLM, CadenzaError, SamplingParams
from tests.conftest import (
    assert_bf16_dtypes_as_transformers,
    assert_config_refused,
    assert_hybrid_matches,
    budget_for,
    edit_config,
    make_deepseek,
    max_logit_diff,
    prompt_ids,
    reference_greedy,
    reference_logits,
    single_device_run,
)
from tests.models.test_deepseek_v2 import assert_every_path_matches, edit_to_hub_config, tiny_yarn

TOL = 1e-4
YARN = tiny_yarn(mscale=1.0, mscale_all_dim=1.0)  # DeepSeek-V3's own (mscale == mscale_all_dim)


def make_v3(path, seed: int = 0, **overrides):
    return make_deepseek(path, 3, seed, **overrides)


CONFIGS = {
    # V3's switches: q_lora, 4 groups of which 2 are kept, renormalised weights scaled by 2.5, one dense layer
    "noaux-tc-groups": {},
    "two-dense-layers-no-norm-topk": dict(
        num_hidden_layers=4, first_k_dense_replace=2, norm_topk_prob=False, routed_scaling_factor=1.0
    ),
    "rope-in-halves-yarn": dict(rope_interleave=False, rope_parameters=YARN),
    "interleaved-yarn": dict(rope_parameters=YARN),
    "one-group-no-q-lora": dict(
        n_group=1, topk_group=1, q_lora_rank=None, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2
    ),
    "eight-groups-keep-3": dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_score_matches_transformers(tmp_path, name):
    assert_every_path_matches(*make_v3(tmp_path / name, **CONFIGS[name]))


def test_hub_style_config(tmp_path):
    """config.json as DeepSeek-V3's repository ships it: rope_scaling with "type", no rope_interleave (interleaved),
    the original code's topk_method / scoring_func, an MTP layer announced by num_nextn_predict_layers."""
    path, hf = make_v3(tmp_path / "hub", rope_parameters=YARN)
    extra = dict(rope_interleave=None, topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=1)
    edit_to_hub_config(path, YARN, moe_layer_freq=1, ep_size=1, **extra)
    assert max_logit_diff(path, hf, prompt_ids(20)) <= TOL


def test_router_stays_float32_as_transformers_keeps_it(tmp_path):
    """In bf16 every tensor has transformers' dtype: the router's weight and routing bias stay float32."""
    llm = assert_bf16_dtypes_as_transformers(make_v3(tmp_path / "bf16")[0])
    gate = llm.model.model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.dtype == gate.weight.dtype == torch.float32


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path, _ = make_v3(tmp_path_factory.mktemp("mixed"))
    prompt = prompt_ids(20)
    return path, prompt, single_device_run(path, prompt, 8)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_single_device(mixed, policy):
    path, prompt, want = mixed
    # 5 of 2 MoE layers x 8 experts resident
    assert_hybrid_matches(path, policy, 5, 2, prompt, 8, (6 + 7) * 2 * 2, None, TOL, want)


# --- block-fp8 checkpoints -------------------------------------------------------------------------------------------

NOT_QUANTIZED = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight")  # as in DeepSeek-V3's release


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/bm), ceil(in/bn)]): each block scaled so
    its largest magnitude is fp8's largest, edge blocks partial."""
    (bm, bn), (rows, cols) = block, w.shape
    padded = F.pad(w.float(), (0, -cols % bn, 0, -rows % bm))
    blocks = padded.view(padded.shape[0] // bm, bm, padded.shape[1] // bn, bn)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale[:, None, :, None]).view(padded.shape)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = q.shape
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return q.float() * full


def make_fp8(tmp_path, block: tuple[int, int], **overrides):
    """A tiny V3 saved as DeepSeek-V3 publishes its weights: fp8 with block scales, an MTP layer, and scales in
    another shard than their weights. Returns (fp8 folder, transformers model with the dequantized weights, the
    dequantized checkpoint's folder)."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3ForCausalLM

    src, _ = make_v3(tmp_path / "src", **overrides)
    weights, scales, dequantized = {}, {}, {}
    n_quantized = partial = 0
    for name, t in load_file(src / "model.safetensors").items():
        if t.dim() == 2 and not name.endswith(NOT_QUANTIZED):
            q, s = quantize(t, block)
            weights[name], scales[f"{name}_scale_inv"] = q, s
            dequantized[name] = dequantize(q, s, block)
            n_quantized += 1
            partial += any(d % b for d, b in zip(t.shape, block, strict=True))
        else:
            weights[name] = dequantized[name] = t
    assert n_quantized > 20 and partial > 5  # experts included; edge blocks exercised
    mtp = f"model.layers.{overrides.get('num_hidden_layers', 3)}"  # the hub's multi-token-prediction layer
    scales[f"{mtp}.eh_proj.weight_scale_inv"] = torch.ones(1, 1)
    weights[f"{mtp}.eh_proj.weight"] = torch.zeros(64, 128).to(torch.float8_e4m3fn)
    weights[f"{mtp}.enorm.weight"] = torch.ones(64)
    weights[f"{mtp}.self_attn.kv_a_proj_with_mqa.weight"] = torch.zeros(5, 7)  # any shape: never read

    fp8 = shutil.copytree(src, tmp_path / "fp8")
    (fp8 / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": weights, "model-00002-of-00002.safetensors": scales}
    for file, tensors in shards.items():
        save_file(tensors, fp8 / file, metadata={"format": "pt"})
    weight_map = {n: file for file, tensors in shards.items() for n in tensors}
    (fp8 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    edit_config(fp8, quantization_config=quant, num_nextn_predict_layers=1)

    ref = shutil.copytree(src, tmp_path / "dequantized")
    save_file(dequantized, ref / "model.safetensors", metadata={"format": "pt"})
    hf = DeepseekV3ForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    return fp8, hf, ref


@pytest.mark.parametrize("block", [(128, 128), (32, 24)], ids=["128x128", "32x24"])
def test_fp8_checkpoint_matches_dequantized_reference(tmp_path, block):
    # intermediate 160: the dense layer's weights span two 128-row blocks, the second partial
    fp8, hf, _ = make_fp8(tmp_path, block, intermediate_size=160)
    llm = LLM(fp8, device="cpu", dtype="float32")
    assert llm.dtype == torch.float32
    ids = prompt_ids(24)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL
    out = llm.generate(ids[:8], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out.token_ids == reference_greedy(hf, ids[:8], 8)


def test_fp8_checkpoint_offloaded_and_in_bf16(tmp_path):
    fp8, hf, dequantized = make_fp8(tmp_path, (32, 24))
    ids = prompt_ids(16)
    want = reference_logits(hf, ids)
    llm = LLM(fp8, device="cpu", dtype="float32", gpu_memory=budget_for(fp8, 3, 0), offload_policy="cpu")
    try:
        assert llm.placement.resident_count == 3
        assert (llm.score(ids) - want).abs().max().item() <= TOL
    finally:
        llm.close()
    # bf16, the dtype a GPU run keeps: dequantized in float32, then rounded once, as the dequantized checkpoint
    bf16 = LLM(fp8, device="cpu", dtype="bfloat16")
    assert bf16.model.model.layers[1].mlp.experts.gate_proj.dtype == torch.bfloat16
    assert torch.equal(bf16.score(ids), LLM(dequantized, device="cpu", dtype="bfloat16").score(ids))


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    return make_fp8(tmp_path_factory.mktemp("fp8"), (32, 24))[0]


def _broken_copy(fp8_dir, tmp_path, drop: str | None = None, reshape: str | None = None):
    """A copy of the fp8 checkpoint without the tensor `drop`, or with `reshape` given a wrong shape."""
    from safetensors.torch import load_file, save_file

    path = shutil.copytree(fp8_dir, tmp_path / "broken")
    file = path / "model-00002-of-00002.safetensors"
    scales = load_file(file)
    if drop:
        del scales[drop]
        index = json.loads((path / "model.safetensors.index.json").read_text())
        del index["weight_map"][drop]
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    if reshape:
        scales[reshape] = torch.ones(7, 7)
    save_file(scales, file, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    "quantization_config, match",
    [
        ({"quant_method": "awq", "bits": 4}, "awq"),
        ({"quant_method": "fp8", "weight_block_size": None}, "weight_block_size"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "expert_dtype": "fp4"}, "fp4"),
        (None, "quantization_config"),  # fp8 tensors, but config.json does not say how they are scaled
        ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size"),  # scales do not match
    ],
)
def test_fp8_mistakes_are_clear(fp8_dir, tmp_path, quantization_config, match):
    bad = shutil.copytree(fp8_dir, tmp_path / "bad")
    assert_config_refused(bad, match, quantization_config=quantization_config)


def test_fp8_missing_or_misshapen_scales(fp8_dir, tmp_path):
    name = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    with pytest.raises(CadenzaError, match="no block scales"):
        LLM(_broken_copy(fp8_dir, tmp_path / "a", drop=name), device="cpu", dtype="float32")
    with pytest.raises(CadenzaError, match=r"have shape \[7, 7\]"):
        LLM(_broken_copy(fp8_dir, tmp_path / "b", reshape=name), device="cpu", dtype="float32")


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(n_group=3), "n_group"),
        (dict(n_group=8, topk_group=2), "at least 2"),
        (dict(topk_group=5), "topk_group"),
        (dict(qk_rope_head_dim=None), "qk_rope_head_dim"),
    ],
)
def test_config_mistakes_are_clear(fp8_dir, tmp_path, changes, match):
    assert_config_refused(shutil.copytree(fp8_dir, tmp_path / "bad"), match, **changes)
