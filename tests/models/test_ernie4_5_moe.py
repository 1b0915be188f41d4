"""ERNIE-4.5-MoE computed by cadenza equals transformers' Ernie4_5_MoeForCausalLM on tiny random checkpoints:
interleaved-pair rotary in float32 (default and YaRN), head_dim apart from hidden / heads, biases on every projection
and the LM head, softmax routing with the score correction bias and the `moe_norm_min` clamp, shared experts on and
off, dense layers before moe_layer_start_index, after moe_layer_end_index and between moe_layer_interval steps, tied
and untied embeddings; prefill and cached decode; bf16 as transformers computes it; the checkpoints'
multi-token-prediction tensors are skipped; offloaded experts compute the same model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cadenza import LLM
from cadenza.cli.info import describe
from cadenza.loader import build_meta, expected_tensors, open_checkpoint
from cadenza.models import supported_architectures
from cadenza.models.ernie4_5_moe import Ernie4_5_MoeConfig, Ernie4_5_MoeMLP, Ernie4_5_MoeSparseMoeBlock
from tests.conftest import (
    assert_config_refused,
    assert_hybrid_matches,
    assert_hybrid_prefetch_in_bf16,
    assert_prefill_and_cached_decode_match,
    edit_config,
    prompt_ids,
    reference_logits,
    save_hf_model,
    single_device_run,
    tiny_config,
    write_two_shards,
)

TOL = 1e-4
YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 64}


def tiny_ernie_config(**overrides):
    """ERNIE-4.5-21B-A3B's switches at tiny size: 8 routed experts (top-2: moe_k, which transformers also calls
    num_experts_per_tok) and 2 shared ones, the first layer dense (moe_layer_start_index 1, intermediate_size 96),
    tied embeddings, no biases, GQA 2:1."""
    kw = dict(
        moe_intermediate_size=32,
        num_hidden_layers=3,
        moe_num_experts=8,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    )
    if "moe_k" in overrides:  # one name for the one key, not TINY_ARGS' num_experts_per_tok beside it
        overrides["num_experts_per_tok"] = overrides.pop("moe_k")
    return tiny_config("Ernie4_5_Moe", kw, overrides)


def make_ernie(path: Path, seed: int = 0, mtp: bool = False, **overrides):
    """A tiny random Ernie4_5_MoeForCausalLM saved to `path` (mtp: with the hub checkpoints' multi-token-prediction
    tensors added in a shard of their own); returns (folder, the fp32 transformers model)."""
    from transformers import Ernie4_5_MoeForCausalLM

    torch.manual_seed(seed)
    model = Ernie4_5_MoeForCausalLM(tiny_ernie_config(**overrides)).eval()
    # widen transformers' std-0.02 init so routing is not degenerate; norm weights and biases away from 1 and 0, and
    # a routing bias on the probabilities' scale, large enough to change the choice (test_routing_bias_is_used)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(1.0, 0.1)
    save_hf_model(model, path)
    if mtp:
        add_mtp_tensors(path)
    return path, model


def add_mtp_tensors(path: Path) -> None:
    """Adds the MTP module as ERNIE-4.5's hub checkpoints store it (`model.mtp_block.0.*`, a decoder layer, with
    `model.mtp_emb_norm.0`, `model.mtp_hidden_norm.0` and `model.mtp_linear_proj.0`) in a second shard, and
    announces it as their config.json does."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    n, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    main = load_file(path / "model.safetensors")
    last = f"model.layers.{n - 1}."
    mtp = {"model.mtp_block.0." + k[len(last) :]: t.clone() for k, t in main.items() if k.startswith(last)}
    mtp.update({
        "model.mtp_emb_norm.0.weight": torch.ones(h),
        "model.mtp_hidden_norm.0.weight": torch.ones(h),
        "model.mtp_linear_proj.0.weight": torch.zeros(h, 2 * h),
    })  # fmt: skip
    write_two_shards(path, main, mtp)
    edit_config(path, num_nextn_predict_layers=1, multi_token_pred_lambda=0.3)


