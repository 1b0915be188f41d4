"""Phi-3.5-MoE computed by cadenza equals transformers' PhimoeForCausalLM on tiny random checkpoints.

One deliberate difference, tested explicitly: past original_max_position_embeddings, transformers 5's
PhimoeRotaryEmbedding still uses the *short* LongRoPE factors (it computes its frequencies without the sequence
length; only the mscale switches), while transformers 4.x and Phi-3.5-MoE's own modeling code use the long ones.
cadenza uses the long ones; the reference for those tests is transformers with the sequence length passed again
(`rope_by_length`), and a test pins that stock transformers 5 differs there.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from cadenza import LLM, SamplingParams
from cadenza.models.phimoe import sparsemixer
from tests.conftest import (
    assert_config_refused,
    assert_hybrid_matches,
    assert_info_counts,
    assert_score_matches,
    edit_config,
    make_hf_model,
    prompt_ids,
    reference_greedy,
    reference_logits,
    tiny_config,
)

TOL = 1e-4
ORIG = 16  # original_max_position_embeddings of the LongRoPE checkpoints: prompts of 12 stay short, 40 go long


def longrope(orig: int = ORIG, short_mscale: float = 1.1, long_mscale: float = 1.3) -> dict:
    """LongRoPE parameters for head_dim 16 (8 frequencies), with distinct short/long factors and mscales."""
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.3 * i for i in range(8)],
        "original_max_position_embeddings": orig,
        "short_mscale": short_mscale,
        "long_mscale": long_mscale,
    }


def make_phimoe(path, seed: int = 0, **overrides):
    """A tiny random PhimoeForCausalLM saved to `path`; returns (folder, the fp32 transformers model)."""
    kw = dict(
        intermediate_size=48,
        num_local_experts=6,
        max_position_embeddings=64,
        # Phi-3.5-MoE's switches: biases everywhere, LongRoPE with mscales, router_jitter_noise 0.01
        attention_bias=True,
        lm_head_bias=True,
        rope_parameters=longrope(),
        pad_token_id=None,
    )

    # LayerNorm weights away from 1, biases away from 0
    def vectors(name, p):
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.2)

    return make_hf_model(path, tiny_config("Phimoe", kw, overrides), seed, vectors)


def rope_by_length(hf):
    """Gives transformers' rotary the sequence length again, as transformers 4.x did: LongRoPE then uses the long
    factors past original_max_position_embeddings (5.x computes them without it and always gets the short ones)."""
    emb = hf.model.rotary_emb
    init, forward = emb.rope_init_fn, emb.forward

    def by_length(x, position_ids):
        n = int(position_ids.max()) + 1
        emb.rope_init_fn = lambda config, *args, **kw: init(config, x.device, seq_len=n)
        try:
            return forward(x, position_ids)
        finally:
            emb.rope_init_fn = init

    emb.forward = by_length
    return hf


def score(path, ids) -> torch.Tensor:
    return LLM(path, device="cpu", dtype="float32").score(ids)


CONFIGS = {
    # Phi-3.5-MoE's switches (biases, LongRoPE + mscale, jitter 0.01); 24 tokens stay under the switch at 32
    "phi35-like-short": dict(rope_parameters=longrope(orig=32)),
    # no biases, plain RoPE, a wide jitter so many experts share each masked softmax
    "plain-wide-jitter": dict(
        attention_bias=False, lm_head_bias=False, rope_parameters=None, router_jitter_noise=0.4, num_local_experts=8
    ),
    "mha-tied-sliding": dict(
        num_key_value_heads=4, tie_word_embeddings=True, sliding_window=7, rope_parameters=None, router_jitter_noise=0.1
    ),
    # transformers' sparsemixer picks two experts whatever num_experts_per_tok says
    "top1-in-config-still-top2": dict(num_experts_per_tok=1, rope_parameters=longrope(orig=32)),
}


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    """LongRoPE switching at 16 tokens, biases, 3 layers of 6 experts: the long/short, generation, hybrid and
    describe tests share it."""
    return make_phimoe(tmp_path_factory.mktemp("phimoe"), num_hidden_layers=3)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_score_matches_transformers(tmp_path, name):
    assert_score_matches(*make_phimoe(tmp_path / name, **CONFIGS[name]), tol=TOL)


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.2, 1.0])
def test_sparsemixer_equals_transformers(eps):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as hf_sparsemixer

    scores = torch.randn(512, 8, generator=torch.Generator().manual_seed(7)) * 2
    scores[:4] = -scores[:4].abs()  # all-negative rows: the clamp in the relative distance matters
    want_w, want_ids = hf_sparsemixer(scores, jitter_eps=eps, training=False)
    got_w, got_ids = sparsemixer(scores, eps)
    assert torch.equal(got_ids, want_ids)
    assert torch.equal(got_w, want_w)
    if eps >= 0.2:  # the masked softmax really spreads: weights are not all 1
        assert (got_w[:, 0] < 0.99).float().mean() > 0.2


def test_longrope_short_sequence_matches_stock_transformers(phi):
    path, hf = phi
    ids = prompt_ids(12)
    assert (score(path, ids) - reference_logits(hf, ids)).abs().max().item() <= TOL


def test_longrope_long_sequence_uses_long_factors(phi):
    """40 tokens > original_max_position_embeddings=16: long factors and long_mscale."""
    path, hf = phi
    ids = prompt_ids(40)
    got = score(path, ids)
    stock = reference_logits(hf, ids)
    want = reference_logits(rope_by_length(copy.deepcopy(hf)), ids)
    assert (want - stock).abs().max().item() > 1e-2  # transformers 5 differs here: short factors, long mscale
    assert (got - want).abs().max().item() <= TOL


def test_hub_style_config_and_name(phi, tmp_path):
    """config.json as the hub ships it: "PhiMoEForCausalLM", rope_theta + rope_scaling with "type" (both the
    "longrope" and the old "su" spelling), original_max_position_embeddings at the top level too."""
    path, hf = phi
    hf = rope_by_length(copy.deepcopy(hf))
    rope = longrope()
    scaling = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
    short, long = prompt_ids(12), prompt_ids(40)
    for kind in ("longrope", "su"):
        hub = tmp_path / kind
        shutil.copytree(path, hub)
        edit_config(
            hub,
            architectures=["PhiMoEForCausalLM"],
            rope_parameters=None,
            rope_theta=10000.0,
            rope_scaling={"type": kind, **scaling},
            original_max_position_embeddings=ORIG,
        )
        llm = LLM(hub, device="cpu", dtype="float32")
        assert type(llm.model).__name__ == "PhimoeForCausalLM"
        for ids in (short, long):
            assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL


def test_greedy_generation_across_the_longrope_switch(phi):
    """10 + 32 tokens pass the switch at 16: as transformers' generate, the sequence is re-run with the long
    factors once it gets there; before, the short ones apply."""
    path, hf = phi
    ids = prompt_ids(10)
    out = LLM(path, device="cpu", dtype="float32").generate(
        ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    )
    assert out.token_ids == reference_greedy(rope_by_length(copy.deepcopy(hf)), ids, 32)


def test_chunked_prefill_across_the_switch(phi):
    """A prompt prefilled in chunks that straddle the switch: from the crossing chunk on, the logits (and so the
    generation) are the one-pass ones. Rows of chunks before it were computed short, as the sequence then was."""
    path, _ = phi
    ids = prompt_ids(40, seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(path, device="cpu", dtype="float32")
    want, want_tokens = llm.score(ids), llm.generate(ids, greedy).token_ids
    llm.engine.prefill_chunk = 7  # chunks 0..6, 7..13, 14..20 (crosses 16: re-run from 0), 21..27, ...
    assert (llm.score(ids)[14:] - want[14:]).abs().max().item() <= TOL
    assert llm.generate(ids, greedy).token_ids == want_tokens


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_single_device(phi, policy):
    """Some experts off the (emulated) GPU: every policy computes the all-resident model."""
    # 7 of 3 layers x 6 experts resident
    assert_hybrid_matches(phi[0], policy, 7, 2, prompt_ids(20, seed=5), 10, side="either", tol=TOL)


def test_describe_counts(phi, tmp_path):
    # the parameters count biases and LayerNorm biases; with tied embeddings the LM head's bias still counts
    tied = make_phimoe(tmp_path / "tied", tie_word_embeddings=True, num_hidden_layers=1)
    assert_info_counts(*phi, "PhimoeForCausalLM", "phimoe", layers=(3, 3, 6, 2), heads=(4, 2, 16), tied=tied)


def test_missing_config_key_is_a_clear_error(phi, tmp_path):
    bad = shutil.copytree(phi[0], tmp_path / "bad")
    assert_config_refused(bad, "num_local_experts", num_local_experts=None)
