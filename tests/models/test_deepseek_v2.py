"""DeepSeek-V2 computed by cadenza equals transformers' DeepseekV2ForCausalLM on tiny random checkpoints: MLA with
and without q_lora, absorbed and decompressed attention, the latent-only cache, YaRN, greedy and group-limited
routing, dense first layers, shared experts, offloaded experts, `cadenza info`."""

from __future__ import annotations

import json

import pytest
import torch

from cadenza import LLM
from cadenza.cli.info import describe
from cadenza.kv_cache import MLACache
from tests.cli.test_cli import cli
from tests.conftest import (
    VOCAB,
    assert_config_refused,
    assert_hybrid_matches,
    budget_for,
    edit_config,
    make_deepseek,
    max_logit_diff,
    prompt_ids,
    reference_logits,
    single_device_run,
)

TOL = 1e-4


def tiny_yarn(mscale: float, mscale_all_dim: float) -> dict:
    """YaRN rope parameters as DeepSeek's checkpoints set them, at tiny scale (4x past 64 positions)."""
    return {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
        "rope_theta": 10000.0,
    }


def edit_to_hub_config(path, rope_parameters: dict, **keys) -> None:
    """Rewrites config.json as DeepSeek's repositories ship it: rope_theta and rope_scaling (with "type") instead of
    rope_parameters, no head_dim, moe_layer_freq, and the original code's other `keys`."""
    rope = {k: v for k, v in rope_parameters.items() if k not in ("rope_type", "rope_theta")}
    rope_scaling = {**rope, "type": rope_parameters["rope_type"]}
    edit_config(path, rope_parameters=None, rope_theta=10000, rope_scaling=rope_scaling, head_dim=None, **keys)


YARN = tiny_yarn(mscale=1.0, mscale_all_dim=0.8)


def make_v2(path, seed: int = 0, **overrides):
    return make_deepseek(path, 2, seed, **overrides)


def set_absorb(llm_or_model, value: bool | None) -> None:
    """Forces every MLA layer onto the absorbed (True) or decompressed (False) path; None: by token count."""
    model = getattr(llm_or_model, "model", llm_or_model)
    for m in model.modules():
        if hasattr(m, "absorb"):
            m.absorb = value


def assert_every_path_matches(path, hf) -> None:
    """cadenza's logits for 24 tokens equal transformers' with MLA's path chosen by token count, absorbed, and
    decompressed."""
    llm = LLM(path, device="cpu", dtype="float32")
    ids = prompt_ids(24)
    want = reference_logits(hf, ids)
    for absorb in (None, True, False):
        set_absorb(llm, absorb)
        got = llm.score(ids)
        assert got.shape == (24, VOCAB)
        assert (got - want).abs().max().item() <= TOL, absorb


