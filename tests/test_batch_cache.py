"""The slot cache: rows of different lengths decode together, beams reorder by copying rows, and each of these
gives the logits the row would get alone."""

from __future__ import annotations

import pytest
import torch

from cadenza.checkpoint import Checkpoint
from cadenza.loader import load_model
from tests.conftest import make_mixtral, prompt_ids


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_mixtral(tmp_path_factory.mktemp("mixtral-sw"), sliding_window=5)
    return load_model(Checkpoint(path), torch.device("cpu"), torch.float32)


def alone(model, ids: list[int], extra: list[int]) -> torch.Tensor:
    """Logits of each token of `extra` after prefilling `ids`, one sequence, one token at a time."""
    cache = model.new_cache(64, torch.float32, torch.device("cpu"))
    model(torch.tensor([ids]), cache)
    return torch.stack([model(torch.tensor([[t]]), cache)[0, -1] for t in extra])


def test_rows_of_different_lengths_decode_together(model):
    prompts = [prompt_ids(3, seed=1), prompt_ids(9, seed=2), prompt_ids(6, seed=3)]
    extra = [prompt_ids(4, seed=10 + i) for i in range(3)]
    cache = model.new_cache(64, torch.float32, torch.device("cpu"), batch=4)
    slots = [2, 0, 3]  # not in order, not contiguous: the gather path
    for p, s in zip(prompts, slots, strict=True):
        model(torch.tensor([p]), cache, rows=[s])
    got = []
    for step in range(4):
        ids = torch.tensor([[e[step]] for e in extra])
        got.append(model(ids, cache, rows=slots)[:, -1])
    got = torch.stack(got, dim=1)  # [3, 4, V]
    assert cache.lengths == [9 + 4, 0, 3 + 4, 6 + 4]
    for i in range(3):
        torch.testing.assert_close(got[i], alone(model, prompts[i], extra[i]), atol=1e-5, rtol=1e-5)


def check_equal_starts_batch_prefill(model) -> None:
    """Two prompts of one length prefilled together into contiguous slots 1 and 2: each row's logits are the
    prompt's alone (also for MLA's cache: tests/models/test_mla_cache.py)."""
    prompts = [prompt_ids(7, seed=4), prompt_ids(7, seed=5)]
    cache = model.new_cache(64, torch.float32, torch.device("cpu"), batch=3)
    logits = model(torch.tensor(prompts), cache, rows=[1, 2])
    for i, p in enumerate(prompts):
        single = model(torch.tensor([p]), model.new_cache(64, torch.float32, torch.device("cpu")))
        torch.testing.assert_close(logits[i], single[0], atol=1e-5, rtol=1e-5)


def check_reorder_copies_rows(model) -> None:
    """A beam reorder copies one slot's history over another's: both rows then decode as that sequence alone."""
    a, b = prompt_ids(5, seed=6), prompt_ids(8, seed=7)
    cache = model.new_cache(64, torch.float32, torch.device("cpu"), batch=2)
    model(torch.tensor([a]), cache, rows=[0])
    model(torch.tensor([b]), cache, rows=[1])
    cache.reorder([0, 1], [1, 1])  # both rows now hold b's history
    assert cache.lengths == [8, 8]
    nxt = prompt_ids(1, seed=8)
    got = model(torch.tensor([nxt, nxt]), cache, rows=[0, 1])[:, -1]
    want = alone(model, b, nxt)[0]
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want, atol=1e-5, rtol=1e-5)


def test_contiguous_rows_and_equal_starts_batch_prefill(model):
    check_equal_starts_batch_prefill(model)


def test_reorder_copies_rows(model):
    check_reorder_copies_rows(model)
