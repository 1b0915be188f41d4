"""On two or more real CUDA GPUs (`pytest -m gpu` on a multi-GPU machine): layers split over the GPUs give the
logits one GPU gives, each GPU's peak allocated memory stays in its budget, and Triton's kernels run on the GPU
that holds their tensors. Skipped where fewer than two GPUs are visible (the CPU emulation of the same code is
tests/test_layer_split.py)."""

from __future__ import annotations

import pytest
import torch

from cadenza import LLM, SamplingParams
from tests.conftest import make_mixtral

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (--gpus 0,1)"
    ),
]
PROMPT = list(range(3, 43))
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_mixtral(tmp_path_factory.mktemp("gpu-split"), num_local_experts=8, num_hidden_layers=4)
    one = LLM(path, device="cuda:0", dtype="float32", gpu_memory="8GiB")
    out = path, one.score(PROMPT).cpu(), one.generate(PROMPT[:8], GREEDY).token_ids
    one.close()
    return out


def per_gpu_budget(path, residents: int, slots: int) -> int:
    probe = LLM(path, dtype="float32", devices=[0, 1], gpu_memory="8GiB", offload_policy="cpu")
    shares = probe.orchestra.shares
    probe.close()
    most = max(s.placement.always_bytes + s.placement.kv_bytes + s.placement.workspace_bytes for s in shares)
    return most + (residents + slots) * shares[0].placement.expert_bytes


@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
@pytest.mark.parametrize("experts", ["bf16", "int4"])
def test_two_gpus_equal_one(tiny, policy, experts):
    path, want_logits, want_tokens = tiny
    slots = 0 if policy == "cpu" else 2
    b = per_gpu_budget(path, 3, slots)
    kw = {} if experts == "bf16" else {"experts": "int4", "expert_cache": False}
    llm = LLM(path, dtype="float32", devices=[0, 1], gpu_memory=[b, b], offload_policy=policy, **kw)
    try:
        assert {p.device for p in llm.model.model.layers[0].parameters()} == {torch.device("cuda:0")}
        assert {p.device for p in llm.model.model.layers[-1].parameters()} == {torch.device("cuda:1")}
        if experts == "bf16":
            assert (llm.score(PROMPT).cpu() - want_logits).abs().max().item() <= 1e-4
            assert llm.generate(PROMPT[:8], GREEDY).token_ids == want_tokens
        else:  # quantized experts: the split equals one GPU with the same experts
            one = LLM(path, device="cuda:0", dtype="float32", gpu_memory="8GiB", **kw)
            want = one.score(PROMPT).cpu()
            one.close()
            assert (llm.score(PROMPT).cpu() - want).abs().max().item() <= 1e-4
    finally:
        llm.close()


def test_each_gpu_peak_under_its_budget(tiny):
    path = tiny[0]
    b = per_gpu_budget(path, 2, 2)
    torch.cuda.empty_cache()
    base = [torch.cuda.memory_allocated(i) for i in (0, 1)]
    for i in (0, 1):
        torch.cuda.reset_peak_memory_stats(i)
    llm = LLM(path, dtype="float32", devices=[0, 1], gpu_memory=[b, b], offload_policy="fetch")
    llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for i in (0, 1):
        peak = torch.cuda.max_memory_allocated(i) - base[i]
        assert peak <= b, f"GPU {i}: peak {peak} > budget {b}"
    llm.close()
