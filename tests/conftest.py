"""Shared fixtures: tiny random checkpoints written by transformers itself (the real hub layout)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from tests.text.tokenizer_files import write_bpe_tokenizer

VOCAB = 320  # tokenizer vocab <= model vocab


def pytest_configure(config):
    # cost models, the demo model: never written into the user's home by tests (subprocesses inherit this)
    os.environ.setdefault("CADENZA_CACHE", tempfile.mkdtemp(prefix="cadenza-test-cache-"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the accelerator machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# what every tiny test checkpoint shares; a family's builder adds its own arguments and may override these
TINY_ARGS = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
)


def tiny_config(family: str, defaults: dict, overrides: dict):
    """transformers' `{family}Config` (family: "Mixtral", "Qwen3Moe", ...) from TINY_ARGS, then the family's
    `defaults`, then a test's `overrides`."""
    import transformers

    return getattr(transformers, f"{family}Config")(**{**TINY_ARGS, **defaults, **overrides})


def random_hf_model(config, seed: int = 0, vectors=None, model_class=None):
    """transformers' *ForCausalLM for `config` (fp32, eval; model_class where the name does not follow from the
    config's), seeded. Its matrices are widened from transformers' tiny init (std 0.02) to N(0, 0.2) so that routing
    and logits are not degenerate; vectors(name, p), where given, sets the 1-d parameters (norm weights, biases) in
    the same pass."""
    import transformers

    if model_class is None:
        model_class = getattr(transformers, type(config).__name__.replace("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif vectors is not None:
                vectors(name, p)
    return model


def random_biased_router_model(config, seed: int = 0):
    """random_hf_model with norm weights and biases around 1 (N(1, 0.1)) and each routing bias
    (`e_score_correction_bias`, a buffer in transformers) N(0, 0.5): large enough to change the experts chosen, so
    that a wrong norm or a bias used in the wrong place shows."""
    model = random_hf_model(config, seed, lambda _, p: p.normal_(1.0, 0.1))
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.5)
    return model


def tiny_mixtral_config(**overrides):
    return tiny_config("Mixtral", dict(num_local_experts=4), overrides)


def save_hf_model(model, path: Path, dtype: torch.dtype | None = None, **save_kw) -> Path:
    """save_pretrained + tokenizer files; returns the folder."""
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **save_kw)
    write_bpe_tokenizer(path, vocab_size=VOCAB)
    return path


def make_hf_model(path: Path, config, seed: int = 0, vectors=None, dtype: torch.dtype | None = None, model_class=None,
                  **save_kw):  # fmt: skip
    """random_hf_model(config, seed, vectors, model_class) saved to `path` (see save_hf_model); returns (folder, the
    model)."""
    model = random_hf_model(config, seed, vectors, model_class)
    return save_hf_model(model, path, dtype=dtype, **save_kw), model


def make_mixtral(path: Path, seed: int = 0, dtype: torch.dtype | None = None, save_kw: dict | None = None, **overrides):
    """A tiny random MixtralForCausalLM saved to `path`; returns (folder, the fp32 transformers model)."""
    return make_hf_model(path, tiny_mixtral_config(**overrides), seed, dtype=dtype, **(save_kw or {}))


def reference_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """transformers' float32 logits [len(ids), V] for one teacher-forced pass."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def max_logit_diff(path, hf_model, ids: list[int]) -> float:
    """The largest difference between cadenza's float32 logits for `ids` (the checkpoint at `path`, on the CPU) and
    transformers' (reference_logits)."""
    from cadenza import LLM

    return (LLM(path, device="cpu", dtype="float32").score(ids) - reference_logits(hf_model, ids)).abs().max().item()


def assert_score_matches(path, hf_model, n: int = 24, tol: float = 1e-4) -> None:
    """cadenza's float32 logits for n prompt tokens (the checkpoint at `path`, on the CPU) are [n, VOCAB] and within
    `tol` of transformers'."""
    from cadenza import LLM

    ids = prompt_ids(n)
    got = LLM(path, device="cpu", dtype="float32").score(ids)
    assert got.shape == (n, VOCAB)
    assert (got - reference_logits(hf_model, ids)).abs().max().item() <= tol


def cached_logits(llm, ids: list[int], prefill: int = 10, chunk: int = 6) -> torch.Tensor:
    """[len(ids), V] float32 logits of the CPU LLM `llm` computed the way generation does: a prefill, a second chunk
    attending to the cache (an explicit mask), then one token at a time."""
    model = llm.model
    cache = model.new_cache(64, torch.float32, torch.device("cpu"))
    pieces = [ids[:prefill], ids[prefill : prefill + chunk]] + [[t] for t in ids[prefill + chunk :]]
    with torch.inference_mode():
        return torch.cat([model(torch.tensor([p]), cache)[0] for p in pieces])


