"""Llama-4 text computed by cadenza equals transformers' Llama4ForCausalLM on tiny random checkpoints: NoPE layers
with temperature tuning, chunked attention (a chunk shorter than the prompt), q/k L2 norms on and off, MoE and dense
layers interleaved, top-1 and top-2 sigmoid routing that scales the experts' inputs, the shared expert; prefill and
cached decode; the hub's multimodal checkpoint layout; offloaded experts compute the same model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cadenza import LLM
from cadenza.loader import build_meta, open_checkpoint
from cadenza.models import supported_architectures
from cadenza.models.llama4 import Llama4TextMLP, Llama4TextMoe
from tests.conftest import (
    assert_config_refused,
    assert_hybrid_matches,
    assert_prefill_and_cached_decode_match,
    edit_config,
    make_hf_model,
    prompt_ids,
    reference_logits,
    single_device_run,
    tiny_config,
)

TOL = 1e-4
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny_llama4_config(**overrides):
    """Llama-4 Scout's switches at tiny size: 4 layers, the 4th NoPE (full attention, temperature tuning with a
    floor_scale of 4 so that it changes the queries within the prompts), the others rope with q/k L2 norms and
    chunks of 8 positions (shorter than the prompts), every layer MoE with 8 experts (top-1) and a shared one."""
    kw = dict(
        intermediate_size=32,  # experts and the shared expert
        intermediate_size_mlp=96,  # dense layers
        num_hidden_layers=4,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        use_qk_norm=True,
        attention_chunk_size=8,
        attn_temperature_tuning=True,
        floor_scale=4,
        attn_scale=0.5,
        pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return tiny_config("Llama4Text", kw, overrides)


def make_llama4(path: Path, seed: int = 0, **overrides):
    """A tiny random Llama4ForCausalLM saved to `path` (fp32), norm weights away from 1; returns (folder, the
    transformers model)."""
    from transformers import Llama4ForCausalLM

    config = tiny_llama4_config(**overrides)
    return make_hf_model(path, config, seed, lambda _, p: p.normal_(1.0, 0.1), model_class=Llama4ForCausalLM)


def reference_cached(hf, ids: list[int], prefill: int = 10, chunk: int = 6) -> torch.Tensor:
    """transformers' logits through its own cache, in the same pieces (its chunked layers keep a sliding cache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    pieces = [ids[:prefill], ids[prefill : prefill + chunk]] + [[t] for t in ids[prefill + chunk :]]
    out, seen = [], 0
    with torch.no_grad():
        for p in pieces:
            pos = torch.arange(seen, seen + len(p))[None]
            out.append(hf(torch.tensor([p]), cache=cache, position_ids=pos, use_cache=True).logits[0])
            seen += len(p)
    return torch.cat(out)


