"""On two or more real CUDA GPUs (`pytest -m gpu` on a multi-GPU machine): layers split over the GPUs give the
logits one GPU gives, each GPU's peak allocated memory stays in its budget, and Triton's kernels run on the GPU
that holds their tensors. Skipped where fewer than two GPUs are visible (the CPU emulation of the same code is
tests/test_layer_split.py), except the split into two blocks on one GPU, which runs the split's CUDA side where a
single GPU is all a machine has."""

from __future__ import annotations

import pytest
import torch

from cadenza import LLM, SamplingParams
from tests.conftest import make_mixtral

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (--gpus 0,1)"
)
PROMPT = list(range(3, 43))
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_mixtral(tmp_path_factory.mktemp("gpu-split"), num_local_experts=8, num_hidden_layers=4)
    one = LLM(path, device="cuda:0", dtype="float32", gpu_memory="8GiB")
    out = path, one.score(PROMPT).cpu(), one.generate(PROMPT[:8], GREEDY).token_ids
    one.close()
    return out


def per_gpu_budget(path, residents: int, slots: int, devices=(0, 1)) -> int:
    probe = LLM(path, dtype="float32", devices=list(devices), gpu_memory="8GiB", offload_policy="cpu")
    shares = probe.orchestra.shares
    probe.close()
    most = max(s.placement.always_bytes + s.placement.kv_bytes + s.placement.workspace_bytes for s in shares)
    return most + (residents + slots) * shares[0].placement.expert_bytes


@two_gpus
@pytest.mark.parametrize("policy", ["cpu", "fetch", "auto"])
@pytest.mark.parametrize("experts", ["bf16", "int4"])
def test_two_gpus_equal_one(tiny, policy, experts):
    path = tiny[0]
    slots = 0 if policy == "cpu" else 2
    b = per_gpu_budget(path, 3, slots)
    kw = {} if experts == "bf16" else {"experts": "int4", "expert_cache": False}
    llm = LLM(path, dtype="float32", devices=[0, 1], gpu_memory=[b, b], offload_policy=policy, **kw)
    try:
        assert {p.device for p in llm.model.model.layers[0].parameters()} == {torch.device("cuda:0")}
        assert {p.device for p in llm.model.model.layers[-1].parameters()} == {torch.device("cuda:1")}
        assert_equals_one_gpu(llm, tiny, kw)
        graphs = llm.engine.graphs  # the decode steps replayed graph segments on both GPUs
        assert graphs.replays > 0 and all(
            {d.index for d, seg in step.segments if isinstance(seg, torch.cuda.CUDAGraph)} == {0, 1}
            for step in graphs.graphs.values()
        )
    finally:
        llm.close()


def assert_equals_one_gpu(llm, tiny, kw: dict) -> None:
    """The split's logits and greedy tokens are one GPU's (bf16 experts); with quantized experts (`kw`), its logits
    are those of one GPU with the same experts."""
    path, want_logits, want_tokens = tiny
    if not kw:
        assert (llm.score(PROMPT).cpu() - want_logits).abs().max().item() <= 1e-4
        assert llm.generate(PROMPT[:8], GREEDY).token_ids == want_tokens
        return
    one = LLM(path, device="cuda:0", dtype="float32", gpu_memory="8GiB", **kw)
    want = one.score(PROMPT).cpu()
    one.close()
    assert (llm.score(PROMPT).cpu() - want).abs().max().item() <= 1e-4


@two_gpus
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("experts", "policy"), [("bf16", "fetch"), ("int4", "fetch"), ("bf16", "cpu")])
def test_split_into_two_blocks_on_one_gpu_equals_no_split(tiny, monkeypatch, experts, policy):
    """Where one GPU is all there is: the split's CUDA side (two blocks, each with its own orchestra, slots, copy
    streams and events, the CPU worker shared, the hidden state handed from block to block, the decode step's graphs
    cut at the boundary with the hidden state copied between them) run with both blocks on cuda:0, as
    tests/test_layer_split.py runs it on two "cpu" devices. The same logits and tokens as no split; what crosses
    between two real GPUs stays for test_two_gpus_equal_one."""
    import cadenza.layer_split as layer_split

    path, _, want_tokens = tiny
    monkeypatch.setattr(layer_split, "parse_devices", lambda devices: [torch.device("cuda:0")] * 2)
    b = per_gpu_budget(path, 3, 0 if policy == "cpu" else 2)
    kw = {} if experts == "bf16" else {"experts": "int4", "expert_cache": False}
    llm = LLM(path, dtype="float32", devices=[0, 0], gpu_memory=[b, b], offload_policy=policy, **kw)
    try:
        graphs = llm.engine.graphs
        assert len(llm.orchestra.shares) == 2 and "one graph per GPU segment" in graphs.describe()
        assert_equals_one_gpu(llm, tiny, kw)
        outs = llm.generate([PROMPT[:8], PROMPT[3:20]], GREEDY)  # a batch of two through both blocks
        assert kw or outs[0].token_ids == want_tokens
        assert graphs.replays > 0
        for step in graphs.graphs.values():  # block 0, block 1 after the crossing, the LM head after the way back
            assert sum(isinstance(seg, torch.cuda.CUDAGraph) for _, seg in step.segments) >= 3
    finally:
        llm.close()