CONFIGS = {
    # ERNIE-4.5-21B-A3B: 2 shared experts, first layer dense, tied embeddings
    "21b-two-shared-tied": {},
    # ERNIE-4.5-300B-A47B: no shared experts, three dense first layers, untied embeddings
    "300b-no-shared-dense-first-untied": dict(
        num_hidden_layers=4, moe_layer_start_index=3, moe_num_shared_experts=0, tie_word_embeddings=False,
    ),
    # MoE every second layer between layers 0 and 3 of 5 (layers 1 and 3), the last layer dense past the end index
    "interval-2-end-index": dict(
        num_hidden_layers=5, moe_layer_start_index=0, moe_layer_end_index=3, moe_layer_interval=2,
        moe_num_shared_experts=1,
    ),
    # biases on q/k/v/o, the dense and shared MLPs and the tied LM head
    "use-bias-tied": dict(use_bias=True),
    # YaRN on interleaved pairs, head_dim 24 (not hidden / heads = 8), GQA 4:1, top-3 of 16
    "yarn-head-dim-gqa4-top3": dict(
        num_attention_heads=8, num_key_value_heads=2, head_dim=24, rope_parameters=YARN, moe_num_experts=16, moe_k=3,
    ),
    # a norm_min above the chosen probabilities' sum: the weights are divided by the clamp, not renormalised to 1
    "norm-min-clamps": dict(moe_norm_min=0.9),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_cached_decode_match_transformers(tmp_path, name):
    assert_prefill_and_cached_decode_match(*make_ernie(tmp_path / name, **CONFIGS[name]), tol=TOL)


def test_routing_bias_is_used(tmp_path):
    """The score correction bias changes which experts are chosen (so the tests above would see it ignored), and
    cadenza reads it from where the checkpoint puts it (`mlp.moe_statics`, beside the gate)."""
    path, hf = make_ernie(tmp_path / "bias")
    ids = prompt_ids(24)
    want = reference_logits(hf, ids)
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.moe_statics.e_score_correction_bias.zero_()
    unbiased = reference_logits(hf, ids)
    assert (want - unbiased).abs().max().item() > 100 * TOL
    assert "model.layers.1.mlp.moe_statics.e_score_correction_bias" in open_checkpoint(path).tensors
    assert (LLM(path, device="cpu", dtype="float32").score(ids) - want).abs().max().item() <= TOL


def test_hub_style_config_and_mtp_tensors_skipped(tmp_path):
    """config.json as ERNIE-4.5-21B-A3B-PT's repository ships it: rope_theta at the top level and no
    rope_parameters, no moe_layer_end_index (-1: the last layer), keys transformers ignores (moe_capacity,
    moe_gate, moe_use_aux_free, use_rmsnorm), MTP tensors present in the weights (a second shard). The MTP tensors
    are neither expected nor read, and the logits are transformers'."""
    path, hf = make_ernie(tmp_path / "hub", mtp=True)
    edit_config(path, rope_parameters=None, rope_theta=10000.0, moe_layer_end_index=None, moe_capacity=[8, 8, 8],
                moe_gate="topk", moe_use_aux_free=True, use_rmsnorm=True)  # fmt: skip
    ckpt = open_checkpoint(path)
    assert any(n.startswith("model.mtp_block.0.mlp.experts.") for n in ckpt.tensors)
    assert not any(".mtp_" in n for n in expected_tensors(build_meta(ckpt)))
    llm = LLM(path, device="cpu", dtype="float32")
    assert llm.model.config.moe_layer_end_index == 2 and len(llm.model.model.layers) == 3
    ids = prompt_ids(20)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL
    # the MTP tensors count in no size (the routing bias does: a tensor of the checkpoint)
    assert describe(path)["parameters"] == sum(p.numel() for p in hf.parameters())


def test_defaults_follow_transformers(tmp_path):
    """Keys a config.json leaves out take transformers' Ernie4_5_MoeConfig defaults (tied embeddings, 2 shared
    experts, MoE from layer 1 to the last, 4 KV heads, rope_theta 500000, ...); transformers' other names of the
    expert keys (num_experts, num_experts_per_tok) are read too."""
    from transformers import Ernie4_5_MoeConfig as HfConfig

    path, _ = make_ernie(tmp_path / "defaults", num_hidden_layers=4)
    cfg = json.loads((path / "config.json").read_text())
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "moe_num_experts", "moe_k", "moe_intermediate_size")  # fmt: skip
    cfg = {k: cfg[k] for k in keep}
    ours, theirs = Ernie4_5_MoeConfig.from_hf(cfg), HfConfig(**cfg)
    for key in ("tie_word_embeddings", "use_bias", "moe_num_shared_experts", "moe_layer_start_index",
                "moe_layer_end_index", "moe_layer_interval", "moe_norm_min", "num_key_value_heads", "rms_norm_eps",
                "max_position_embeddings", "hidden_act", "bos_token_id"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.eos_token_id == [theirs.eos_token_id]
    assert ours.rope.rope_theta == theirs.rope_parameters["rope_theta"] == 500000.0
    assert [ours.is_sparse(i) for i in range(4)] == [False, True, True, True]
    alias = {k: v for k, v in cfg.items() if k not in ("moe_num_experts", "moe_k")}
    config = Ernie4_5_MoeConfig.from_hf({**alias, "num_experts": 8, "num_experts_per_tok": 2})
    assert (config.moe_num_experts, config.moe_k, config.num_experts_per_tok) == (8, 2, 2)
    # transformers' default rope ignores partial_rotary_factor: every feature turns
    assert Ernie4_5_MoeConfig.from_hf({**cfg, "partial_rotary_factor": 0.5}).rope.partial_rotary_factor == 1.0


def test_bf16_as_transformers(tmp_path):
    """In bf16 every tensor has the dtype transformers' from_pretrained gives it (the router's weight and the
    routing bias stay float32, _keep_in_fp32_modules_strict; everything else bf16), and the logits are
    transformers' bf16 logits bit for bit: rotary runs in float32 from float32 tables as there (bf16 tables miss by
    up to 1.5 on this YaRN config). The reference is the modeling file's own expert loop (experts_implementation
    "eager"): transformers' default grouped_mm kernel adds a token's k expert outputs in another order, which in bf16
    moves logits by a rounding (0.05 here)."""
    from transformers import Ernie4_5_MoeForCausalLM

    path, _ = make_ernie(tmp_path / "bf16", **CONFIGS["yarn-head-dim-gqa4-top3"])
    hf = Ernie4_5_MoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_implementation="eager").eval()
    # transformers nests moe_statics in its router; the checkpoint and cadenza keep it beside the gate
    want = {n.replace(".gate.moe_statics.", ".moe_statics."): t.dtype for n, t in hf.state_dict().items()}
    want = {n: d for n, d in want.items() if ".experts." not in n}
    llm = LLM(path, device="cpu", dtype="bfloat16")
    got = {n: t.dtype for n, t in llm.model.state_dict().items() if ".experts." not in n}
    assert got == want
    mlp = llm.model.model.layers[1].mlp
    assert mlp.gate.weight.dtype == mlp.moe_statics.e_score_correction_bias.dtype == torch.float32
    ids = prompt_ids(24)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids])).logits[0].float()
    assert torch.equal(llm.score(ids), hf_logits)


