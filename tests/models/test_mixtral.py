"""Mixtral computed by cadenza equals transformers' MixtralForCausalLM on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from cadenza import LLM, SamplingParams
from tests.conftest import (
    assert_score_matches,
    edit_config,
    make_mixtral,
    prompt_ids,
    reference_greedy,
    reference_logits,
)

TOL = 1e-4


CONFIGS = {
    "gqa2-top2-of-4": {},
    "mha-top1-of-8": dict(num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=1),
    "gqa4-top3-of-6-sliding": dict(
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=3, sliding_window=7
    ),
    "tied-top2-of-5": dict(tie_word_embeddings=True, num_local_experts=5),
    "head-dim-32-8-experts": dict(head_dim=32, num_local_experts=8, num_experts_per_tok=2),
    "rope-linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    # head_dim given explicitly: transformers' dynamic/yarn/longrope code reads config.head_dim even when None
    "rope-dynamic": dict(
        head_dim=16,
        max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "rope-yarn": dict(
        head_dim=16,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "rope-llama3": dict(
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "rope_theta": 500000.0,
            "original_max_position_embeddings": 32,
        }
    ),
    "rope-longrope": dict(
        head_dim=16,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.3 * i for i in range(8)],
            "original_max_position_embeddings": 16,
        },
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_score_matches_transformers(tmp_path, name):
    assert_score_matches(*make_mixtral(tmp_path / name, **CONFIGS[name]), tol=TOL)


def test_greedy_generation_sliding_window_past_window(tmp_path):
    """Decode steps beyond the window use only the last `sliding_window` keys, as transformers does."""
    path, hf = make_mixtral(tmp_path / "sw", sliding_window=6)
    llm = LLM(path, device="cpu", dtype="float32")
    ids = prompt_ids(9)
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert out.token_ids == reference_greedy(hf, ids, 20)


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    path, hf = make_mixtral(tmp_path / "sharded", save_kw={"max_shard_size": "100KB"})
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 2
    llm = LLM(path, device="cpu", dtype="float32")
    ids = prompt_ids(16)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint(tmp_path, dtype):
    """A bf16/fp16 checkpoint: the default compute dtype is the checkpoint's; upcast to fp32 it matches
    transformers loading the same file in fp32."""
    from transformers import MixtralForCausalLM

    path, _ = make_mixtral(tmp_path / "half", dtype=dtype)
    llm = LLM(path, device="cpu")
    assert llm.dtype == dtype
    assert llm.model.lm_head.weight.dtype == dtype
    ids = prompt_ids(12)
    half = llm.score(ids)
    hf = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = reference_logits(hf, ids)
    full = LLM(path, device="cpu", dtype="float32").score(ids)
    assert (full - want).abs().max().item() <= TOL
    # computing in half precision stays close to the fp32 result (a sanity bound, not exactness)
    assert (half - want).abs().max().item() <= 0.1 * want.abs().max().item()


def test_hub_style_rope_config(tmp_path):
    """config.json as the hub ships it (rope_theta + rope_scaling with "type") gives the same logits as the
    transformers-5 form (rope_parameters)."""
    rope = {"rope_type": "linear", "factor": 3.0, "rope_theta": 20000.0}
    path, hf = make_mixtral(tmp_path / "hub", rope_parameters=rope)
    edit_config(path, rope_parameters=None, rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 3.0})
    llm = LLM(path, device="cpu", dtype="float32")
    ids = prompt_ids(16)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL


def test_incremental_decode_equals_full_pass(mixtral_dir):
    """Logits of each decode step (KV cache) equal the teacher-forced pass over the same tokens."""
    path, _ = mixtral_dir
    llm = LLM(path, device="cpu", dtype="float32")
    out = llm.generate(prompt_ids(8), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    full = llm.score(out.prompt_token_ids + out.token_ids)
    # greedy: each generated token is the argmax of the full pass at the position before it
    assert full[7:-1].argmax(-1).tolist() == out.token_ids
