"""GLM-4.7-Flash computed by cadenza equals transformers' Glm4MoeLiteForCausalLM on tiny random checkpoints:
DeepSeek-V3's multi-head latent attention (absorbed and decompressed, both rope layouts, YaRN) and sigmoid router
with GLM's float32 router, dense layers named by mlp_layer_types, shared experts; prefill and cached decode; the
multi-token-prediction layer skipped; offloaded experts compute the same model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cadenza import LLM
from cadenza.cli.info import describe
from cadenza.loader import build_meta, expected_tensors, open_checkpoint
from cadenza.models import supported_architectures
from cadenza.models.glm4_moe import Glm4MoeMoE
from cadenza.models.glm4_moe_lite import Glm4MoeLiteConfig
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
from tests.models.test_deepseek_v2 import assert_every_path_matches, tiny_yarn
from tests.models.test_glm4_moe import add_mtp_layer

TOL = 1e-4
YARN = tiny_yarn(mscale=1.0, mscale_all_dim=1.0)


def tiny_glm4_moe_lite_config(**overrides):
    """GLM-4.7-Flash's switches at tiny size: MLA (latent 16, query LoRA 24, rope part 8 of a 16-wide key head,
    values 12), 8 routed experts (top-2) and a shared one, one dense first layer (transformers' default), weights
    renormalised and scaled by 1.8."""
    kw = dict(
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
    )
    return tiny_config("Glm4MoeLite", kw, overrides)


def make_glm4_moe_lite(path: Path, seed: int = 0, mtp: bool = False, **overrides):
    """A tiny random Glm4MoeLiteForCausalLM saved to `path` (mtp: with GLM's multi-token-prediction layer in a shard
    of its own); returns (folder, the fp32 transformers model)."""
    model = random_biased_router_model(tiny_glm4_moe_lite_config(**overrides), seed)
    save_hf_model(model, path)
    if mtp:
        add_mtp_layer(path)
    return path, model


CONFIGS = {
    # GLM-4.7-Flash's shape: one dense layer, one shared expert, interleaved rope, scaled by 1.8
    "flash": {},
    # dense layers where mlp_layer_types says (the middle one), two shared experts, top-3 of 16, not renormalised
    "layer-types-two-shared-top3": dict(
        num_hidden_layers=4, mlp_layer_types=["dense", "sparse", "dense", "sparse"], n_shared_experts=2,
        n_routed_experts=16, num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=1.0,
    ),
    # rope in halves, YaRN, no query LoRA, all MoE layers, 4 groups of which 2 are kept
    "halves-yarn-no-q-lora-groups": dict(
        rope_interleave=False, rope_parameters=dict(YARN), q_lora_rank=None, mlp_layer_types=["sparse"] * 3,
        n_group=4, topk_group=2,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_mla_path_and_cached_decode_match_transformers(tmp_path, name):
    path, hf = make_glm4_moe_lite(tmp_path / name, **CONFIGS[name])
    assert_every_path_matches(path, hf)
    assert_prefill_and_cached_decode_match(path, hf, tol=TOL)


def test_hub_style_config_and_mtp_layer_skipped(tmp_path):
    """config.json as GLM-4.7-Flash's repository ships it: no mlp_layer_types (one dense first layer), the MTP layer
    announced by num_nextn_predict_layers and present in a second shard, rope_theta at the top level: the MTP
    tensors are neither expected nor read, and the logits are transformers'."""
    path, hf = make_glm4_moe_lite(tmp_path / "hub", mtp=True)
    edit_config(path, mlp_layer_types=None, first_k_dense_replace=1, rope_parameters=None, rope_theta=10000.0,
                topk_method="noaux_tc")  # fmt: skip
    ckpt = open_checkpoint(path)
    assert any(n.startswith("model.layers.3.mlp.experts.") for n in ckpt.tensors)
    assert not any(n.startswith("model.layers.3.") for n in expected_tensors(build_meta(ckpt)))
    llm = LLM(path, device="cpu", dtype="float32")
    assert llm.model.config.num_nextn_predict_layers == 1 and len(llm.model.model.layers) == 3
    ids = prompt_ids(20)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL
    # transformers' defaults for the switches a config.json leaves out
    import json

    cfg = json.loads((path / "config.json").read_text())
    for key in ("n_shared_experts", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob", "q_lora_rank"):
        cfg.pop(key, None)
    config = Glm4MoeLiteConfig.from_hf(cfg)
    assert (config.n_shared_experts, config.routed_scaling_factor, config.n_group, config.norm_topk_prob) == (
        1, 1.8, 1, True,
    )  # fmt: skip
    assert config.q_lora_rank == 768 and config.mlp_layer_types == ["dense", "sparse", "sparse"]


def test_router_stays_float32_as_transformers_keeps_it(tmp_path):
    """In bf16 every tensor has the dtype transformers' from_pretrained gives it: the router's weight and score
    correction bias stay float32 (_keep_in_fp32_modules_strict), everything else is bf16."""
    llm = assert_bf16_dtypes_as_transformers(make_glm4_moe_lite(tmp_path / "bf16")[0])
    gate = llm.model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32


@pytest.fixture(scope="module")
def lite_dir(tmp_path_factory):
    """One shared tiny checkpoint (16 experts, top-3, two MoE layers) and its all-resident results."""
    path, _ = make_glm4_moe_lite(
        tmp_path_factory.mktemp("glm4_moe_lite"), mtp=True, n_routed_experts=16, num_experts_per_tok=3
    )
    prompt = prompt_ids(20)
    return path, prompt, single_device_run(path, prompt, 8)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_all_resident(lite_dir, policy):
    """5 of 2 MoE layers x 16 experts resident; fetching policies reserve top_k = 3 slots; (prompt + decode steps)
    x MoE layers x top-3 pairs."""
    path, prompt, want = lite_dir
    assert_hybrid_matches(path, policy, 5, 3, prompt, 8, (6 + 7) * 2 * 3, None, TOL, want)


def test_hybrid_prefetch_in_bf16(lite_dir):
    path, prompt, _ = lite_dir
    assert_hybrid_prefetch_in_bf16(path, prompt, 5, 3)


def test_info_counts_and_layer_kinds(lite_dir):
    from transformers import Glm4MoeLiteForCausalLM

    path = lite_dir[0]
    assert "Glm4MoeLiteForCausalLM" in supported_architectures()
    d = describe(path)
    assert (d["layers"], d["moe_layers"]) == (3, 2)
    assert (d["experts_per_layer"], d["experts_per_token"], d["expert_intermediate_size"]) == (16, 3, 32)
    assert d["expert_parameters"] == 2 * 16 * 3 * 64 * 32
    hf = Glm4MoeLiteForCausalLM.from_pretrained(path)  # (the MTP layer's tensors are not in it)
    assert d["parameters"] == sum(t.numel() for t in hf.state_dict().values())
    layers = build_meta(open_checkpoint(path)).model.layers
    assert not isinstance(layers[0].mlp, Glm4MoeMoE) and all(isinstance(x.mlp, Glm4MoeMoE) for x in layers[1:])


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(n_routed_experts=None), "n_routed_experts"),
        (dict(kv_lora_rank=None), "kv_lora_rank"),
        (dict(num_experts_per_tok=17), "num_experts_per_tok"),
        (dict(mlp_layer_types=["dense", "sparse"]), "mlp_layer_types"),
        (dict(mlp_layer_types=["dense", "moe", "sparse"]), "mlp_layer_types"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(n_group=3), "n_group"),
    ],
)
def test_config_mistakes_are_clear(lite_dir, tmp_path, changes, match):
    assert_config_refused(shutil.copytree(lite_dir[0], tmp_path / "bad"), match, **changes)
