"""dots.llm1 computed by cadenza equals transformers' Dots1ForCausalLM on tiny random checkpoints: Qwen3's
attention (per-head q/k norms, biases, sliding-window layers) with DeepSeek-V3's MoE (dense first layers, shared
experts, sigmoid routing with the score correction bias and expert groups); prefill and cached decode; offloaded
experts compute the same model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cadenza.cli.info import describe
from cadenza.models import supported_architectures
from tests.conftest import (
    assert_bf16_dtypes_as_transformers,
    assert_config_refused,
    assert_hybrid_matches,
    assert_prefill_and_cached_decode_match,
    prompt_ids,
    random_biased_router_model,
    save_hf_model,
    single_device_run,
    tiny_config,
)

TOL = 1e-4


def make_dots1(path: Path, seed: int = 0, **overrides):
    """A tiny random Dots1ForCausalLM saved to `path` (8 routed experts, top-2, two shared ones, one dense first layer,
    3 layers, head_dim 24); returns (folder, the fp32 transformers model)."""
    kw = dict(
        num_hidden_layers=3, head_dim=24, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip
    model = random_biased_router_model(tiny_config("Dots1", kw, overrides), seed)
    return save_hf_model(model, path), model


CONFIGS = {
    # dots.llm1's switches: a dense first layer, two shared experts, renormalised and scaled weights
    "llm1": {},
    # 4 groups of 4 of which 2 are kept, top-3, no renormalisation, attention biases, no dense layer
    "groups-bias-no-dense": dict(
        n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=False,
        attention_bias=True, first_k_dense_replace=0, routed_scaling_factor=1.0,
    ),
    # sliding-window layers from the second on (window 5, shorter than the prompts), GQA 4:1, tied embeddings
    "sliding-gqa4-tied": dict(
        sliding_window=5, max_window_layers=1, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_cached_decode_match_transformers(tmp_path, name):
    path, hf = make_dots1(tmp_path / name, **CONFIGS[name])
    if name.startswith("sliding"):
        assert hf.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert_prefill_and_cached_decode_match(path, hf, tol=TOL)


@pytest.fixture(scope="module")
def dots_dir(tmp_path_factory):
    path, _ = make_dots1(tmp_path_factory.mktemp("dots1"), **CONFIGS["groups-bias-no-dense"])
    prompt = prompt_ids(20)
    return path, prompt, single_device_run(path, prompt, 8)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_all_resident(dots_dir, policy):
    """7 of 3 MoE layers x 16 experts resident; fetching policies reserve top_k = 3 slots."""
    path, prompt, want = dots_dir
    assert_hybrid_matches(path, policy, 7, 3, prompt, 8, (6 + 7) * 3 * 3, None, TOL, want)


def test_bf16_dtypes_and_info(dots_dir):
    """In bf16 the routing bias stays float32 as transformers keeps it; `cadenza info` counts the model."""
    path = dots_dir[0]
    llm = assert_bf16_dtypes_as_transformers(path)
    assert llm.model.model.layers[0].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert "Dots1ForCausalLM" in supported_architectures()
    d = describe(path)
    assert (d["layers"], d["moe_layers"], d["experts_per_layer"], d["experts_per_token"]) == (3, 3, 16, 3)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(n_routed_experts=None), "n_routed_experts"),
        (dict(n_shared_experts=None), "n_shared_experts"),
        (dict(n_group=3), "n_group"),
        (dict(num_experts_per_tok=17), "num_experts_per_tok"),
        (dict(layer_types=["full_attention"]), "layer_types"),
        (dict(layer_types=["sliding_attention"] * 3, sliding_window=0), "sliding_window"),
    ],
)
def test_config_mistakes_are_clear(dots_dir, tmp_path, changes, match):
    assert_config_refused(shutil.copytree(dots_dir[0], tmp_path / "bad"), match, **changes)
