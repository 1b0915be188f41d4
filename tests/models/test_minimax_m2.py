"""MiniMax-M2 computed by cadenza equals transformers' MiniMaxM2ForCausalLM on tiny random checkpoints: q/k norms
over the whole projection, partial rotary (given as rotary_dim, as the hub's config.json does, or as
partial_rotary_factor), sigmoid routing with the score correction bias; prefill and cached decode; the hub's
config keys transformers does not read are refused where they would ask for another computation; offloaded experts
compute the same model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cadenza import LLM
from cadenza.cli.info import describe
from cadenza.loader import build_meta, open_checkpoint
from cadenza.models import supported_architectures
from cadenza.models.minimax_m2 import MiniMaxM2Attention, MiniMaxM2SparseMoeBlock
from tests.conftest import (
    assert_bf16_dtypes_as_transformers,
    assert_config_refused,
    assert_hybrid_matches,
    assert_hybrid_prefetch_in_bf16,
    assert_prefill_and_cached_decode_match,
    edit_config,
    prompt_ids,
    random_biased_router_model,
    reference_logits,
    save_hf_model,
    single_device_run,
    tiny_config,
)

TOL = 1e-4
YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 64}


def tiny_minimax_m2_config(**overrides):
    """MiniMax-M2's switches at tiny size: head_dim 16 of which rotary_dim 8 turn (M2: 64 of 128), 8 experts of
    width 32, top-2."""
    kw = dict(intermediate_size=32, head_dim=16, rotary_dim=8, num_local_experts=8)
    return tiny_config("MiniMaxM2", kw, overrides)


def make_minimax_m2(path: Path, seed: int = 0, **overrides):
    """A tiny random MiniMaxM2ForCausalLM saved to `path`; returns (folder, the fp32 transformers model)."""
    model = random_biased_router_model(tiny_minimax_m2_config(**overrides), seed)
    return save_hf_model(model, path), model


CONFIGS = {
    # MiniMax-M2's shape: half of each head rotary (rotary_dim), GQA 2:1, top-2 of 8
    "m2-half-rotary": {},
    # every head feature rotary (no rotary_dim: transformers' default), GQA 4:1, top-3
    "full-rotary-gqa4-top3": dict(
        rotary_dim=None, num_attention_heads=8, num_key_value_heads=2, num_experts_per_tok=3
    ),
    # a quarter of each 24-feature head, YaRN-scaled over the rotary width only, top-1 of 16, tied embeddings
    "quarter-rotary-yarn-top1-tied": dict(
        head_dim=24, rotary_dim=6, rope_parameters=dict(YARN), num_local_experts=16, num_experts_per_tok=1,
        tie_word_embeddings=True,
    ),
    # three layers, MHA, head_dim apart from hidden / heads
    "three-layers-mha-head-dim-32": dict(num_hidden_layers=3, num_key_value_heads=4, head_dim=32, rotary_dim=16),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_cached_decode_match_transformers(tmp_path, name):
    path, hf = make_minimax_m2(tmp_path / name, **CONFIGS[name])
    assert_prefill_and_cached_decode_match(path, hf, tol=TOL)


def test_hub_style_config(tmp_path):
    """config.json as MiniMax-M2's repository ships it: rotary_dim and rope_theta at the top level, no
    rope_parameters, and keys transformers does not read at their published values: the logits are transformers'."""
    path, hf = make_minimax_m2(tmp_path / "hub")
    edit_config(
        path, rope_parameters=None, rope_theta=5e6, rotary_dim=8, scoring_func="sigmoid", use_qk_norm=True,
        qk_norm_type="per_layer", use_routing_bias=True, attn_type_list=[1, 1], use_mtp=True, num_mtp_modules=3,
        mtp_transformer_layers=1, shared_intermediate_size=0, routed_scaling_factor=1.0,
    )  # fmt: skip
    llm = LLM(path, device="cpu", dtype="float32")
    assert llm.model.model.rotary_emb.dim == 8
    ids = prompt_ids(20)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL


def test_rotary_width_as_transformers_reads_it(tmp_path):
    """A partial_rotary_factor named anywhere wins over rotary_dim (transformers' setdefault); neither: every
    feature turns. Each reading equals transformers' model built from the same config.json."""
    from transformers import MiniMaxM2Config

    path, _ = make_minimax_m2(tmp_path / "base")
    for name, changes, dim in (
        ("named", dict(rope_parameters=None, rope_theta=5e6, rotary_dim=8, partial_rotary_factor=0.25), 4),
        ("nested", dict(rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.75}),
         12),
        ("neither", dict(rope_parameters=None, rope_theta=5e6, rotary_dim=None), 16),
    ):  # fmt: skip
        folder = shutil.copytree(path, tmp_path / name)
        edit_config(folder, **changes)
        assert LLM(folder, device="cpu", dtype="float32").model.model.rotary_emb.dim == dim
        ref = MiniMaxM2Config.from_pretrained(folder)
        assert int(16 * ref.rope_parameters.get("partial_rotary_factor", 1.0)) == dim


