"""MLA's latent cache (DeepSeek-V2/V3) as a slot cache: rows of different lengths decode together, beams reorder by
copying rows, and each gives the logits the row would get alone, on the absorbed and the decompressed path."""

from __future__ import annotations

import pytest
import torch

from cadenza.checkpoint import Checkpoint
from cadenza.loader import load_model
from tests.conftest import make_deepseek, prompt_ids
from tests.models.test_deepseek_v2 import set_absorb
from tests.test_batch_cache import alone, check_equal_starts_batch_prefill, check_reorder_copies_rows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_deepseek(tmp_path_factory.mktemp("deepseek-v3-cache"), 3)
    return load_model(Checkpoint(path), CPU, torch.float32)


@pytest.fixture(params=[None, True, False], ids=["auto", "absorbed", "decompressed"])
def absorb(request, model):
    set_absorb(model, request.param)
    yield request.param
    set_absorb(model, None)


@torch.inference_mode()
def test_rows_of_different_lengths_decode_together(model, absorb):
    prompts = [prompt_ids(3, seed=1), prompt_ids(9, seed=2), prompt_ids(6, seed=3)]
    extra = [prompt_ids(4, seed=10 + i) for i in range(3)]
    for slots in ([2, 0, 3], [1, 2, 3]):  # the gather path (rows out of order), then contiguous rows
        cache = model.new_cache(64, torch.float32, CPU, batch=4)
        for p, s in zip(prompts, slots, strict=True):
            model(torch.tensor([p]), cache, rows=[s])
        got = torch.stack([model(torch.tensor([[e[i]] for e in extra]), cache, rows=slots)[:, -1] for i in range(4)], 1)
        for i in range(3):
            assert cache.lengths[slots[i]] == len(prompts[i]) + 4
            torch.testing.assert_close(got[i], alone(model, prompts[i], extra[i]), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_equal_starts_batch_prefill(model, absorb):
    check_equal_starts_batch_prefill(model)


@torch.inference_mode()
def test_reorder_copies_rows(model, absorb):
    check_reorder_copies_rows(model)
