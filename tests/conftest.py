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


def tiny_mixtral_config(**overrides):
    from transformers import MixtralConfig

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
    )
    kw.update(overrides)
    return MixtralConfig(**kw)


def save_hf_model(model, path: Path, dtype: torch.dtype | None = None, **save_kw) -> Path:
    """save_pretrained + tokenizer files; returns the folder."""
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **save_kw)
    write_bpe_tokenizer(path, vocab_size=VOCAB)
    return path


def make_mixtral(path: Path, seed: int = 0, dtype: torch.dtype | None = None, save_kw: dict | None = None, **overrides):
    """A tiny random MixtralForCausalLM saved to `path`; returns (folder, the fp32 transformers model)."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_mixtral_config(**overrides)).eval()
    # transformers' init is tiny (std 0.02); widen it so routing and logits are not degenerate
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    save_hf_model(model, path, dtype=dtype, **(save_kw or {}))
    return path, model


def reference_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """transformers' float32 logits [len(ids), V] for one teacher-forced pass."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


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


def budget_for(path, residents: int, slots: int = 2, device: str = "cpu", max_context: int | None = None) -> int:
    """A GPU budget (bytes) that leaves room for `residents` experts plus `slots` fetch slots (the auto and fetch
    policies reserve max(2, top_k) slots; the cpu policy none), on the emulated GPU side or a real one."""
    from cadenza import LLM

    probe = LLM(path, device=device, dtype="float32", gpu_memory="8GiB", max_context=max_context)
    p = probe.placement
    probe.close()
    return p.always_bytes + p.kv_bytes + p.workspace_bytes + (residents + slots) * p.expert_bytes


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


def tiny_deepseek_kwargs(version: int, **overrides) -> dict:
    """A tiny DeepSeek-V2 / V3 config's arguments: MLA with a latent of 16, 8 routed experts (top-2) and a shared
    one, a dense first layer, 3 layers."""
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None if version == 2 else 24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
    )
    if version == 3:
        kw.update(n_group=4, topk_group=2)
    kw.update(overrides)
    return kw


def make_deepseek(path: Path, version: int = 2, seed: int = 0, **overrides):
    """A tiny random DeepseekV2ForCausalLM (version 2) or DeepseekV3ForCausalLM (3) saved to `path`; returns
    (folder, the fp32 transformers model)."""
    import transformers

    name = f"DeepseekV{version}"
    config = getattr(transformers, f"{name}Config")(**tiny_deepseek_kwargs(version, **overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    # widen transformers' tiny init so routing is not degenerate; norm weights away from 1 and a routing bias
    # large enough to change V3's choices, so that a wrong norm or a bias used in the wrong place shows
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(1.0, 0.1)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.5)
    save_hf_model(model, path)
    return path, model


def assert_hybrid_matches(path, policy, residents, slots, prompt, want_logits, want_tokens, new_tokens,
                          pairs=None, side=None, tol=1e-4):  # fmt: skip
    """Some experts off the (emulated) GPU under `policy`, `residents` of them resident (`slots` fetch slots when
    the policy fetches): the same logits for `prompt` and the same greedy tokens from prompt[:6] as the all-resident
    model. pairs: the (token, expert) pairs the generation must count; side: "policy" (work went to the policy's
    own side: cpu or fetched), "either" (to the CPU or fetched), None (not checked)."""
    from cadenza import LLM, SamplingParams

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