def assert_prefill_and_cached_decode_match(path, hf_model, n: int = 24, tol: float = 1e-4):
    """assert_score_matches, and the same logits through the cache (cached_logits: prefill, a chunk, then one token
    at a time); returns (the prompt ids, transformers' logits)."""
    from cadenza import LLM

    ids = prompt_ids(n)
    want = reference_logits(hf_model, ids)
    llm = LLM(path, device="cpu", dtype="float32")
    got = llm.score(ids)
    assert got.shape == (n, VOCAB)
    assert (got - want).abs().max().item() <= tol
    assert (cached_logits(llm, ids) - want).abs().max().item() <= tol
    return ids, want


def reference_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `ids`, exactly n tokens (end-of-sequence ignored)."""
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
            do_sample=False,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


def prompt_ids(n: int, seed: int = 1, vocab: int = VOCAB) -> list[int]:
    """Seeded random token ids clear of the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def budget_for(
    path, residents: int, slots: int = 2, device: str = "cpu", max_context: int | None = None, dtype="float32", **kw
) -> int:
    """A GPU budget (bytes) that leaves room for `residents` experts plus `slots` fetch slots (the auto and fetch
    policies reserve max(2, top_k) slots; the cpu policy none), on the emulated GPU side or a real one; `kw`
    (max_batch, experts, ...) as the LLM under test gets them, since they size the KV cache and the workspace."""
    from cadenza import LLM

    probe = LLM(path, device=device, dtype=dtype, gpu_memory="8GiB", max_context=max_context, **kw)
    p = probe.placement
    probe.close()
    return p.always_bytes + p.kv_bytes + p.workspace_bytes + (residents + slots) * p.expert_bytes


