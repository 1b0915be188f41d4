"""Qwen3-Next computed by cadenza equals transformers' Qwen3NextForCausalLM on tiny random checkpoints: Gated DeltaNet
layers (the chunked rule over several chunks, one-token steps, the causal convolution across passes, value heads
grouped on key heads), gated attention with zero-centred q/k norms and partial rotary, Qwen-MoE's block with its
shared expert; prefill and cached decode; the slot cache's states through rows of different lengths, reused slots,
beams and offloaded experts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cadenza import LLM, CadenzaError, SamplingParams
from cadenza.checkpoint import Checkpoint
from cadenza.cli.info import describe
from cadenza.kv_cache import HybridCache, KVCache
from cadenza.loader import build_meta, expected_tensors, load_model, open_checkpoint
from cadenza.models import supported_architectures
from tests.conftest import (
    assert_bf16_dtypes_as_transformers,
    assert_config_refused,
    assert_hybrid_matches,
    assert_prefill_and_cached_decode_match,
    edit_config,
    prompt_ids,
    random_hf_model,
    reference_greedy,
    reference_logits,
    save_hf_model,
    single_device_run,
    tiny_config,
    write_two_shards,
)
from tests.test_batch_cache import alone, check_equal_starts_batch_prefill, check_reorder_copies_rows

TOL = 1e-4


def tiny_qwen3_next_config(**overrides):
    """Qwen3-Next's switches at tiny size: 4 layers (three DeltaNet, then attention: full_attention_interval 4),
    DeltaNet with 2 key heads of 8 and 4 value heads of 12, attention with 4 heads of 16 (a quarter rotary: 4), 8
    experts of 32 (top-2, renormalised) and a shared expert of 48."""
    kw = dict(
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
    return tiny_config("Qwen3Next", kw, overrides)


def make_qwen3_next(path: Path, seed: int = 0, **overrides):
    """A tiny random Qwen3NextForCausalLM saved to `path`; returns (folder, the fp32 transformers model)."""

    def vectors(name: str, p: torch.Tensor) -> None:
        # zero-centred norms around 0 (a norm read as plain RMSNorm would be off by one), decays of every size
        if name.endswith("A_log"):
            p.uniform_(-1.0, 1.0)
        elif name.endswith("dt_bias") or "norm" in name:
            p.normal_(0.0, 0.3)
        else:
            p.normal_(0.0, 0.5)

    model = random_hf_model(tiny_qwen3_next_config(**overrides), seed, vectors)
    return save_hf_model(model, path), model


CONFIGS = {
    # Qwen3-Next-80B's pattern: three DeltaNet layers then an attention one; two value heads per key head
    "interval-4-grouped-values": {},
    # one value head per key head, attention first and third, a dense layer, MoE every 2nd layer, tied embeddings
    "layer-types-dense-step-2-tied": dict(
        layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"],
        linear_num_value_heads=2, mlp_only_layers=[1], decoder_sparse_step=2, tie_word_embeddings=True,
    ),
    # half of each head rotary, attention biases, a wider convolution, not renormalised, GQA 4:1
    "half-rotary-bias-kernel-3": dict(
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        attention_bias=True, linear_conv_kernel_dim=3, norm_topk_prob=False, num_key_value_heads=1,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_cached_decode_match_transformers(tmp_path, name):
    path, hf = make_qwen3_next(tmp_path / name, **CONFIGS[name])
    assert_prefill_and_cached_decode_match(path, hf, tol=TOL)


@pytest.mark.parametrize("n", [63, 64, 65, 200])
def test_chunked_rule_across_chunks(tmp_path_factory, n):
    """Prompts around and past the 64-token chunk: the chunked rule's padding and its state carried from chunk to
    chunk; then a second pass of 70 (its convolution continuing the first's inputs) and one-token steps."""
    path, hf = _shared(tmp_path_factory)
    llm = LLM(path, device="cpu", dtype="float32")
    ids = prompt_ids(n + 72, seed=n)
    want = reference_logits(hf, ids)
    assert (llm.score(ids[:n]) - want[:n]).abs().max().item() <= TOL
    cache = llm.model.new_cache(n + 72, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        got = [llm.model(torch.tensor([ids[:n]]), cache)[0], llm.model(torch.tensor([ids[n : n + 70]]), cache)[0]]
        got += [llm.model(torch.tensor([[t]]), cache)[0] for t in ids[n + 70 :]]
    assert (torch.cat(got) - want).abs().max().item() <= TOL


_made: dict = {}


def _shared(tmp_path_factory):
    if "m" not in _made:
        _made["m"] = make_qwen3_next(tmp_path_factory.mktemp("qwen3-next"))
    return _made["m"]


def test_hub_style_config_and_mtp_skipped(tmp_path):
    """config.json as Qwen3-Next's repository ships it: full_attention_interval instead of layer_types,
    partial_rotary_factor and rope_theta at the top level, and the multi-token-prediction weights (`mtp.*`) in a
    shard of their own, neither expected nor read."""
    path, hf = make_qwen3_next(tmp_path / "hub")
    edit_config(path, layer_types=None, full_attention_interval=4, rope_parameters=None, rope_theta=10000.0,
                partial_rotary_factor=0.25)  # fmt: skip
    from safetensors.torch import load_file

    main = load_file(path / "model.safetensors")
    write_two_shards(path, main, {"mtp.fc.weight": torch.zeros(64, 128), "mtp.norm.weight": torch.ones(64)})
    assert not any(n.startswith("mtp.") for n in expected_tensors(build_meta(open_checkpoint(path))))
    llm = LLM(path, device="cpu", dtype="float32")
    assert llm.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert llm.model.model.rotary_emb.dim == 4
    ids = prompt_ids(20)
    assert (llm.score(ids) - reference_logits(hf, ids)).abs().max().item() <= TOL
    assert llm.generate(ids[:8], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)).token_ids == (
        reference_greedy(hf, ids[:8], 12)
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = _shared(tmp_path_factory)
    return load_model(Checkpoint(path), torch.device("cpu"), torch.float32)


@torch.inference_mode()
def test_rows_of_different_lengths_decode_together(model):
    """Three sequences in slots 2, 0, 3 (out of order) decode together; slot 0 held another sequence before, whose
    state a new prefill at position 0 must not read."""
    prompts = [prompt_ids(3, seed=1), prompt_ids(9, seed=2), prompt_ids(6, seed=3)]
    extra = [prompt_ids(4, seed=10 + i) for i in range(3)]
    cache = model.new_cache(64, torch.float32, torch.device("cpu"), batch=4)
    assert isinstance(cache, HybridCache)
    model(torch.tensor([prompt_ids(11, seed=9)]), cache, rows=[0])  # a finished sequence's state in slot 0
    cache.reset([0])
    slots = [2, 0, 3]
    for p, s in zip(prompts, slots, strict=True):
        model(torch.tensor([p]), cache, rows=[s])
    got = torch.stack([model(torch.tensor([[e[i]] for e in extra]), cache, rows=slots)[:, -1] for i in range(4)], 1)
    for i in range(3):
        # (batched and single products round differently: logits of this model's size differ by ~1e-5)
        torch.testing.assert_close(got[i], alone(model, prompts[i], extra[i]), atol=TOL, rtol=0)


@torch.inference_mode()
def test_equal_starts_batch_prefill_and_reorder(model):
    check_equal_starts_batch_prefill(model)
    check_reorder_copies_rows(model)  # beams: the states are copied with the keys and values


@torch.inference_mode()
def test_checkpoint_undoes_a_pass(model):
    """A CUDA graph's capture runs the step once eagerly before recording it (cadenza.graphs): the states of the rows
    that pass advanced, and their lengths, are put back, so the replay is the step's only advance; the same pass
    again gives the same logits. Slot 1 keeps what it had."""
    cache = model.new_cache(64, torch.float32, torch.device("cpu"), batch=3)
    for slot, n in ((0, 7), (1, 5), (2, 9)):
        model(torch.tensor([prompt_ids(n, seed=n)]), cache, rows=[slot])
    before = {(layer, k): v.clone() for layer, st in cache.states.items() for k, v in st.items()}
    step = torch.tensor([[5], [6]])
    restore = cache.checkpoint([2, 0])
    first = model(step, cache, rows=[2, 0])
    assert any(not torch.equal(before[layer, k], v) for layer, st in cache.states.items() for k, v in st.items())
    assert cache.lengths == [8, 5, 10]
    restore()
    assert cache.lengths == [7, 5, 9]
    for (layer, k), v in before.items():
        assert torch.equal(cache.states[layer][k], v), (layer, k)
    assert torch.equal(model(step, cache, rows=[2, 0]), first)
    undo_lengths_only = KVCache.checkpoint(cache, [1])  # (the keys and values a repeat rewrites in place)
    model(step[:1], cache, rows=[1])
    undo_lengths_only()
    assert cache.lengths == [8, 5, 10]


def test_batches_through_the_engine(tmp_path_factory):
    """More prompts than slots (slots reused), of different lengths, generated together: each prompt's greedy tokens
    alone, transformers' own (beam search against transformers': tests/test_generation.py)."""
    path, hf = _shared(tmp_path_factory)
    llm = LLM(path, device="cpu", dtype="float32", max_batch=2)
    prompts = [prompt_ids(n, seed=n) for n in (5, 12, 8)]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = llm.generate(prompts, greedy)
    assert [o.token_ids for o in outs] == [reference_greedy(hf, p, 10) for p in prompts]


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
def test_hybrid_equals_all_resident(tmp_path_factory, policy):
    """10 of 4 MoE layers x 8 experts resident; fetching policies reserve top_k = 2 slots."""
    path, _ = _shared(tmp_path_factory)
    prompt = prompt_ids(20)
    if "want" not in _made:
        _made["want"] = single_device_run(path, prompt, 8)
    assert_hybrid_matches(path, policy, 10, 2, prompt, 8, (6 + 7) * 4 * 2, None, TOL, _made["want"])


def test_host_kv_cache_refused_and_state_counted(tmp_path_factory):
    """--kv-cache host is refused with the reason; the states count in `cadenza info` and in the plan's budget."""
    path, _ = _shared(tmp_path_factory)
    with pytest.raises(CadenzaError, match="per-sequence state.*--kv-cache gpu"):
        LLM(path, device="cpu", dtype="float32", kv_cache="host", gpu_memory="1GiB")
    d = describe(path)
    # 3 DeltaNet layers: conv state [C = 2*2*8 + 4*12 = 80, K-1 = 3] fp32 checkpoint, state [4, 8, 12] float32
    assert d["kv_bytes_per_sequence"] == 3 * (80 * 3 * 4 + 4 * 8 * 12 * 4)
    assert d["kv_bytes_per_token"] == 1 * 2 * 2 * 16 * 4  # the one attention layer's keys and values
    one = LLM(path, device="cpu", dtype="float32", gpu_memory="64MiB", max_batch=1).placement.workspace_bytes
    four = LLM(path, device="cpu", dtype="float32", gpu_memory="64MiB", max_batch=4).placement.workspace_bytes
    assert four - one >= 3 * d["kv_bytes_per_sequence"]
    from tests.cli.test_cli import cli

    text = cli("info", "--model", str(path))
    assert text.returncode == 0 and "+ 7.3 KiB per sequence" in text.stdout, text.stderr  # 7488 bytes


def test_info_counts(tmp_path_factory):
    path, hf = _shared(tmp_path_factory)
    assert "Qwen3NextForCausalLM" in supported_architectures()
    d = describe(path)
    assert (d["layers"], d["moe_layers"], d["experts_per_layer"], d["experts_per_token"]) == (4, 4, 8, 2)
    assert d["parameters"] == sum(p.numel() for p in hf.parameters())
    assert d["expert_parameters"] == 4 * 8 * 3 * 64 * 32


def test_bf16_dtypes_as_transformers(tmp_path_factory):
    assert_bf16_dtypes_as_transformers(_shared(tmp_path_factory)[0])  # 70 tokens: the chunked rule in bf16


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(num_experts=None), "num_experts"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(linear_num_value_heads=3), "multiple of the key heads"),
        (dict(layer_types=["linear_attention", "full_attention"]), "layer_types"),
        (dict(layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"]),
         "layer_types"),
    ],
)  # fmt: skip
def test_config_mistakes_are_clear(tmp_path_factory, tmp_path, changes, match):
    path, _ = _shared(tmp_path_factory)
    assert_config_refused(shutil.copytree(path, tmp_path / "bad"), match, **changes)


def test_config_keys_default_as_transformers(tmp_path_factory):
    from cadenza.models.qwen3_next import Qwen3NextConfig

    path, _ = _shared(tmp_path_factory)
    cfg = json.loads((path / "config.json").read_text())
    for key in ("norm_topk_prob", "attention_bias", "linear_conv_kernel_dim", "layer_types", "rope_parameters"):
        cfg.pop(key, None)
    c = Qwen3NextConfig.from_hf(cfg)
    assert (c.norm_topk_prob, c.attention_bias, c.linear_conv_kernel_dim) == (True, False, 4)
    assert c.layer_types == ["linear_attention"] * 3 + ["full_attention"] and c.rope.partial_rotary_factor == 0.25
