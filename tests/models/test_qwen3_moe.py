"""Qwen3-MoE computed by cadenza equals transformers' Qwen3MoeForCausalLM on tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadenza import LLM, SamplingParams
from cadenza.cli.info import describe
from tests.conftest import (
    assert_config_refused,
    assert_hybrid_matches,
    assert_score_matches,
    edit_config,
    make_hf_model,
    prompt_ids,
    reference_greedy,
    tiny_config,
)

TOL = 1e-4


def tiny_qwen3_moe_config(**overrides):
    kw = dict(
        moe_intermediate_size=32,  # intermediate_size: the dense layers'
        num_hidden_layers=3,
        head_dim=24,  # not hidden_size / heads (16), as in the real models (2048 / 32 heads, head_dim 128)
        num_experts=16,
        num_experts_per_tok=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-6,
    )
    return tiny_config("Qwen3Moe", kw, overrides)


def make_qwen3_moe(path: Path, seed: int = 0, **overrides):
    """A tiny random Qwen3MoeForCausalLM saved to `path`; returns (folder, the fp32 transformers model)."""

    # q/k norm weights (init 1) away from 1, so a wrong norm cannot hide behind all-ones weights
    def vectors(name, p):
        if name.endswith(("q_norm.weight", "k_norm.weight")) or name.endswith("bias"):
            p.uniform_(0.5, 1.5)

    return make_hf_model(path, tiny_qwen3_moe_config(**overrides), seed, vectors)


CONFIGS = {
    # top-4 of 16 weights as the softmax gives them; layer 1 dense
    "top4-of-16-dense-layer-1": dict(norm_topk_prob=False, mlp_only_layers=[1]),
    # renormalised top-k; MoE only on layers 1 and 3 (decoder_sparse_step=2); q/k/v/o biases; a 7-token window
    "renorm-sparse-step-2-bias-window": dict(
        num_hidden_layers=4,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        attention_bias=True,
        use_sliding_window=True,
        sliding_window=7,
        tie_word_embeddings=True,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    # the real models' routing width (top-8) and a long-context yarn rope as Qwen3's model cards configure it
    "top8-of-32-yarn": dict(
        num_experts=32,
        num_experts_per_tok=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        norm_topk_prob=True,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 1e6,
            "original_max_position_embeddings": 64,
        },
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_score_matches_transformers(tmp_path, name):
    assert_score_matches(*make_qwen3_moe(tmp_path / name, **CONFIGS[name]), tol=TOL)


def test_hub_style_config(tmp_path):
    """config.json as the hub ships it: "num_experts" (not transformers 5's "num_local_experts"), rope_theta and
    rope_scaling with a yarn "rope_type", and sliding_window given but switched off by use_sliding_window."""
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 64}
    path, hf = make_qwen3_moe(tmp_path / "hub", rope_parameters=rope, norm_topk_prob=True)
    edit_config(
        path,
        num_local_experts=None,
        num_experts=16,
        rope_parameters=None,
        rope_theta=1e6,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        use_sliding_window=False,
        sliding_window=4,  # ignored, as transformers ignores it: the prompt is longer than 4
        max_window_layers=1,
    )
    assert_score_matches(path, hf, tol=TOL)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return make_qwen3_moe(tmp_path_factory.mktemp("qwen3_moe"), **CONFIGS["top4-of-16-dense-layer-1"])


def test_greedy_generation_sliding_window_past_window(tmp_path):
    """Decode steps beyond the window see only the last `sliding_window` keys, as in transformers."""
    path, hf = make_qwen3_moe(tmp_path / "sw", use_sliding_window=True, sliding_window=6, norm_topk_prob=True)
    ids = prompt_ids(9)
    out = LLM(path, device="cpu", dtype="float32").generate(
        ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    )
    assert out.token_ids == reference_greedy(hf, ids, 32)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_all_resident(qwen3_dir, policy):
    """Experts split between the emulated GPU and the host compute the same model; dense layers stay out of it."""
    path, _ = qwen3_dir
    prompt = prompt_ids(20)
    # 5 of 2 MoE layers x 16 experts resident; fetching policies reserve top_k = 4 slots; (prompt + decode steps) x
    # MoE layers x top-4 pairs
    assert_hybrid_matches(path, policy, 5, 4, prompt, 8, (6 + 7) * 2 * 4, None, TOL)


def test_info_counts(qwen3_dir, tmp_path):
    path, hf = qwen3_dir
    d = describe(path)
    assert (d["layers"], d["moe_layers"]) == (3, 2)
    assert (d["experts_per_layer"], d["experts_per_token"], d["expert_intermediate_size"]) == (16, 4, 32)
    assert d["head_dim"] == 24
    assert d["parameters"] == sum(p.numel() for p in hf.parameters())
    assert d["expert_parameters"] == 2 * 16 * 3 * 64 * 32
    # tied embeddings count once, as transformers' parameters() does
    tied_path, tied_hf = make_qwen3_moe(tmp_path / "tied", **CONFIGS["renorm-sparse-step-2-bias-window"])
    d = describe(tied_path)
    assert (d["layers"], d["moe_layers"]) == (4, 2)
    assert d["parameters"] == sum(p.numel() for p in tied_hf.parameters())


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(num_local_experts=None, num_experts=None), "num_local_experts"),
        (dict(moe_intermediate_size=None), "moe_intermediate_size"),
        (dict(decoder_sparse_step=0), "decoder_sparse_step"),
        (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    ],
)
def test_config_mistakes_are_clear(qwen3_dir, tmp_path, changes, match):
    import shutil

    assert_config_refused(shutil.copytree(qwen3_dir[0], tmp_path / "bad"), match, **changes)
