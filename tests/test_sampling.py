"""The sampling layer against transformers' own logits processors and direct reference computations."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cadenza import CadenzaError, SamplingParams
from cadenza.sampling import Sampler, TokenChoice, batch_argmax

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -2.0, 1.5])


def frequencies(params: SamplingParams, logits: torch.Tensor = LOGITS, n: int = 4000) -> torch.Tensor:
    sampler = Sampler(params)
    counts = torch.zeros(logits.shape[0])
    for _ in range(n):
        counts[sampler(logits)] += 1
    return counts / n


def big_logits(vocab: int = 512, seed: int = 0, ties: bool = True, scale: float = 3.0) -> torch.Tensor:
    """Spread-out logits; with `ties`, a few exact ties so the tie rules of top_k and min_p are exercised too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(vocab, generator=g) * scale
    if ties:
        x[10] = x[11] = x[12] = x.max() + 0.5  # a three-way tie at the top
        x[20] = x[21] = 0.0
    return x


def hf(processors, logits: torch.Tensor, history: list[int] | None = None) -> torch.Tensor:
    """Runs transformers' processors in order on one row of logits."""
    ids = torch.tensor([history or [0]], dtype=torch.long)
    scores = logits.float().clone().unsqueeze(0)
    for proc in processors:
        scores = proc(ids, scores)
    return scores[0]


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same removed (-inf) positions and equal finite values."""
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert finite.any()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-6, atol=1e-6)


def force(sampler: Sampler, token: int, vocab: int) -> None:
    """Makes the sampler pick `token` (all other logits hopeless), so tests can build a history."""
    logits = torch.full((vocab,), -1e4)
    logits[token] = 0.0
    assert sampler(logits) == token


# -- greedy and sampled distributions ------------------------------------------------------------------------------


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0))(LOGITS) == 5
    x = big_logits()
    assert Sampler(SamplingParams(temperature=0, top_k=3, top_p=0.1, min_p=0.5))(x) == int(torch.argmax(x))


def test_greedy_takes_bf16_and_batch_of_one():
    assert Sampler(SamplingParams(temperature=0))(LOGITS.to(torch.bfloat16)) == 5
    assert Sampler(SamplingParams(temperature=0))(LOGITS.unsqueeze(0)) == 5
    with pytest.raises(ValueError, match="shape"):
        Sampler(SamplingParams(temperature=0))(torch.zeros(2, 8))


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


def test_min_p_distribution():
    probs = torch.softmax(LOGITS / 0.8, -1)
    keep = probs >= 0.2 * probs.max()
    want = torch.where(keep, probs, torch.zeros_like(probs))
    want /= want.sum()
    freq = frequencies(SamplingParams(temperature=0.8, min_p=0.2, seed=3))
    assert set(torch.nonzero(freq).flatten().tolist()) <= set(torch.nonzero(keep).flatten().tolist())
    assert (freq - want).abs().max() < 0.03


def test_sampling_follows_processed_logits():
    """The draw comes from softmax(process(logits)), penalties included (one draw per seeded sequence)."""
    params = SamplingParams(temperature=1.2, top_k=6, min_p=0.05, repetition_penalty=2.0)
    want = torch.softmax(Sampler(params, prompt_ids=[5, 0]).process(LOGITS), -1)
    counts = torch.zeros(8)
    for seed in range(4000):
        counts[Sampler(params.replace(seed=seed), prompt_ids=[5, 0])(LOGITS)] += 1
    assert (counts / 4000 - want).abs().max() < 0.03


def test_same_seed_same_tokens():
    a = Sampler(SamplingParams(temperature=1.0, seed=7))
    b = Sampler(SamplingParams(temperature=1.0, seed=7))
    assert [a(LOGITS) for _ in range(50)] == [b(LOGITS) for _ in range(50)]


def test_seed_is_per_sequence():
    """A seeded sequence gives the same tokens whether or not other sequences sample in between."""
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    alone = Sampler(params)
    solo = [alone(LOGITS) for _ in range(40)]
    mixed, other = Sampler(params), Sampler(SamplingParams(temperature=1.0))
    interleaved = []
    for _ in range(40):
        other(LOGITS)
        torch.rand(3)  # the global generator moving must not matter either
        interleaved.append(mixed(LOGITS))
    assert interleaved == solo
    different = Sampler(params.replace(seed=12))
    assert [different(LOGITS) for _ in range(40)] != solo


# -- each processor against transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_transformers(temperature):
    x = big_logits()
    got = Sampler(SamplingParams(temperature=temperature)).process(x)
    assert_same_logits(got, hf([TemperatureLogitsWarper(temperature)], x))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 50, 511, 512, 1000])
def test_top_k_matches_transformers(k):
    x = big_logits()
    got = Sampler(SamplingParams(top_k=k)).process(x)
    assert_same_logits(got, hf([TopKLogitsWarper(k)], x))


@pytest.mark.parametrize("vocab", [100, 512, 20000])
@pytest.mark.parametrize("top_p", [0.01, 0.1, 0.5, 0.9, 0.99, 1.0])
def test_top_p_matches_transformers(top_p, vocab):
    """Small vocabularies are ranked in one sort; large ones grow the ranked set until it decides the cut."""
    x = big_logits(vocab, ties=False, scale=0.5 if vocab > 1000 else 3.0)
    got = Sampler(SamplingParams(top_p=top_p)).process(x)
    assert_same_logits(got, hf([TopPLogitsWarper(top_p)], x))


@pytest.mark.parametrize("top_p, kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.76, 4), (1.0, 4)])
def test_top_p_exact_boundary(top_p, kept):
    """Four equal logits: each token is exactly 1/4, so top_p=0.75 must keep exactly three (mass reaches p).

    Which of the tied tokens stay is unspecified (as in transformers); how many is not.
    """
    x = torch.zeros(4)
    want = hf([TopPLogitsWarper(top_p)], x)
    got = Sampler(SamplingParams(top_p=top_p)).process(x)
    assert int(torch.isfinite(got).sum()) == int(torch.isfinite(want).sum()) == kept
    x = torch.tensor([0.0, -9.0, 0.0, 0.0, -9.0, 0.0])  # behind a top_k filter
    got = Sampler(SamplingParams(top_p=top_p, top_k=4)).process(x)
    assert int(torch.isfinite(got).sum()) == kept and torch.isinf(got[[1, 4]]).all()


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(min_p):
    x = big_logits()
    got = Sampler(SamplingParams(min_p=min_p)).process(x)
    assert_same_logits(got, hf([MinPLogitsWarper(min_p)], x))


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    x = big_logits()
    prompt = [3, 7, 7, 20, 11, 600]  # a repeat, a zero logit, a top token, an id beyond the vocabulary
    sampler = Sampler(SamplingParams(temperature=1.0, repetition_penalty=penalty), prompt_ids=prompt)
    for token in (40, 3, 41):
        force(sampler, token, x.shape[0])
    history = [t for t in prompt if t < x.shape[0]] + [40, 3, 41]  # older transformers fail on ids beyond V
    assert_same_logits(sampler.process(x), hf([RepetitionPenaltyLogitsProcessor(penalty)], x, history))


def test_repetition_penalty_reaches_greedy():
    x = torch.tensor([4.0, 3.9, -1.0])
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=1.2), prompt_ids=[0])
    assert sampler(x) == 1  # 4.0 / 1.2 < 3.9
    assert sampler(x) == 0  # now both seen: 3.33 > 3.25


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7, min_p=0.05, top_k=40, top_p=0.9, repetition_penalty=1.15),
        dict(temperature=1.3, top_k=8, top_p=0.5),
        dict(temperature=0.5, min_p=0.2, top_p=0.95, repetition_penalty=0.8),
        dict(temperature=2.0, top_k=100),
    ],
)
def test_combination_matches_transformers_in_order(kw):
    """Penalty, temperature, min_p, top_k, top_p, chained in this order, as vLLM orders them."""
    x = big_logits(vocab=1024, seed=5, ties=False)  # tie rules of top_p are unspecified: see above
    prompt = [1, 2, 3, 10, 500]
    sampler = Sampler(SamplingParams(**kw), prompt_ids=prompt)
    force(sampler, 77, x.shape[0])
    chain = []
    if kw.get("repetition_penalty", 1.0) != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    chain.append(TemperatureLogitsWarper(kw["temperature"]))
    if kw.get("min_p"):
        chain.append(MinPLogitsWarper(kw["min_p"]))
    if kw.get("top_k"):
        chain.append(TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p", 1.0) < 1.0:
        chain.append(TopPLogitsWarper(kw["top_p"]))
    assert_same_logits(sampler.process(x), hf(chain, x, prompt + [77]))


def test_process_has_no_side_effects():
    x = big_logits()
    before = x.clone()
    sampler = Sampler(SamplingParams(temperature=0.9, top_p=0.7, frequency_penalty=1.0), prompt_ids=[1])
    a = sampler.process(x)
    b = sampler.process(x)
    assert torch.equal(a, b) and torch.equal(x, before) and sampler.num_generated == 0


# -- presence and frequency penalties ------------------------------------------------------------------------------


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.7), (1.5, -0.4), (-2.0, 2.0)])
def test_presence_frequency_match_direct_computation(presence, frequency):
    x = big_logits(vocab=64)
    prompt = [2, 5, 9]  # the prompt does not count: OpenAI's penalties cover generated tokens only
    generated = [5, 30, 5, 5, 31, 30]
    sampler = Sampler(
        SamplingParams(temperature=1.0, presence_penalty=presence, frequency_penalty=frequency), prompt_ids=prompt
    )
    for token in generated:
        force(sampler, token, 64)
    counts = torch.zeros(64)
    for token in generated:
        counts[token] += 1
    want = x - presence * (counts > 0).float() - frequency * counts
    torch.testing.assert_close(sampler.process(x), want)


def test_all_penalties_together():
    """Repetition first (prompt + generated), then frequency and presence (generated only)."""
    x = big_logits(vocab=32)
    sampler = Sampler(
        SamplingParams(temperature=0.5, repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2),
        prompt_ids=[4, 8],
    )
    for token in (8, 9, 9):
        force(sampler, token, 32)
    want = x.clone()
    for t in (4, 8, 9):
        want[t] = want[t] / 1.4 if want[t] > 0 else want[t] * 1.4
    want[8] -= 0.3 + 0.2 * 1
    want[9] -= 0.3 + 0.2 * 2
    torch.testing.assert_close(sampler.process(x), want / 0.5)


def test_penalties_apply_to_greedy():
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=1.0))
    x = torch.tensor([5.0, 4.5, 4.2])
    assert [sampler(x) for _ in range(4)] == [0, 1, 2, 0]  # each pick costs its token 1.0


# -- log-probs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0, logprobs=True),
        dict(temperature=0.5, top_k=3, top_logprobs=5, seed=1),
        dict(temperature=1.0, repetition_penalty=1.5, presence_penalty=1.0, top_logprobs=20, seed=2),
    ],
)
def test_logprobs_are_raw_log_softmax(kw):
    x = big_logits(vocab=100)
    raw = torch.log_softmax(x, -1)
    sampler = Sampler(SamplingParams(**kw), prompt_ids=[int(torch.argmax(x))])
    for _ in range(5):
        choice = sampler.sample(x)
        assert isinstance(choice, TokenChoice)
        assert choice.logprob == pytest.approx(float(raw[choice.token_id]), abs=1e-6)
        n = SamplingParams(**kw).top_logprobs
        if not n:
            assert choice.top_logprobs is None
            continue
        assert len(choice.top_logprobs) == n
        values = [v for _, v in choice.top_logprobs]
        assert values == sorted(values, reverse=True)
        want = torch.topk(raw, n)
        assert values == pytest.approx(want.values.tolist(), abs=1e-6)
        for token, value in choice.top_logprobs:
            assert value == pytest.approx(float(raw[token]), abs=1e-6)
        # every token not listed is no more likely than the last listed one
        rest = torch.ones(100, dtype=torch.bool)
        rest[[t for t, _ in choice.top_logprobs]] = False
        assert float(raw[rest].max()) <= values[-1] + 1e-6


def test_no_logprobs_unless_asked():
    choice = Sampler(SamplingParams(temperature=0.8, seed=0)).sample(LOGITS)
    assert choice.logprob is None and choice.top_logprobs is None


# -- parameters ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature="1"), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(presence_penalty=-2.01), "presence_penalty"),
        (dict(frequency_penalty=3), "frequency_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2.0), "max_tokens"),
        (dict(seed=-3), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=2**64), "seed"),
        (dict(stop=""), "stop"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(stop=[f"s{i}" for i in range(17)]), "stop"),
        (dict(stop=[1]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids=7), "stop_token_ids"),
        (dict(ignore_eos="yes"), "ignore_eos"),
        (dict(logprobs=1), "logprobs"),
        (dict(top_logprobs=-1), "top_logprobs"),
        (dict(top_logprobs=21), "top_logprobs"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2.0), "num_beams"),
        (dict(length_penalty=float("nan")), "length_penalty"),
        (dict(early_stopping="always"), "early_stopping"),
        (dict(early_stopping=1), "early_stopping"),
    ],
)
def test_out_of_range_values_are_refused(kw, word):
    with pytest.raises(CadenzaError, match=f"Invalid sampling parameter: {word}="):
        SamplingParams(**kw)


def test_values_are_normalised():
    p = SamplingParams(top_k=-1, stop="###", top_logprobs=3, temperature=1, stop_token_ids=(4, 5))
    assert p.top_k == 0 and p.stop == ["###"] and p.logprobs is True
    assert isinstance(p.temperature, float) and p.stop_token_ids == [4, 5]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=[f"s{i}" for i in range(16)]).stop[-1] == "s15"
    for ok in (True, False, "never"):
        assert SamplingParams(early_stopping=ok).early_stopping == ok
    assert SamplingParams(presence_penalty=-2, frequency_penalty=2).frequency_penalty == 2.0
    # the historical positional order still holds
    old = SamplingParams(12, 0.5, 0.9, 40, 3, [2], True)
    fields = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos")
    assert [getattr(old, f) for f in fields] == [12, 0.5, 0.9, 40, 3, [2], True]


def test_replace_revalidates():
    p = SamplingParams(temperature=0.5, seed=1)
    q = p.replace(top_p=0.5)
    assert q.top_p == 0.5 and q.seed == 1 and p.top_p == 1.0
    with pytest.raises(CadenzaError, match="top_p"):
        p.replace(top_p=2.0)


def test_beam_search_rules():
    ok = SamplingParams(num_beams=4, temperature=0, length_penalty=-0.5, early_stopping="never", logprobs=True)
    assert ok.num_beams == 4
    with pytest.raises(CadenzaError, match="beam search is deterministic: set temperature=0"):
        SamplingParams(num_beams=2)
    for kw, word in [
        (dict(repetition_penalty=1.1), "repetition_penalty"),
        (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(frequency_penalty=-0.5), "frequency_penalty"),
        (dict(stop=["\n"]), "stop"),
    ]:
        with pytest.raises(CadenzaError, match=f"num_beams=3 with {word}"):
            SamplingParams(num_beams=3, temperature=0, **kw)


# -- on a GPU ------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_match_cpu():
    """Logits on the GPU are processed there (one full sort for top_p, no host sync) with the CPU's result."""
    x = big_logits(vocab=32000, ties=False, scale=1.0)
    kw = dict(temperature=0.8, min_p=0.01, top_k=5000, top_p=0.9, repetition_penalty=1.2, frequency_penalty=0.3)
    cpu, gpu = Sampler(SamplingParams(**kw), prompt_ids=[1, 2, 3]), Sampler(SamplingParams(**kw), prompt_ids=[1, 2, 3])
    for token in (7, 7, 9):
        force(cpu, token, 32000)
        force(gpu, token, 32000)  # CPU logits: the penalty state then moves to the GPU with the next call
    assert_same_logits(gpu.process(x.cuda()), cpu.process(x))
    assert Sampler(SamplingParams(temperature=0))(x.cuda().bfloat16()) == int(torch.argmax(x.bfloat16()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_distribution_and_logprobs():
    x = LOGITS.cuda()
    params = SamplingParams(temperature=0.9, top_k=5, top_logprobs=3, seed=5)
    sampler = Sampler(params)
    counts = torch.zeros(8)
    for _ in range(3000):
        choice = sampler.sample(x)
        counts[choice.token_id] += 1
    keep = torch.topk(LOGITS, 5).indices
    want = torch.zeros(8)
    want[keep] = torch.softmax(LOGITS[keep] / 0.9, -1)
    assert (counts / 3000 - want).abs().max() < 0.03
    raw = torch.log_softmax(LOGITS, -1)
    assert choice.logprob == pytest.approx(float(raw[choice.token_id]), abs=1e-5)
    assert [t for t, _ in choice.top_logprobs] == torch.topk(raw, 3).indices.tolist()
    # the same seed gives the same tokens on the GPU
    a, b = Sampler(params), Sampler(params)
    assert [a(x) for _ in range(30)] == [b(x) for _ in range(30)]


def test_batch_argmax_gives_each_plain_greedy_rows_own_choice():
    """A decode step's plain-greedy rows take their tokens from one argmax of the batch: the same token each row's
    own argmax gives (ties: the first index), rows with penalties or temperature left to their samplers."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    logits[1, 7] = logits[1, 30] = logits[1].max() + 1  # a tie: the first index wins, as torch.argmax of the row
    samplers = [Sampler(SamplingParams(temperature=0)) for _ in range(6)]
    samplers[2] = Sampler(SamplingParams(temperature=0, repetition_penalty=1.3), [4, 5])
    samplers[4] = Sampler(SamplingParams(temperature=0.8, seed=3))
    plain = [s.plain_greedy for s in samplers]
    assert plain == [True, True, False, True, False, True]
    best = batch_argmax(logits, plain)
    assert sorted(best) == [0, 1, 3, 5] and best[1] == 7
    for i, s in enumerate(samplers):
        alone = Sampler(s.params, [4, 5] if i == 2 else ())
        want = alone.sample(logits[i]).token_id
        assert s.sample(logits[i], best.get(i)).token_id == want
    assert batch_argmax(logits, [True] + [False] * 5) == {}  # one row: its own argmax is as cheap
    assert batch_argmax(logits, [True] * 6) == {i: int(torch.argmax(logits[i])) for i in range(6)}