CONFIGS = {
    # Scout: top-1, every layer MoE, q/k norms, chunked rope layers, a NoPE layer with temperature tuning
    "scout-top1-chunk8-qknorm": {},
    # Maverick: no q/k norm, dense and MoE layers alternating (step 2), llama3 rope scaling, top-2
    "maverick-step2-no-qknorm-top2": dict(
        use_qk_norm=False, interleave_moe_layer_step=2, num_experts_per_tok=2, rope_parameters=LLAMA3_ROPE
    ),
    # NoPE every 2nd layer, no temperature tuning, GQA 4:1, a chunk of 5
    "nope-every-2-no-tuning-chunk5": dict(
        no_rope_layer_interval=2, attn_temperature_tuning=False, attention_chunk_size=5, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8,
    ),
    # no chunking: every layer full attention; explicit moe_layers; top-3
    "no-chunks-moe-layers-1-3-top3": dict(attention_chunk_size=None, moe_layers=[1, 3], num_experts_per_tok=3),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_cached_decode_match_transformers(tmp_path, name):
    path, hf = make_llama4(tmp_path / name, **CONFIGS[name])
    ids, want = assert_prefill_and_cached_decode_match(path, hf, tol=TOL)
    assert (reference_cached(hf, ids) - want).abs().max().item() <= TOL  # transformers' own cache agrees


def test_each_switch_matters(tmp_path):
    """Chunks, temperature tuning, q/k norms and NoPE layers each change the logits, so the comparisons above test
    them."""
    path, _ = make_llama4(tmp_path / "base")
    ids = prompt_ids(24)
    want = LLM(path, device="cpu", dtype="float32").score(ids)
    for name, change in {
        "chunk": dict(attention_chunk_size=64, layer_types=None),
        "tuning": dict(attn_temperature_tuning=False),
        "qk-norm": dict(use_qk_norm=False),
        "nope": dict(no_rope_layers=[1, 1, 1, 1], layer_types=None),
    }.items():
        other = shutil.copytree(path, tmp_path / name)
        edit_config(other, **change)
        got = LLM(other, device="cpu", dtype="float32").score(ids)
        assert (got - want).abs().max().item() > 1e-2, name


def test_layer_lists_derived_as_transformers_does(tmp_path):
    """A config.json without moe_layers, no_rope_layers and layer_types (as the hub's Maverick and Scout configs
    come) derives them from interleave_moe_layer_step, no_rope_layer_interval and attention_chunk_size the way
    transformers' Llama4TextConfig does: the same model."""
    path, hf = make_llama4(tmp_path / "derived", **CONFIGS["maverick-step2-no-qknorm-top2"])
    edit_config(path, moe_layers=None, no_rope_layers=None, layer_types=None)
    llm = LLM(path, device="cpu", dtype="float32")
    c = llm.model.config
    assert (
        (c.moe_layers, c.no_rope_layers) == (hf.config.moe_layers, hf.config.no_rope_layers) == ([1, 3], [1, 1, 1, 0])
    )
    assert c.layer_types == hf.config.layer_types
    ids = prompt_ids(20)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL


def test_hub_multimodal_checkpoint(tmp_path):
    """The hub's Llama-4 folders hold Llama4ForConditionalGeneration: the text config in text_config, the text
    tensors under language_model., a vision tower beside them. cadenza runs the text model and reads no vision
    tensor."""
    from safetensors.torch import load_file, save_file

    path, hf = make_llama4(tmp_path / "text")
    mm = tmp_path / "mm"
    shutil.copytree(path, mm)
    cfg = json.loads((path / "config.json").read_text())
    text = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "dtype")}
    (mm / "config.json").write_text(json.dumps({
        "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": text,
        "vision_config": {"hidden_size": 8}, "image_token_index": 200092,
    }))  # fmt: skip
    tensors = {f"language_model.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
    tensors["vision_model.patch_embedding.linear.weight"] = torch.zeros(8, 8)
    tensors["multi_modal_projector.linear_1.weight"] = torch.zeros(64, 8)
    save_file(tensors, str(mm / "model.safetensors"), metadata={"format": "pt"})
    assert "Llama4ForConditionalGeneration" in supported_architectures()
    llm = LLM(mm, device="cpu", dtype="float32")
    ids = prompt_ids(20)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL
    assert not any(n.startswith(("vision_model", "multi_modal")) for n, _ in llm.model.named_parameters())


def test_bf16_equals_transformers(tmp_path):
    """In bf16 the logits equal transformers' bit for bit (float32 rotary and L2 norms, the sigmoid in float32, the
    scaled expert inputs rounded to bf16 as there)."""
    from transformers import Llama4ForCausalLM

    path, _ = make_llama4(tmp_path / "bf16", **CONFIGS["maverick-step2-no-qknorm-top2"])
    hf = Llama4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = prompt_ids(20)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    assert torch.equal(LLM(path, device="cpu", dtype="bfloat16").score(ids), want)


def test_layer_kinds(tmp_path):
    path, _ = make_llama4(tmp_path / "kinds", **CONFIGS["maverick-step2-no-qknorm-top2"])
    layers = build_meta(open_checkpoint(path)).model.layers
    assert [type(layer.feed_forward) for layer in layers] == [Llama4TextMLP, Llama4TextMoe] * 2
    assert layers[0].feed_forward.gate_proj.out_features == 96  # intermediate_size_mlp
    assert layers[1].feed_forward.shared_expert.gate_proj.out_features == 32  # intermediate_size
    assert [layer.self_attn.use_rope for layer in layers] == [True, True, True, False]


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory):
    """One shared tiny checkpoint (top-2 of 16 experts, MoE every layer) and its all-resident results."""
    path, _ = make_llama4(tmp_path_factory.mktemp("llama4"), num_local_experts=16, num_experts_per_tok=2)
    prompt = prompt_ids(20)
    return path, prompt, single_device_run(path, prompt, 8)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_all_resident(llama4_dir, policy):
    """Experts split between the emulated GPU and the host compute the same model. 5 of 4 MoE layers x 16 experts
    resident; fetching policies reserve 2 slots; (prompt + decode steps) x MoE layers x top-2 pairs."""
    path, prompt, want = llama4_dir
    assert_hybrid_matches(path, policy, 5, 2, prompt, 8, (6 + 7) * 4 * 2, None, TOL, want)


def test_hybrid_top1_with_shared_expert(tmp_path):
    """Top-1 hands the shared expert to the seam (queued beside the offloaded experts): the same model."""
    path, _ = make_llama4(tmp_path / "top1", num_local_experts=16)
    assert_hybrid_matches(path, "cpu", 5, 0, prompt_ids(20), 6, (6 + 5) * 4, "policy", TOL)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(attention_chunk_size=0), "attention_chunk_size"),
        (dict(intermediate_size=None), "intermediate_size"),
        (dict(hidden_size=None), "hidden_size"),
        (dict(num_experts_per_tok=17), "num_experts_per_tok"),
        (dict(no_rope_layers=[1, 0]), "no_rope_layers"),
        (dict(layer_types=["sliding_attention"] * 4), "layer_types"),
        (dict(moe_layers=[0, 4]), "moe_layers"),
        (dict(floor_scale=0), "floor_scale"),
    ],
)
def test_config_mistakes_are_clear(llama4_dir, tmp_path, changes, match):
    assert_config_refused(shutil.copytree(llama4_dir[0], tmp_path / "bad"), match, **changes)