def write_two_shards(path: Path, main: dict, extra: dict) -> None:
    """Replaces the folder's model.safetensors by two shards, `main`'s tensors then `extra`'s, and their
    model.safetensors.index.json, as the hub's sharded checkpoints hold them."""
    from safetensors.torch import save_file

    (path / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": main, "model-00002-of-00002.safetensors": extra}
    for file, tensors in shards.items():
        save_file(tensors, path / file, metadata={"format": "pt"})
    weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    """One shared tiny Mixtral checkpoint folder (fp32) and its transformers model."""
    return make_mixtral(tmp_path_factory.mktemp("mixtral"))


def tiny_deepseek_config(version: int, **overrides):
    """A tiny DeepSeek-V2 / V3 config: MLA with a latent of 16, 8 routed experts (top-2) and a shared one, a dense
    first layer, 3 layers."""
    kw = dict(
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None if version == 2 else 24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
    )
    if version == 3:
        kw.update(n_group=4, topk_group=2)
    return tiny_config(f"DeepseekV{version}", kw, overrides)


def make_deepseek(path: Path, version: int = 2, seed: int = 0, **overrides):
    """A tiny random DeepseekV2ForCausalLM (version 2) or DeepseekV3ForCausalLM (3) saved to `path`; returns
    (folder, the fp32 transformers model)."""
    model = random_biased_router_model(tiny_deepseek_config(version, **overrides), seed)
    return save_hf_model(model, path), model


def offloaded_llm(path, policy: str, residents: int, device: str = "cpu", **kw):
    """A float32 LLM with `residents` experts resident under `policy`, on the emulated GPU side (device "cpu") or a
    real one: two fetch slots, none under the cpu policy, whose budget is "0" when it keeps none resident."""
    from cadenza import LLM

    slots = 0 if policy == "cpu" else 2
    gpu_memory = "0" if residents == 0 and policy == "cpu" else budget_for(path, residents, slots, device=device)
    return LLM(path, device=device, dtype="float32", gpu_memory=gpu_memory, offload_policy=policy, **kw)


def assert_hybrid_prefetch_in_bf16(path, prompt: list[int], residents: int, slots: int, new_tokens: int = 4) -> None:
    """In bf16 under the fetch policy, `residents` experts resident and `slots` fetch slots: the logits for `prompt`
    equal the all-resident bf16 model's bit for bit, and generating `new_tokens` from prompt[:6] issues or guesses
    some prefetch."""
    from cadenza import LLM, SamplingParams

    ref = LLM(path, device="cpu", dtype="bfloat16", gpu_memory="8GiB")
    want, p = ref.score(prompt), ref.placement
    ref.close()
    budget = p.always_bytes + p.kv_bytes + p.workspace_bytes + (residents + slots) * p.expert_bytes
    llm = LLM(path, device="cpu", dtype="bfloat16", gpu_memory=budget, offload_policy="fetch")
    try:
        assert llm.placement.resident_count == residents
        assert torch.equal(llm.score(prompt), want)
        llm.generate(prompt[:6], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
        assert llm.orchestra.counters.prefetch_issued + llm.orchestra.counters.prefetch_guessed > 0
    finally:
        llm.close()


def synced_layers(orchestra) -> int:
    """The MoE layers that synchronise once per decode step: all but those all resident while the decode kernels
    run (they need none)."""
    return sum(1 for layer in orchestra.layers if not (layer.all_resident and orchestra.decode_kernels))


def cuda_bf16_scores(path, prompt: list[int], experts: int):
    """bf16 logits for `prompt` on the GPU: (all `experts` resident, every expert on the host under the cpu
    policy)."""
    from cadenza import LLM

    full = LLM(path, device="cuda", dtype="bfloat16", gpu_memory="8GiB")
    assert full.placement.resident_count == experts
    resident = full.score(prompt)
    full.close()
    llm = LLM(path, device="cuda", dtype="bfloat16", gpu_memory="0", offload_policy="cpu")
    offloaded = llm.score(prompt)
    llm.close()
    return resident, offloaded


def assert_bf16_dtypes_as_transformers(path, rename: tuple[str, str] | None = None, skip: tuple[str, ...] = ()):
    """In bf16 every non-expert tensor has the dtype transformers' from_pretrained gives it (rename: (old, new) in
    transformers' names where the checkpoint's differ, e.g. MiniMax-M2's mlp -> block_sparse_moe; skip: prefixes of
    transformers' tensors cadenza does not build, e.g. a vision tower) and the logits are finite; returns the LLM."""
    import transformers

    from cadenza import LLM

    arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    hf = getattr(transformers, arch).from_pretrained(path, dtype=torch.bfloat16)
    fix = (lambda n: n.replace(*rename)) if rename else (lambda n: n)
    want = {fix(n): t.dtype for n, t in hf.state_dict().items() if ".experts." not in n and not n.startswith(skip)}
    llm = LLM(path, device="cpu", dtype="bfloat16")
    got = {n: t.dtype for n, t in llm.model.state_dict().items() if ".experts." not in n}
    assert got == want
    assert torch.isfinite(llm.score(prompt_ids(70))).all()
    # the planner's always-on bytes are what these tensors take (float32 routers at 4 bytes; tied ones once)
    from cadenza.loader import moe_layers

    experts = {id(p) for m in moe_layers(llm.model) for p in m.parameters()}
    kept = {id(p): p.numel() * p.element_size() for p in llm.model.parameters() if id(p) not in experts}
    assert sum(kept.values()) == llm.sizes.always_bytes
    return llm


def single_device_run(path, prompt: list[int], new_tokens: int):
    """The all-resident CPU run the offloaded paths must equal: (its logits for `prompt`, its `new_tokens` greedy
    tokens from prompt[:6])."""
    from cadenza import LLM, SamplingParams

    ref = LLM(path, device="cpu", dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    return ref.score(prompt), ref.generate(prompt[:6], greedy).token_ids


def assert_config_refused(path: Path, match: str, **changes) -> None:
    """With config.json's `changes` (edit_config, in place), loading the checkpoint at `path` fails with a
    CadenzaError matching `match`."""
    from cadenza import LLM, CadenzaError

    edit_config(path, **changes)
    with pytest.raises(CadenzaError, match=match):
        LLM(path, device="cpu", dtype="float32")


def assert_info_counts(path, hf, architecture: str, model_type: str, layers: tuple, heads: tuple, tied=None) -> None:
    """`cadenza info` on the checkpoint at `path` counts what transformers' model `hf` holds. layers: (layers, MoE
    layers, experts per layer, experts per token); heads: (attention heads, KV heads, head dim); tied: (folder,
    model) of the family with tied embeddings, which count once, as transformers' parameters() does."""
    from cadenza.cli.info import describe

    info = describe(path)
    experts = sum(
        layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel() for layer in hf.model.layers
    )
    assert info["architecture"] == architecture and info["model_type"] == model_type
    assert (info["layers"], info["moe_layers"], info["experts_per_layer"], info["experts_per_token"]) == layers
    assert (info["attention_heads"], info["kv_heads"], info["head_dim"]) == heads
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())
    assert info["expert_parameters"] == experts
    if tied is not None:
        assert describe(tied[0])["parameters"] == sum(p.numel() for p in tied[1].parameters())


def assert_hybrid_matches(path, policy, residents, slots, prompt, new_tokens, pairs=None, side=None, tol=1e-4,
                          want=None):  # fmt: skip
    """Some experts off the (emulated) GPU under `policy`, `residents` of them resident (`slots` fetch slots when
    the policy fetches): the same logits for `prompt` and the same `new_tokens` greedy tokens from prompt[:6] as the
    all-resident model (`want`: its single_device_run, made here when not given). pairs: the (token, expert) pairs
    the generation must count; side: "policy" (work went to the policy's own side: cpu or fetched), "either" (to
    the CPU or fetched), None (not checked)."""
    from cadenza import LLM, SamplingParams

    want_logits, want_tokens = single_device_run(path, prompt, new_tokens) if want is None else want
    budget = budget_for(path, residents, 0 if policy == "cpu" else slots)
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=budget, offload_policy=policy)
    try:
        assert llm.placement.resident_count == residents
        assert (llm.score(prompt) - want_logits).abs().max().item() <= tol
        out = llm.generate(prompt[:6], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
        assert out.token_ids == want_tokens
        work = out.stats.expert_work
        if pairs is not None:
            assert sum(work.values()) == pairs
        if side == "policy":
            assert work["cpu" if policy == "cpu" else "fetched"] > 0
        elif side == "either":
            assert work["cpu"] + work["fetched"] > 0
    finally:
        llm.close()
