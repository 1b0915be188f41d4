"""Qwen-MoE computed by cadenza equals transformers' Qwen2MoeForCausalLM on tiny random checkpoints: shared expert,
norm_topk_prob both ways, dense layers mixed in (decoder_sparse_step, mlp_only_layers), q/k/v biases, sliding
windows, offloaded experts."""

from __future__ import annotations

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
    reference_logits,
    single_device_run,
    tiny_config,
)

TOL = 1e-4
GREEDY = dict(temperature=0, max_tokens=32, ignore_eos=True)


def make_qwen2_moe(path, seed: int = 0, **overrides):
    """A tiny random Qwen2MoeForCausalLM saved to `path`; returns (folder, the fp32 transformers model)."""
    sizes = dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4)

    # biases and norm weights away from 0 and 1 too, so that a missing q/k/v bias or a wrong norm shows
    def vectors(name, p):
        if name.endswith("bias"):
            p.normal_(0.0, 0.2)
        else:
            p.normal_(1.0, 0.1)

    return make_hf_model(path, tiny_config("Qwen2Moe", sizes, overrides), seed, vectors)


CONFIGS = {
    # Qwen1.5-MoE's switches: every layer sparse, top-k weights not renormalised
    "top2-of-4": {},
    "top3-of-8-norm-topk-mha": dict(num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, num_key_value_heads=4),
    # MoE in layers 1 and 3 only; dense MLPs of intermediate_size in 0 and 2
    "sparse-step-2": dict(num_hidden_layers=4, decoder_sparse_step=2, num_experts=6),
    # mlp_only_layers wins over decoder_sparse_step: layer 1 dense, 0 and 2 sparse
    "mlp-only-layer-1": dict(num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=True),
    "tied-no-qkv-bias": dict(tie_word_embeddings=True, qkv_bias=False),
    "head-dim-32": dict(head_dim=32, num_experts=5),
    # layers 0 and 2 slide (transformers 5: every other layer below max_window_layers), 1 and 3 see everything
    "sliding-window-5": dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=5, max_window_layers=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_score_matches_transformers(tmp_path, name):
    assert_score_matches(*make_qwen2_moe(tmp_path / name, **CONFIGS[name]), tol=TOL)


def test_layer_kinds_follow_config(tmp_path):
    """decoder_sparse_step=2 makes layers 1, 3, 5 sparse; mlp_only_layers=[3] turns 3 back into a dense MLP."""
    path, hf = make_qwen2_moe(tmp_path / "kinds", num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    layers = LLM(path, device="cpu", dtype="float32").model.model.layers
    sparse = [i for i, layer in enumerate(layers) if type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock"]
    assert sparse == [1, 5]
    assert sparse == [i for i, layer in enumerate(hf.model.layers) if type(layer.mlp).__name__ != "Qwen2MoeMLP"]
    assert layers[5].mlp.experts.intermediate_size == 32 and layers[0].mlp.gate_proj.weight.shape == (96, 64)


def test_checkpoint_layout_is_the_hubs(tmp_path):
    """transformers 5 fuses experts in memory (gate_up_proj) but save_pretrained writes the hub's per-expert names."""
    from safetensors import safe_open

    path, _ = make_qwen2_moe(tmp_path / "layout")
    with safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for n in (
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.experts.3.gate_proj.weight",
        "model.layers.0.mlp.experts.3.up_proj.weight",
        "model.layers.0.mlp.experts.3.down_proj.weight",
        "model.layers.0.mlp.shared_expert.gate_proj.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
        "model.layers.0.self_attn.q_proj.bias",
    ):
        assert n in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names


def test_greedy_generation_past_sliding_window(tmp_path):
    """config.json as the hub writes it (use_sliding_window, no layer_types): the sliding layers are derived as
    transformers 5 does, and decode steps past the window see only its last positions."""
    path, hf = make_qwen2_moe(
        tmp_path / "sw", num_hidden_layers=4, use_sliding_window=True, sliding_window=6, max_window_layers=4
    )
    edit_config(path, layer_types=None)
    llm = LLM(path, device="cpu", dtype="float32")
    assert [a.self_attn.sliding_window for a in llm.model.model.layers] == [6, None, 6, None]
    ids = prompt_ids(9)
    out = llm.generate(ids, SamplingParams(**GREEDY))
    assert out.token_ids == reference_greedy(hf, ids, 32)


def test_hub_style_config(tmp_path):
    """config.json as the hub ships Qwen1.5-MoE (rope_theta + rope_scaling with "type", no qkv_bias, mlp_only_layers
    or layer_types, a sliding_window that use_sliding_window=false switches off) gives transformers' logits."""
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    path, hf = make_qwen2_moe(tmp_path / "hub", rope_parameters=rope)
    edit_config(
        path,
        rope_parameters=None,
        rope_theta=1e6,
        rope_scaling={"type": "linear", "factor": 2.0},
        qkv_bias=None,
        mlp_only_layers=None,
        layer_types=None,
        sliding_window=32768,
        max_window_layers=21,
    )
    llm = LLM(path, device="cpu", dtype="float32")
    assert all(a.self_attn.sliding_window is None for a in llm.model.model.layers)
    ids = prompt_ids(16)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """8 experts in layers 0 and 2, a dense layer 1; the all-resident logits and greedy tokens."""
    path, _ = make_qwen2_moe(tmp_path_factory.mktemp("mixed"), num_hidden_layers=3, mlp_only_layers=[1], num_experts=8)
    prompt = prompt_ids(20)
    return path, prompt, single_device_run(path, prompt, 8)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_single_device(mixed, policy):
    path, prompt, want = mixed
    # 5 of 2 MoE layers x 8 experts resident; (prompt + decode steps) x MoE layers x top-2 pairs
    assert_hybrid_matches(path, policy, 5, 2, prompt, 8, (6 + 7) * 2 * 2, "policy", TOL, want)


@pytest.mark.parametrize("overrides", [dict(num_hidden_layers=3, mlp_only_layers=[1]), dict(tie_word_embeddings=True)])
def test_describe_counts(tmp_path, overrides):
    path, hf = make_qwen2_moe(tmp_path / "info", **overrides)
    info = describe(path)
    moe_layers = 2
    assert info["layers"] == overrides.get("num_hidden_layers", 2) and info["moe_layers"] == moe_layers
    assert info["experts_per_layer"] == 4 and info["experts_per_token"] == 2
    assert info["expert_intermediate_size"] == 32
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())  # tied embeddings count once in both
    assert info["expert_parameters"] == moe_layers * 4 * 3 * 64 * 32  # shared experts are not routed experts


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(num_experts=None), "num_experts"),
        (dict(moe_intermediate_size=None), "moe_intermediate_size"),
        (dict(decoder_sparse_step=0), "decoder_sparse_step"),
        (dict(layer_types=["sliding_attention", "full_attention"]), "sliding window"),
        (dict(layer_types=["full_attention"]), "layer_types"),
    ],
)
def test_config_mistakes_are_clear(tmp_path, changes, match):
    path, _ = make_qwen2_moe(tmp_path / "bad")
    assert_config_refused(path, match, **changes)
