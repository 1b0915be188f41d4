"""The samplers against direct reference computations on fixed logits."""

from __future__ import annotations

import pytest
import torch

from cadenza import CadenzaError, SamplingParams
from cadenza.sampling import Sampler

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -2.0, 1.5])


def frequencies(params: SamplingParams, n: int = 4000) -> torch.Tensor:
    sampler = Sampler(params)
    counts = torch.zeros(LOGITS.shape[0])
    for _ in range(n):
        counts[sampler(LOGITS)] += 1
    return counts / n


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0))(LOGITS) == 5


def test_temperature_distribution():
    freq = frequencies(SamplingParams(temperature=0.7, seed=0))
    want = torch.softmax(LOGITS / 0.7, -1)
    assert (freq - want).abs().max() < 0.03


def test_top_k_keeps_only_k_best():
    freq = frequencies(SamplingParams(temperature=1.0, top_k=3, seed=1))
    keep = torch.tensor([0, 5, 7])
    want = torch.zeros_like(LOGITS)
    want[keep] = torch.softmax(LOGITS[keep], -1)
    assert set(torch.nonzero(freq).flatten().tolist()) <= set(keep.tolist())
    assert (freq - want).abs().max() < 0.03


def test_top_p_smallest_set_covering_p():
    probs = torch.softmax(LOGITS, -1)
    order = torch.argsort(probs, descending=True)
    # smallest prefix of the sorted tokens whose mass reaches 0.8
    cum = torch.cumsum(probs[order], 0)
    n = int((cum < 0.8).sum()) + 1
    keep = order[:n]
    freq = frequencies(SamplingParams(temperature=1.0, top_p=0.8, seed=2))
    want = torch.zeros_like(LOGITS)
    want[keep] = probs[keep] / probs[keep].sum()
    assert set(torch.nonzero(freq).flatten().tolist()) <= set(keep.tolist())
    assert (freq - want).abs().max() < 0.03


def test_same_seed_same_tokens():
    a = Sampler(SamplingParams(temperature=1.0, seed=7))
    b = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert [a(LOGITS) for _ in range(50)] == [b(LOGITS) for _ in range(50)]


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(seed=-3), "seed"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_out_of_range_values_are_refused(kw, word):
    with pytest.raises(CadenzaError, match=word):
        SamplingParams(**kw)
