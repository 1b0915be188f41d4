"""GLM-4.5 computed by cadenza equals transformers' Glm4MoeForCausalLM on tiny random checkpoints: partial rotary,
q/k norms on and off, attention biases, head_dim apart from hidden / heads, sigmoid routing with the score correction
bias and expert groups, dense first layers, shared experts; prefill and cached decode; the checkpoints'
multi-token-prediction layer is skipped; offloaded experts compute the same model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cadenza import LLM
from cadenza.cli.info import describe
from cadenza.loader import build_meta, expected_tensors, open_checkpoint
from cadenza.models import supported_architectures
from cadenza.models.glm4_moe import Glm4MoeConfig, Glm4MoeMLP, Glm4MoeMoE
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
    write_two_shards,
)

TOL = 1e-4
YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 64}


def tiny_glm4_moe_config(**overrides):
    """GLM-4.5's switches at tiny size: q/k norms, q/k/v biases, half of each head rotary (transformers' default),
    head_dim 24 (not hidden / heads = 16; GLM-4.5: 5120 / 96 heads, head_dim 128), 8 routed experts (top-2) and a
    shared one, one dense first layer (intermediate_size 96), weights scaled by 2.5."""
    kw = dict(
        moe_intermediate_size=32,
        num_hidden_layers=3,
        head_dim=24,
        n_routed_experts=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        use_qk_norm=True,
        attention_bias=True,
    )
    return tiny_config("Glm4Moe", kw, overrides)


def make_glm4_moe(path: Path, seed: int = 0, mtp: bool = False, **overrides):
    """A tiny random Glm4MoeForCausalLM saved to `path` (mtp: with a multi-token-prediction layer added, in a shard
    of its own, as the hub's checkpoints hold one); returns (folder, the fp32 transformers model)."""
    model = random_biased_router_model(tiny_glm4_moe_config(**overrides), seed)
    save_hf_model(model, path)
    if mtp:
        add_mtp_layer(path)
    return path, model


def add_mtp_layer(path: Path) -> None:
    """Appends GLM-4.5's MTP layer `model.layers.{num_hidden_layers}` (a whole decoder layer with its experts, plus
    eh_proj, enorm, hnorm and shared_head) in a second shard, and announces it as the hub's config.json does."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    n, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    main = load_file(path / "model.safetensors")
    last = f"model.layers.{n - 1}."
    mtp = {f"model.layers.{n}." + k[len(last) :]: t.clone() for k, t in main.items() if k.startswith(last)}
    mtp.update({
        f"model.layers.{n}.eh_proj.weight": torch.zeros(h, 2 * h),
        f"model.layers.{n}.enorm.weight": torch.ones(h),
        f"model.layers.{n}.hnorm.weight": torch.ones(h),
        f"model.layers.{n}.shared_head.norm.weight": torch.ones(h),
        f"model.layers.{n}.shared_head.head.weight": torch.zeros(cfg["vocab_size"], h),
        f"model.layers.{n}.embed_tokens.weight": torch.zeros(cfg["vocab_size"], h),
    })  # fmt: skip
    write_two_shards(path, main, mtp)
    edit_config(path, num_nextn_predict_layers=1)


CONFIGS = {
    # GLM-4.5 / 4.6: q/k norms, biases, half rotary, one group (n_group=1), renormalised and scaled by 2.5
    "glm45-qk-norm-half-rotary": {},
    # GLM-4.5-Air: no q/k norms
    "air-no-qk-norm": dict(use_qk_norm=False),
    # 4 groups of 4 experts of which 2 are kept, top-4, weights as the sigmoid gives them
    "groups-4-keep-2-no-norm-topk": dict(
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=False,
        routed_scaling_factor=1.0,
    ),
    # two dense layers, two shared experts, every head feature rotary, no biases, head_dim = hidden / heads
    "two-dense-two-shared-full-rotary": dict(
        num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=2, attention_bias=False, head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0},
    ),
    # a quarter of each 32-feature head rotary, YaRN-scaled (its frequencies over the rotary width only), GQA 4:1
    "quarter-rotary-yarn-gqa4": dict(
        num_attention_heads=8, num_key_value_heads=2, head_dim=32,
        rope_parameters={**YARN, "partial_rotary_factor": 0.25},
    ),
    # no dense layer, all 4 groups kept, tied embeddings
    "all-moe-all-groups-tied": dict(first_k_dense_replace=0, n_group=4, topk_group=4, tie_word_embeddings=True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_cached_decode_match_transformers(tmp_path, name):
    assert_prefill_and_cached_decode_match(*make_glm4_moe(tmp_path / name, **CONFIGS[name]), tol=TOL)


def test_hub_style_config_and_mtp_layer_skipped(tmp_path):
    """config.json as GLM-4.5's repository ships it: rope_theta and partial_rotary_factor at the top level,
    rope_scaling null, no rope_parameters, an MTP layer announced by num_nextn_predict_layers and present in the
    weights (a second shard). The MTP tensors are neither expected nor read, and the logits are transformers'."""
    path, hf = make_glm4_moe(tmp_path / "hub", mtp=True)
    edit_config(path, rope_parameters=None, rope_theta=10000.0, partial_rotary_factor=0.5, rope_scaling=None)
    ckpt = open_checkpoint(path)
    assert any(n.startswith("model.layers.3.mlp.experts.") for n in ckpt.tensors)
    assert not any(n.startswith("model.layers.3.") for n in expected_tensors(build_meta(ckpt)))
    llm = LLM(path, device="cpu", dtype="float32")
    assert llm.model.config.num_nextn_predict_layers == 1 and len(llm.model.model.layers) == 3
    ids = prompt_ids(20)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL
    # the MTP layer counts in no size (the routing bias does: a buffer in transformers, a tensor of the checkpoint)
    assert describe(path)["parameters"] == sum(t.numel() for t in hf.state_dict().values())


def test_partial_rotary_defaults_to_half(tmp_path):
    """A config.json that names no partial_rotary_factor rotates half of each head, as transformers' Glm4MoeConfig
    defaults it (the reference model here was built that way); one inside rope_parameters wins over the top level,
    as there. Other switches left out take transformers' defaults too."""
    path, hf = make_glm4_moe(tmp_path / "default")
    edit_config(path, rope_parameters=None, rope_theta=10000.0, partial_rotary_factor=None)
    llm = LLM(path, device="cpu", dtype="float32")
    assert llm.model.model.rotary_emb.dim == 12  # head_dim 24 * 0.5
    ids = prompt_ids(16)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL
    nested = shutil.copytree(path, tmp_path / "nested")
    edit_config(nested, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25},
                partial_rotary_factor=0.5)  # fmt: skip
    assert LLM(nested, device="cpu", dtype="float32").model.model.rotary_emb.dim == 6
    cfg = json.loads((path / "config.json").read_text())
    for key in ("use_qk_norm", "attention_bias", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob"):
        del cfg[key]
    config = Glm4MoeConfig.from_hf(cfg)
    assert (config.use_qk_norm, config.attention_bias, config.n_group, config.topk_group) == (False, False, 1, 1)
    assert (config.routed_scaling_factor, config.norm_topk_prob) == (1.0, True)
    # transformers' attribute_map: other names of the same keys
    cfg = {k: v for k, v in cfg.items() if k not in ("n_routed_experts", "num_nextn_predict_layers")}
    config = Glm4MoeConfig.from_hf({**cfg, "num_local_experts": 8, "num_mtp_layers": 1})
    assert (config.n_routed_experts, config.num_nextn_predict_layers) == (8, 1)


def test_router_stays_float32_as_transformers_keeps_it(tmp_path):
    """In bf16 every tensor has the dtype transformers' from_pretrained gives it: the router's weight and score
    correction bias stay float32 (_keep_in_fp32_modules_strict), everything else is bf16."""
    llm = assert_bf16_dtypes_as_transformers(make_glm4_moe(tmp_path / "bf16")[0])
    gate = llm.model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    """One shared tiny checkpoint (4 groups, top-4 of 16: enough experts to split) and its all-resident results."""
    path, _ = make_glm4_moe(tmp_path_factory.mktemp("glm4_moe"), mtp=True, **CONFIGS["groups-4-keep-2-no-norm-topk"])
    prompt = prompt_ids(20)
    return path, prompt, single_device_run(path, prompt, 8)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_all_resident(glm_dir, policy):
    """Experts split between the emulated GPU and the host compute the same model; dense layers and shared experts
    stay out of it. 5 of 2 MoE layers x 16 experts resident; fetching policies reserve top_k = 4 slots;
    (prompt + decode steps) x MoE layers x top-4 pairs."""
    path, prompt, want = glm_dir
    assert_hybrid_matches(path, policy, 5, 4, prompt, 8, (6 + 7) * 2 * 4, None, TOL, want)


def test_hybrid_prefetch_in_bf16(glm_dir):
    """The fetch policy guesses the next layer's experts with its router weight, which stays float32 while the
    hidden states are bf16: the guess runs, and the offloaded model equals the all-resident one."""
    path, prompt, _ = glm_dir
    assert_hybrid_prefetch_in_bf16(path, prompt, 5, 4)  # 5 resident, top_k = 4 slots


def test_info_counts_and_layer_kinds(glm_dir):
    path = glm_dir[0]
    assert "Glm4MoeForCausalLM" in supported_architectures()
    d = describe(path)
    assert (d["layers"], d["moe_layers"], d["head_dim"]) == (3, 2, 24)
    assert (d["experts_per_layer"], d["experts_per_token"], d["expert_intermediate_size"]) == (16, 4, 32)
    assert d["expert_parameters"] == 2 * 16 * 3 * 64 * 32
    layers = build_meta(open_checkpoint(path)).model.layers
    assert type(layers[0].mlp) is Glm4MoeMLP and layers[0].mlp.gate_proj.out_features == 96
    assert all(isinstance(layer.mlp, Glm4MoeMoE) for layer in layers[1:])
    assert layers[1].mlp.shared_experts.gate_proj.out_features == 32  # n_shared_experts x moe_intermediate_size
    attn = layers[0].self_attn  # attention_bias: q/k/v biases, none on o_proj
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None and attn.q_norm.weight.shape == (24,)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(n_routed_experts=None), "n_routed_experts"),
        (dict(moe_intermediate_size=None), "moe_intermediate_size"),
        (dict(hidden_size=None), "hidden_size"),
        (dict(num_experts_per_tok=17), "num_experts_per_tok"),
        (dict(n_group=3), "n_group"),  # does not divide 16 experts
        (dict(n_group=16, topk_group=4), "groups of at least 2"),  # the router ranks groups by their 2 best
        (dict(topk_group=5), "topk_group"),
        (dict(topk_group=1, num_experts_per_tok=5), "topk_group"),  # one kept group of 4 cannot fill a top-5
        (dict(partial_rotary_factor=1.5, rope_parameters=None, rope_theta=1e4), "partial_rotary_factor"),
    ],
)
def test_config_mistakes_are_clear(glm_dir, tmp_path, changes, match):
    assert_config_refused(shutil.copytree(glm_dir[0], tmp_path / "bad"), match, **changes)