def test_router_and_bias_take_the_compute_dtype_as_transformers(tmp_path):
    """In bf16 every tensor has the dtype transformers' from_pretrained gives it (router weight and routing bias
    included: MiniMax-M2 keeps none in float32)."""
    llm = assert_bf16_dtypes_as_transformers(make_minimax_m2(tmp_path / "bf16")[0], (".mlp.", ".block_sparse_moe."))
    assert {t.dtype for t in llm.model.state_dict().values()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def m2_dir(tmp_path_factory):
    """One shared tiny checkpoint (16 experts, top-3, 3 layers: enough experts to split) and its all-resident
    results."""
    path, _ = make_minimax_m2(
        tmp_path_factory.mktemp("minimax_m2"), num_hidden_layers=3, num_local_experts=16, num_experts_per_tok=3
    )
    prompt = prompt_ids(20)
    return path, prompt, single_device_run(path, prompt, 8)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_all_resident(m2_dir, policy):
    """Experts split between the emulated GPU and the host compute the same model. 7 of 3 layers x 16 experts
    resident; fetching policies reserve top_k = 3 slots; (prompt + decode steps) x layers x top-3 pairs."""
    path, prompt, want = m2_dir
    assert_hybrid_matches(path, policy, 7, 3, prompt, 8, (6 + 7) * 3 * 3, None, TOL, want)


def test_hybrid_prefetch_in_bf16(m2_dir):
    """The fetch policy guesses the next layer's experts with its router weight (the routing bias left out of the
    guess): the guess runs, and the offloaded model equals the all-resident one bit for bit."""
    path, prompt, _ = m2_dir
    assert_hybrid_prefetch_in_bf16(path, prompt, 7, 3)


def test_info_counts_and_modules(m2_dir):
    from transformers import MiniMaxM2ForCausalLM

    path = m2_dir[0]
    assert "MiniMaxM2ForCausalLM" in supported_architectures()
    hf = MiniMaxM2ForCausalLM.from_pretrained(path)
    d = describe(path)
    assert (d["architecture"], d["model_type"]) == ("MiniMaxM2ForCausalLM", "minimax_m2")
    assert (d["layers"], d["moe_layers"], d["head_dim"], d["attention_heads"], d["kv_heads"]) == (3, 3, 16, 4, 2)
    assert (d["experts_per_layer"], d["experts_per_token"], d["expert_intermediate_size"]) == (16, 3, 32)
    assert d["expert_parameters"] == 3 * 16 * 3 * 64 * 32
    # the routing bias is a buffer in transformers and a tensor of the checkpoint: counted with the parameters
    assert d["parameters"] == sum(t.numel() for t in hf.state_dict().values())
    layer = build_meta(open_checkpoint(path)).model.layers[0]
    assert isinstance(layer.self_attn, MiniMaxM2Attention) and isinstance(
        layer.block_sparse_moe, MiniMaxM2SparseMoeBlock
    )
    assert layer.self_attn.q_norm.weight.shape == (4 * 16,) and layer.self_attn.k_norm.weight.shape == (2 * 16,)
    assert layer.self_attn.q_proj.bias is None and layer.self_attn.o_proj.bias is None


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(num_local_experts=None), "num_local_experts"),
        (dict(hidden_size=None), "hidden_size"),
        (dict(num_experts_per_tok=17), "num_experts_per_tok"),
        (dict(rope_parameters=None, rope_theta=5e6, rotary_dim=40), "rotary_dim"),
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(use_qk_norm=False), "use_qk_norm"),
        (dict(qk_norm_type="per_head"), "qk_norm_type"),
        (dict(use_routing_bias=False), "use_routing_bias"),
        (dict(attn_type_list=[0, 1, 1]), "lightning attention"),
        (dict(routed_scaling_factor=2.5), "routed_scaling_factor"),
    ],
)
def test_config_mistakes_are_clear(m2_dir, tmp_path, changes, match):
    assert_config_refused(shutil.copytree(m2_dir[0], tmp_path / "bad"), match, **changes)


def test_fp8_checkpoint_matches_dequantized_reference(tmp_path):
    """MiniMax-M2 is published in block-fp8 (128 x 128 blocks; gate, routing bias, embedding and LM head kept in
    bf16): such a checkpoint, here in 32 x 24 blocks (edge blocks partial), scores as transformers holding the
    dequantized weights, also with its experts offloaded."""
    from safetensors.torch import load_file, save_file
    from transformers import MiniMaxM2ForCausalLM

    from tests.conftest import budget_for
    from tests.models.test_deepseek_v3 import dequantize, quantize

    src, _ = make_minimax_m2(tmp_path / "src", num_local_experts=4)
    block = (32, 24)
    weights, dequantized = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        if t.dim() == 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight", "gate.weight")):
            q, s = quantize(t, block)
            weights[name], weights[f"{name}_scale_inv"] = q, s
            dequantized[name] = dequantize(q, s, block)
        else:
            weights[name] = dequantized[name] = t
    assert sum(n.endswith("_scale_inv") for n in weights) == 2 * (4 + 4 * 3)  # attention and every expert
    fp8 = shutil.copytree(src, tmp_path / "fp8")
    save_file(weights, fp8 / "model.safetensors", metadata={"format": "pt"})
    quant = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
             "weight_block_size": list(block),
             "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}  # fmt: skip
    edit_config(fp8, quantization_config=quant)
    ref = shutil.copytree(src, tmp_path / "dequantized")
    save_file(dequantized, ref / "model.safetensors", metadata={"format": "pt"})
    hf = MiniMaxM2ForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    ids = prompt_ids(20)
    want = reference_logits(hf, ids)
    assert (LLM(fp8, device="cpu", dtype="float32").score(ids) - want).abs().max().item() <= TOL
    offloaded = LLM(fp8, device="cpu", dtype="float32", gpu_memory=budget_for(fp8, 3, 0), offload_policy="cpu")
    assert offloaded.placement.resident_count == 3
    assert (offloaded.score(ids) - want).abs().max().item() <= TOL
