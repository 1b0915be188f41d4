"""OLMoE computed by cadenza equals transformers' OlmoeForCausalLM on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from cadenza import LLM
from tests.conftest import (
    assert_config_refused,
    assert_hybrid_matches,
    assert_info_counts,
    assert_score_matches,
    edit_config,
    make_hf_model,
    max_logit_diff,
    prompt_ids,
    reference_logits,
    tiny_config,
)

TOL = 1e-4


def make_olmoe(path, seed: int = 0, **overrides):
    """A tiny random OlmoeForCausalLM saved to `path`; returns (folder, the fp32 transformers model)."""
    # OLMoE-1B-7B has no GQA
    kw = dict(intermediate_size=48, num_key_value_heads=4, num_experts=8, num_experts_per_tok=3, pad_token_id=None)
    # norm weights away from 1 so that a q_norm/k_norm mix-up (same shape without GQA) would show
    return make_hf_model(
        path, tiny_config("Olmoe", kw, overrides), seed, lambda _, p: p.copy_(1.0 + 0.3 * torch.randn_like(p))
    )


CONFIGS = {
    # OLMoE-1B-7B's switches: no GQA, no clip, norm_topk_prob false
    "mha-top3-of-8-unnormed": {},
    "gqa2-top2-of-6-clip-normed": dict(
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, clip_qkv=0.8, norm_topk_prob=True
    ),
    "gqa4-of-8-heads-top1": dict(num_attention_heads=8, num_key_value_heads=2, num_experts_per_tok=1),
    "tied-clip-unnormed": dict(tie_word_embeddings=True, clip_qkv=1.5),
    "attention-bias": dict(attention_bias=True, num_key_value_heads=2),
    "rope-linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}),
}


@pytest.fixture(scope="module")
def gqa_clip(tmp_path_factory):
    """GQA, clip_qkv and norm_topk_prob on, 3 layers: generation, switches and the hybrid path share it."""
    return make_olmoe(tmp_path_factory.mktemp("olmoe"), num_hidden_layers=3, **CONFIGS["gqa2-top2-of-6-clip-normed"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_score_matches_transformers(tmp_path, name):
    path, hf = make_olmoe(tmp_path / name, **CONFIGS[name])
    assert_score_matches(path, hf, tol=TOL)
    if CONFIGS[name].get("tie_word_embeddings"):  # the tied checkpoint really has no lm_head to read
        assert "lm_head.weight" not in _tensor_names(path)


def _tensor_names(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize(
    "switch",
    [dict(clip_qkv=None), dict(norm_topk_prob=False), dict(clip_qkv=0.3)],
    ids=["clip-off", "norm-topk-off", "clip-tighter"],
)
def test_switches_flip_both_ways(gqa_clip, tmp_path, switch):
    """The same weights with a switch flipped in config.json: cadenza follows transformers, and the switch
    really changes the logits (so the other configs exercise it)."""
    import shutil

    from transformers import OlmoeForCausalLM

    path, hf = gqa_clip
    flipped = tmp_path / "flipped"
    shutil.copytree(path, flipped)
    edit_config(flipped, **switch)
    hf_flipped = OlmoeForCausalLM.from_pretrained(flipped, dtype=torch.float32).eval()
    ids = prompt_ids(20, seed=3)
    got = LLM(flipped, device="cpu", dtype="float32").score(ids)
    assert (got - reference_logits(hf_flipped, ids)).abs().max().item() <= TOL
    assert (got - reference_logits(hf, ids)).abs().max().item() > 1e-2


def test_hub_style_config(tmp_path):
    """config.json as the hub ships it (rope_theta + rope_scaling with "type", no rms_norm_eps default spelled
    out differently) gives the same logits as the transformers-5 form (rope_parameters)."""
    rope = {"rope_type": "linear", "factor": 3.0, "rope_theta": 20000.0}
    path, hf = make_olmoe(tmp_path / "hub", rope_parameters=rope, num_key_value_heads=2)
    edit_config(path, rope_parameters=None, rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 3.0})
    assert max_logit_diff(path, hf, prompt_ids(16)) <= TOL


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_single_device(gqa_clip, policy):
    """Some experts off the (emulated) GPU: every policy computes the all-resident model."""
    # 7 of 3 layers x 6 experts resident
    assert_hybrid_matches(gqa_clip[0], policy, 7, 2, prompt_ids(20, seed=5), 10, side="either", tol=TOL)


def test_describe_counts(gqa_clip, tmp_path):
    tied = make_olmoe(tmp_path / "tied", tie_word_embeddings=True, num_hidden_layers=1)
    assert_info_counts(*gqa_clip, "OlmoeForCausalLM", "olmoe", layers=(3, 3, 6, 2), heads=(4, 2, 16), tied=tied)


def test_missing_config_key_is_a_clear_error(gqa_clip, tmp_path):
    import shutil

    assert_config_refused(shutil.copytree(gqa_clip[0], tmp_path / "bad"), "num_experts", num_experts=None)
