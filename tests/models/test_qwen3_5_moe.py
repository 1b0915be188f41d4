"""Qwen3.5 MoE computed by cadenza equals transformers on tiny random checkpoints, from the hub's multimodal layout
(Qwen3_5MoeForConditionalGeneration: text_config, tensors under model.language_model., the vision tower not read)
and from the text model alone (Qwen3_5MoeForCausalLM): the DeltaNet's four plain projections, the multimodal rotary
embedding on text positions; prefill and cached decode; offloaded experts compute the same model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cadenza import LLM
from cadenza.loader import build_meta, expected_tensors, open_checkpoint
from cadenza.models import supported_architectures
from tests.conftest import (
    TINY_ARGS,
    assert_bf16_dtypes_as_transformers,
    assert_config_refused,
    assert_hybrid_matches,
    assert_prefill_and_cached_decode_match,
    prompt_ids,
    random_hf_model,
    reference_logits,
    save_hf_model,
    single_device_run,
)

TOL = 1e-4
TEXT = dict(
    TINY_ARGS,
    num_hidden_layers=4,
    head_dim=16,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=8,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4)


def _vectors(name: str, p: torch.Tensor) -> None:
    if name.endswith("A_log"):
        p.uniform_(-1.0, 1.0)
    else:  # zero-centred norms around 0, dt_bias, the DeltaNet's norm
        p.normal_(0.0, 0.3)


def make_qwen3_5_moe(path: Path, seed: int = 0, text_only: bool = False, tie: bool = False, **overrides):
    """A tiny random Qwen3_5MoeForConditionalGeneration (a vision tower of one block) or, text_only, the text model
    Qwen3_5MoeForCausalLM, saved to `path`; returns (folder, the fp32 transformers model)."""
    import transformers

    text = transformers.Qwen3_5MoeTextConfig(**{**TEXT, **overrides}, tie_word_embeddings=tie)
    if text_only:
        model = random_hf_model(text, seed, _vectors, transformers.Qwen3_5MoeForCausalLM)
    else:
        config = transformers.Qwen3_5MoeConfig(
            text_config=text.to_dict(), vision_config=VISION, tie_word_embeddings=tie
        )
        model = random_hf_model(config, seed, _vectors, transformers.Qwen3_5MoeForConditionalGeneration)
    return save_hf_model(model, path), model


CONFIGS = {
    "multimodal": {},
    "text-only": dict(text_only=True),
    # one value head per key head, a shorter convolution, attention first and third, GQA 4:1, tied embeddings
    "layer-types-kernel-3-tied": dict(
        layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"],
        linear_num_value_heads=2, linear_conv_kernel_dim=3, num_key_value_heads=1, tie=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_cached_decode_match_transformers(tmp_path, name):
    path, hf = make_qwen3_5_moe(tmp_path / name, **CONFIGS[name])
    assert_prefill_and_cached_decode_match(path, hf, tol=TOL)
    ids = prompt_ids(100, seed=5)  # two chunks of the DeltaNet's chunked rule
    got = LLM(path, device="cpu", dtype="float32").score(ids)
    assert (got - reference_logits(hf, ids)).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return make_qwen3_5_moe(tmp_path_factory.mktemp("qwen3_5_moe"))


def test_multimodal_layout_reads_the_text_model_only(vlm):
    path, _ = vlm
    assert {"Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"} <= set(supported_architectures())
    ckpt = open_checkpoint(path)
    assert any(n.startswith("model.visual.") for n in ckpt.tensors)
    expected = expected_tensors(build_meta(ckpt))
    assert not any("visual" in n for n in expected)
    assert all(n.startswith("model.language_model.") or n == "lm_head.weight" for n in expected)
    llm = LLM(path, device="cpu", dtype="float32")
    assert len(llm.model.model.layers) == 4 and llm.config.layer_types[3] == "full_attention"


def test_hub_style_config(vlm, tmp_path):
    """text_config as Qwen3.5's repositories ship it: the multimodal rotary's mrope_section and mrope_interleaved in
    rope_parameters (text positions make them the plain rotary), no layer_types (full_attention_interval 4): the
    logits are transformers'."""
    import json

    path, hf = vlm
    hub = shutil.copytree(path, tmp_path / "hub")
    cfg = json.loads((hub / "config.json").read_text())
    text = cfg["text_config"]
    text["rope_parameters"].update(mrope_section=[1, 1, 0], mrope_interleaved=True)
    text.pop("layer_types")
    text["full_attention_interval"] = 4
    (hub / "config.json").write_text(json.dumps(cfg))
    ids = prompt_ids(20)
    assert (LLM(hub, device="cpu", dtype="float32").score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_all_resident(vlm, policy):
    """10 of 4 MoE layers x 8 experts resident; fetching policies reserve top_k = 2 slots."""
    path, _ = vlm
    prompt = prompt_ids(20)
    assert_hybrid_matches(
        path, policy, 10, 2, prompt, 8, (6 + 7) * 4 * 2, None, TOL, single_device_run(path, prompt, 8)
    )


def test_bf16_dtypes_as_transformers(vlm):
    assert_bf16_dtypes_as_transformers(vlm[0], skip=("model.visual.",))


def test_config_mistakes_are_clear(vlm, tmp_path):
    import json

    bad = shutil.copytree(vlm[0], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["linear_num_value_heads"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_config_refused(bad, "multiple of the key heads")