@pytest.fixture(scope="module")
def ernie_dir(tmp_path_factory):
    """One shared tiny checkpoint (top-4 of 16 experts: enough to split, a shared expert, MTP tensors) and its
    all-resident results."""
    path, _ = make_ernie(
        tmp_path_factory.mktemp("ernie4_5_moe"), mtp=True, moe_num_experts=16, moe_k=4, moe_num_shared_experts=1
    )
    prompt = prompt_ids(20)
    return path, prompt, single_device_run(path, prompt, 8)


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_all_resident(ernie_dir, policy):
    """Experts split between the emulated GPU and the host compute the same model; dense layers and shared experts
    stay out of it. 5 of 2 MoE layers x 16 experts resident; fetching policies reserve top_k = 4 slots;
    (prompt + decode steps) x MoE layers x top-4 pairs."""
    path, prompt, want = ernie_dir
    assert_hybrid_matches(path, policy, 5, 4, prompt, 8, (6 + 7) * 2 * 4, None, TOL, want)


def test_hybrid_prefetch_in_bf16(ernie_dir):
    """The fetch policy guesses the next layer's experts with its router weight, which stays float32 while the
    hidden states are bf16: the guess runs, and the offloaded model equals the all-resident one."""
    path, prompt, _ = ernie_dir
    assert_hybrid_prefetch_in_bf16(path, prompt, 5, 4)  # 5 resident, top_k = 4 slots


def test_info_counts_and_layer_kinds(ernie_dir, tmp_path):
    path = ernie_dir[0]
    assert "Ernie4_5_MoeForCausalLM" in supported_architectures()
    d = describe(path)
    assert (d["layers"], d["moe_layers"], d["head_dim"]) == (3, 2, 16)
    assert (d["experts_per_layer"], d["experts_per_token"], d["expert_intermediate_size"]) == (16, 4, 32)
    assert d["expert_parameters"] == 2 * 16 * 3 * 64 * 32
    layers = build_meta(open_checkpoint(path)).model.layers
    assert type(layers[0].mlp) is Ernie4_5_MoeMLP and layers[0].mlp.gate_proj.out_features == 96
    assert all(isinstance(layer.mlp, Ernie4_5_MoeSparseMoeBlock) for layer in layers[1:])
    assert layers[1].mlp.shared_experts.gate_proj.out_features == 32  # moe_num_shared_experts x moe_intermediate
    assert layers[1].mlp.moe_statics.e_score_correction_bias.shape == (1, 16)
    # use_bias: every projection biased, and the LM head; the routed experts never
    path, _ = make_ernie(tmp_path / "biased", use_bias=True)
    model = build_meta(open_checkpoint(path))
    attn, moe = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attn.q_proj.bias is not None and attn.o_proj.bias is not None and model.lm_head.bias is not None
    assert moe.shared_experts.down_proj.bias is not None and not moe.experts.bias


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(moe_num_experts=None), "moe_num_experts"),
        (dict(moe_k=None), "moe_k"),
        (dict(moe_intermediate_size=None), "moe_intermediate_size"),
        (dict(hidden_size=None), "hidden_size"),
        (dict(moe_k=17), "moe_k=17"),
        (dict(moe_layer_interval=0), "moe_layer_interval"),
        (dict(moe_num_shared_experts=-1), "moe_num_shared_experts"),
        (dict(moe_num_experts=[16, 16]), "ERNIE-4.5-VL"),
        (dict(rope_parameters={**YARN, "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    ],
)
def test_config_mistakes_are_clear(ernie_dir, tmp_path, changes, match):
    assert_config_refused(shutil.copytree(ernie_dir[0], tmp_path / "bad"), match, **changes)