CONFIGS = {
    # DeepSeek-V2-Lite's switches: no q_lora, greedy top-k, one dense layer
    "greedy-no-q-lora": {},
    # DeepSeek-V2's: q_lora, group-limited routing (top-3 from the best of 4 groups: unlike greedy whenever the
    # three best experts are not in one group), scaled weights
    "q-lora-group-limited": dict(
        q_lora_rank=24,
        topk_method="group_limited_greedy",
        n_routed_experts=16,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=1,
        routed_scaling_factor=1.5,
    ),
    # mscale != mscale_all_dim: the cos/sin tables and the softmax scale both carry a YaRN factor
    "yarn": dict(rope_parameters=YARN, max_position_embeddings=256),
    "two-dense-layers-two-shared": dict(num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=2),
    "attention-bias-tied": dict(attention_bias=True, tie_word_embeddings=True, q_lora_rank=24),
    # transformers' V2 router reads no norm_topk_prob (no published V2 checkpoint sets it)
    "norm-topk-prob-ignored": dict(norm_topk_prob=True, routed_scaling_factor=2.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_score_matches_transformers(tmp_path, name):
    assert_every_path_matches(*make_v2(tmp_path / name, **CONFIGS[name]))


def test_hub_style_config(tmp_path):
    """config.json as DeepSeek-V2-Lite's repository ships it (rope_theta + rope_scaling with "type": "yarn", no
    head_dim, the original code's extra keys) gives transformers' logits."""
    yarn = tiny_yarn(mscale=0.707, mscale_all_dim=0.707)
    path, hf = make_v2(tmp_path / "hub", rope_parameters=yarn)
    extra = dict(qk_head_dim=None, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True, n_group=1, topk_group=1)
    edit_to_hub_config(path, yarn, moe_layer_freq=1, **extra)
    assert max_logit_diff(path, hf, prompt_ids(20)) <= TOL


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """One tiny V2-Lite-like checkpoint for the tests that do not compare with transformers."""
    return make_v2(tmp_path_factory.mktemp("lite"), rope_parameters=YARN)


def test_absorbed_decode_equals_decompressed(lite):
    """Prefill then 8 decode steps, every layer forced onto one path, then the other: the same logits."""
    llm = LLM(lite[0], device="cpu", dtype="float32")
    model, cpu = llm.model, torch.device("cpu")
    prompt, extra = prompt_ids(12), prompt_ids(8, seed=5)
    runs = {}
    for absorb in (True, False):
        set_absorb(model, absorb)
        cache = model.new_cache(64, torch.float32, cpu)
        with torch.inference_mode():
            steps = [model(torch.tensor([prompt]), cache)[0, -1]]
            steps += [model(torch.tensor([[t]]), cache)[0, -1] for t in extra]
        runs[absorb] = torch.stack(steps)
    assert (runs[True] - runs[False]).abs().max().item() <= 1e-5
    # by default one token takes the absorbed path and a long chunk the decompressed one
    attn = model.model.layers[0].self_attn
    set_absorb(model, None)
    assert attn.use_absorbed(1) and not attn.use_absorbed(4096)
    assert attn.absorb_max_tokens == 16 * (8 + 12) // (2 * 16 - 8 - 12)


def test_cache_holds_only_the_latent_and_rope_key(lite):
    llm = LLM(lite[0], device="cpu", dtype="float32")
    cache = llm.model.new_cache(32, torch.float32, torch.device("cpu"), batch=2)
    assert isinstance(cache, MLACache) and cache.streams == {"kv": (1, 16), "pe": (1, 8)}
    per_token = 3 * (16 + 8) * 4  # layers x (kv_lora_rank + qk_rope_head_dim) x fp32
    assert cache.nbytes_per_token() == per_token == llm.sizes.kv_bytes_per_token
    decompressed = 3 * 4 * (8 + 8 + 12) * 4  # layers x heads x (k_nope + k_pe + v) x fp32
    assert decompressed / per_token == pytest.approx(4.67, abs=0.01)


def test_layer_kinds_follow_config(tmp_path):
    """first_k_dense_replace=2 and moe_layer_freq=2 (DeepSeek's original rule; transformers reads no
    moe_layer_freq): MoE in layers 2 and 4 of 6, dense MLPs of intermediate_size elsewhere."""
    path, _ = make_v2(tmp_path / "kinds", num_hidden_layers=6, first_k_dense_replace=2)
    edit_config(path, moe_layer_freq=2)
    from cadenza.checkpoint import Checkpoint
    from cadenza.loader import build_meta

    layers = build_meta(Checkpoint(path)).model.layers
    sparse = [i for i, layer in enumerate(layers) if type(layer.mlp).__name__ == "DeepseekV2Moe"]
    assert sparse == [2, 4]
    assert layers[1].mlp.gate_proj.weight.shape == (96, 64)
    assert layers[2].mlp.shared_experts.gate_proj.weight.shape == (32, 64)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """V2 with q_lora and group-limited routing; the all-resident logits and greedy tokens."""
    path, _ = make_v2(
        tmp_path_factory.mktemp("mixed"), q_lora_rank=24, topk_method="group_limited_greedy", n_group=2, topk_group=1
    )
    prompt = prompt_ids(20)
    return path, prompt, single_device_run(path, prompt, 8)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_single_device(mixed, policy):
    path, prompt, want = mixed
    # 5 of 2 MoE layers x 8 experts resident; (prompt + decode steps) x MoE layers x top-2 pairs
    assert_hybrid_matches(path, policy, 5, 2, prompt, 8, (6 + 7) * 2 * 2, "policy", TOL, want)


def test_shared_experts_run_beside_the_routed_ones(mixed):
    """On the offloaded path the shared experts are handed to the seam, which queues them after the CPU's share."""
    path, prompt, (want_logits, _) = mixed
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=budget_for(path, 0, 0), offload_policy="cpu")
    calls = []
    layer = llm.model.model.layers[1].mlp
    original = layer.shared_experts.forward
    layer.shared_experts.forward = lambda x: calls.append(x.shape) or original(x)
    try:
        assert (llm.score(prompt) - want_logits).abs().max().item() <= TOL
        assert calls == [(20, 64)]
    finally:
        llm.close()


def test_describe_and_cli_info(lite):
    path, hf = lite
    info = describe(path)
    assert info["architecture"] == "DeepseekV2ForCausalLM" and info["layers"] == 3 and info["moe_layers"] == 2
    assert info["experts_per_layer"] == 8 and info["experts_per_token"] == 2 and info["expert_intermediate_size"] == 32
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())
    assert info["expert_parameters"] == 2 * 8 * 3 * 64 * 32  # shared experts are not routed experts
    r = cli("info", "--model", str(path), "--gpu-memory", "1GiB", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["head_dim"] == 16 and d["kv_heads"] == 4
    assert d["placement"]["resident_count"] == 16
    context = 256  # the model's context, under the 8192 default
    assert d["placement"]["kv_bytes"] == context * 3 * (16 + 8) * 4  # MLA's latent cache, not per-head K and V
    text = cli("info", "--model", str(path), "--gpu-memory", "1GiB")
    assert text.returncode == 0 and "DeepseekV2ForCausalLM" in text.stdout and "KV" in text.stdout


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(topk_method="noaux_tc"), "topk_method"),
        (dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "n_group"),
        (dict(topk_method="group_limited_greedy", n_group=4, topk_group=None), "topk_group"),
        (dict(kv_lora_rank=None), "kv_lora_rank"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(moe_layer_freq=0), "moe_layer_freq"),
        (dict(quantization_config={"quant_method": "gptq", "bits": 4}), "gptq"),
    ],
)
def test_config_mistakes_are_clear(lite, tmp_path, changes, match):
    import shutil

    assert_config_refused(shutil.copytree(lite[0], tmp_path / "bad"), match, **changes)
