"""The token embedding table in host memory on a GPU run (loader.embedding_on_host, host_memory.embedding_to_host):
planned off the GPU, read through its device mapping, the same scores and tokens as the table on the GPU."""

from __future__ import annotations

import pytest
import torch

from cadenza import LLM, SamplingParams
from cadenza.loader import HOST_EMBEDDING_ENV, build_meta, embedding_on_host, model_sizes, open_checkpoint
from cadenza.moe.offload.host_memory import embedding_to_host
from tests.conftest import edit_config, make_mixtral


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_mixtral(tmp_path_factory.mktemp("host-embedding"), num_local_experts=8, num_hidden_layers=2)[0]


def test_the_plan_leaves_the_table_off_the_gpu(mixtral, monkeypatch):
    meta = build_meta(open_checkpoint(mixtral))
    table = meta.config.vocab_size * meta.config.hidden_size * 2  # bf16
    assert embedding_on_host(meta)
    on_gpu, on_host = model_sizes(meta, torch.bfloat16), model_sizes(meta, torch.bfloat16, host_embedding=True)
    assert on_gpu.always_bytes - on_host.always_bytes == table
    assert on_host.expert_bytes == on_gpu.expert_bytes and on_host.kv_bytes_per_token == on_gpu.kv_bytes_per_token
    monkeypatch.setenv(HOST_EMBEDDING_ENV, "0")
    assert not embedding_on_host(meta)


def test_a_table_that_is_the_lm_head_stays_on_the_gpu(tmp_path):
    path = make_mixtral(tmp_path, num_local_experts=4, num_hidden_layers=1)[0]
    edit_config(path, tie_word_embeddings=True)  # the LM head reads the whole table every token
    assert not embedding_on_host(build_meta(open_checkpoint(path)))


def test_without_a_mapping_the_table_moves_to_the_device_unchanged(mixtral):
    """Where the table cannot be page-locked and mapped (here: no CUDA), it goes to the device as it is, and the
    caller is told why (LLM warns that the GPU holds more than planned)."""
    llm = LLM(mixtral, device="cpu", dtype="float32")
    emb = llm.model.model.embed_tokens
    before = emb.weight.detach().clone()
    pinned, why = embedding_to_host(llm.model, torch.device("cpu"))
    assert pinned is None and "page-locked" in why
    assert torch.equal(emb.weight, before) and not hasattr(emb, "host_table")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
def test_cuda_table_in_host_memory_gives_the_same_scores_and_tokens(mixtral, monkeypatch):
    """CUDA graphs on, every expert resident (the same products either way): the table read through its mapping
    scores and decodes exactly as the table on the GPU (fp32), and the plan counts it off the GPU. (The other GPU
    tests run with the table on the host too, offloaded experts included: it is the default.)"""
    ids = list(range(3, 23))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    gpu_memory = "8GiB"
    runs = {}
    for host in ("1", "0"):
        monkeypatch.setenv(HOST_EMBEDDING_ENV, host)
        llm = LLM(mixtral, device="cuda", dtype="float32", gpu_memory=gpu_memory)
        emb = llm.model.model.embed_tokens
        assert emb.weight.device.type == "cuda"
        assert hasattr(emb, "host_table") == (host == "1")
        if host == "1":
            # (read by a kernel: a copy engine's transfer from a mapped pointer names the wrong direction)
            assert emb.host_table.device.type == "cpu" and torch.equal((emb.weight * 1).cpu(), emb.host_table)
        runs[host] = (llm.score(ids).cpu(), llm.generate(ids[:5], params).token_ids, llm.sizes.always_bytes)
        llm.close()
        del llm
    (s1, t1, a1), (s0, t0, a0) = runs["1"], runs["0"]
    assert torch.equal(s1, s0) and t1 == t0
    table = build_meta(open_checkpoint(mixtral)).model.embed_tokens.weight.numel() * 4
    assert a0 - a1 == table
