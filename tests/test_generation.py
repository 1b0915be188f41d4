"""Generation as a user drives it: beam search equal to transformers' for every family, batched generation equal
to one prompt at a time, stop strings through the engine and in streaming, log-probs equal to the reference
model's, penalties equal to transformers', chat through the checkpoint's template."""

from __future__ import annotations

import shutil
from functools import partial

import pytest
import torch

from cadenza import LLM, CadenzaError, SamplingParams
from tests.conftest import VOCAB, budget_for, make_deepseek, make_mixtral, prompt_ids, reference_logits
from tests.models.test_dots1 import make_dots1
from tests.models.test_ernie4_5_moe import make_ernie
from tests.models.test_glm4_moe import make_glm4_moe
from tests.models.test_glm4_moe_lite import make_glm4_moe_lite
from tests.models.test_gpt_oss import make_gpt_oss
from tests.models.test_llama4 import make_llama4
from tests.models.test_minimax_m2 import make_minimax_m2
from tests.models.test_olmoe import make_olmoe
from tests.models.test_phimoe import longrope, make_phimoe
from tests.models.test_qwen2_moe import make_qwen2_moe
from tests.models.test_qwen3_5_moe import make_qwen3_5_moe
from tests.models.test_qwen3_moe import make_qwen3_moe
from tests.models.test_qwen3_next import make_qwen3_next
from tests.text.tokenizer_files import write_bpe_tokenizer

MAKERS = {
    "mixtral": make_mixtral,
    "qwen2_moe": make_qwen2_moe,
    "qwen3_moe": make_qwen3_moe,
    "olmoe": make_olmoe,
    # LongRoPE's switch past 32 positions: these sequences stay short (transformers 5 never switches tables)
    "phimoe": partial(make_phimoe, rope_parameters=longrope(orig=32)),
    "deepseek_v2": partial(make_deepseek, version=2),
    "deepseek_v3": partial(make_deepseek, version=3),
    "glm4_moe": make_glm4_moe,
    "gpt_oss": make_gpt_oss,
    "ernie4_5_moe": make_ernie,
    "llama4": make_llama4,
    "minimax_m2": make_minimax_m2,
    "glm4_moe_lite": make_glm4_moe_lite,
    "qwen3_next": make_qwen3_next,  # beams reorder the linear layers' states with the keys and values
    "qwen3_5_moe": make_qwen3_5_moe,
    "dots1": make_dots1,
}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def family(request, tmp_path_factory):
    path, hf = MAKERS[request.param](tmp_path_factory.mktemp(request.param))
    llm = LLM(path, device="cpu", dtype="float32")
    yield path, hf, llm
    llm.close()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path, hf = make_mixtral(tmp_path_factory.mktemp("mixtral-gen"))
    llm = LLM(path, device="cpu", dtype="float32")
    yield path, hf, llm
    llm.close()


def hf_beams(hf, ids, n, k, end_ids, **kw) -> list[int]:
    """transformers' best beam (generated part) for `ids`."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
            do_sample=False, num_beams=k, eos_token_id=sorted(end_ids), pad_token_id=sorted(end_ids)[0], **kw,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


def frequent_token(llm, ids) -> int:
    """A token the model's greedy continuation produces early: as an end id it makes beams finish early."""
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)).token_ids
    return out[3]


@pytest.mark.parametrize("k", [2, 4])
def test_beam_search_equals_transformers(family, k):
    _, hf, llm = family
    ids = prompt_ids(7, seed=3)
    end = frequent_token(llm, ids)
    want = hf_beams(hf, ids, 12, k, {1, end})
    got = llm.generate(ids, SamplingParams(temperature=0, max_tokens=12, num_beams=k, stop_token_ids=[end]))
    assert got.token_ids == want
    assert got.finish_reason == ("stop" if want[-1] in (1, end) else "length")


@pytest.mark.parametrize(
    "length_penalty, early_stopping", [(1.0, False), (0.5, True), (2.0, "never"), (-1.0, False), (0.0, "never")]
)
def test_beam_search_options_equal_transformers(mixtral, length_penalty, early_stopping):
    _, hf, llm = mixtral
    for seed in (4, 5):
        ids = prompt_ids(6, seed=seed)
        end = frequent_token(llm, ids)
        want = hf_beams(hf, ids, 10, 3, {1, end}, length_penalty=length_penalty, early_stopping=early_stopping)
        params = SamplingParams(
            temperature=0, max_tokens=10, num_beams=3, stop_token_ids=[end], length_penalty=length_penalty,
            early_stopping=early_stopping,
        )  # fmt: skip
        assert llm.generate(ids, params).token_ids == want


def test_beam_search_without_end_runs_to_max_tokens(mixtral):
    _, hf, llm = mixtral
    ids = prompt_ids(5, seed=6)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=9, do_sample=False, num_beams=2, pad_token_id=0)
    got = llm.generate(ids, SamplingParams(temperature=0, max_tokens=9, num_beams=2, ignore_eos=True))
    assert got.token_ids == want[0, len(ids) :].tolist()
    assert got.finish_reason == "length" and len(got.token_ids) == 9


def test_batched_equals_one_at_a_time(mixtral):
    _, _, llm = mixtral
    prompts = [prompt_ids(n, seed=10 + n) for n in (3, 11, 6, 1, 8)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 4, 12, 7, 1)]
    alone = [llm.generate(p, sp) for p, sp in zip(prompts, params, strict=True)]
    together = llm.generate(prompts, params)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in together] == ["length"] * 5
    assert [r.stats.prompt_tokens for r in together] == [3, 11, 6, 1, 8]


def test_batched_with_fewer_slots_than_prompts(mixtral):
    """Continuous batching: sequences join as others leave; results do not change."""
    _, _, llm = mixtral
    prompts = [prompt_ids(n, seed=20 + n) for n in (4, 9, 2, 7)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 8, 5, 2)]
    alone = [llm.generate(p, sp).token_ids for p, sp in zip(prompts, params, strict=True)]
    gens = llm.engine.generate_many(list(zip(prompts, params, strict=True)), slots=2)
    assert [g.token_ids for g in gens] == alone


def test_interleaved_prefill_keeps_other_streams_going(mixtral):
    """A long prompt admitted while another sequence decodes is prefilled 4 tokens a step (Batch's
    prefill_per_step, the server's --prefill-chunk): the running sequence gets a token at every step meanwhile, no
    step prefills more than 4 prompt tokens, and both results equal each run alone."""
    from cadenza.batch import Batch

    _, _, llm = mixtral
    short, long_ = prompt_ids(3, seed=40), prompt_ids(30, seed=41)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [llm.generate(p, params).token_ids for p in (short, long_)]
    batch = Batch(llm.engine, 2, prefill_per_step=4)
    first = batch.add(short, params)
    batch.step()  # the short prompt: prefilled (3 tokens) and its first token
    second = batch.add(long_, params)
    steps_until_first = 0
    while not second.gen.token_ids:
        out = batch.step()
        steps_until_first += 1
        assert any(seq is first for seq, _ in out)  # the running stream never waits a whole prefill
    assert steps_until_first == 30 // 4 + 1 and batch.max_prefill_step == 4
    while len(batch):
        batch.step()
    assert [first.gen.token_ids, second.gen.token_ids] == alone
    with pytest.raises(ValueError, match="prefill_per_step"):
        Batch(llm.engine, 1, prefill_per_step=0)


def test_seeded_sampling_is_the_same_batched_or_alone(mixtral):
    _, _, llm = mixtral
    prompts = [prompt_ids(5, seed=30), prompt_ids(9, seed=31)]
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, seed=s, ignore_eos=True) for s in (1, 2)]
    alone = [llm.generate(p, sp).token_ids for p, sp in zip(prompts, params, strict=True)]
    assert [r.token_ids for r in llm.generate(prompts, params)] == alone
    assert llm.generate(prompts[0], params[0]).token_ids == alone[0]  # same seed, same output


def test_batched_with_offloaded_experts_equals_alone(mixtral):
    path, _, _ = mixtral
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=budget_for(path, 2), offload_policy="auto")
    try:
        prompts = [prompt_ids(n, seed=40 + n) for n in (6, 2, 10)]
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        alone = [llm.generate(p, sp).token_ids for p in prompts]
        assert [r.token_ids for r in llm.generate(prompts, sp)] == alone
    finally:
        llm.close()


def test_logprobs_equal_log_softmax_of_reference(mixtral):
    _, hf, llm = mixtral
    ids = prompt_ids(6, seed=50)
    res = llm.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=3))
    ref = torch.log_softmax(reference_logits(hf, ids + res.token_ids), dim=-1)[len(ids) - 1 : -1]
    for i, tok in enumerate(res.token_ids):
        assert res.logprobs[i] == pytest.approx(float(ref[i, tok]), abs=1e-4)
        best = torch.topk(ref[i], 3)
        assert [t for t, _ in res.top_logprobs[i]] == best.indices.tolist()
        assert [lp for _, lp in res.top_logprobs[i]] == pytest.approx(best.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_equals_transformers(mixtral, penalty):
    _, hf, llm = mixtral
    ids = prompt_ids(8, seed=51)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(
            torch.tensor([ids]), max_new_tokens=16, do_sample=False, repetition_penalty=penalty, pad_token_id=0
        )[0, len(ids) :].tolist()
    params = SamplingParams(temperature=0, max_tokens=16, repetition_penalty=penalty, ignore_eos=True)
    assert llm.generate(ids, params).token_ids == want


def test_stop_strings_cut_the_text_in_results_and_streams(mixtral):
    _, _, llm = mixtral
    ids = prompt_ids(5, seed=52)
    free = llm.generate(ids, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    text = free.text
    # a stop string spanning a token boundary in the middle of the output
    pieces = list(llm.stream(ids, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)))
    assert "".join(pieces) == text
    cut = len(pieces[0]) + len(pieces[1]) - 1  # starts inside the second piece, ends in a later one
    stop = text[cut : cut + 3]
    assert len(stop) == 3 and text.find(stop) == cut
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop, "\x00never\x00"])
    res = llm.generate(ids, params)
    assert res.text == text[:cut] and res.finish_reason == "stop"
    streamed = list(llm.stream(ids, params))
    assert "".join(streamed) == text[:cut]
    assert all(stop not in "".join(streamed[: i + 1]) for i in range(len(streamed)))


def write_template(src, dst):
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return dst


def test_chat_renders_the_template(mixtral, tmp_path):
    path, _, _ = mixtral
    llm = LLM(write_template(path, tmp_path / "chat"), device="cpu", dtype="float32")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    rendered = "<|system|>Be brief.\n<|user|>Hi!\n<|assistant|>"
    assert llm.chat_prompt(messages) == llm.tokenizer.encode(rendered, add_special_tokens=False)
    assert llm.chat(messages, sp).token_ids == llm.generate(llm.chat_prompt(messages), sp).token_ids
    llm.close()


def test_chat_without_template_is_a_clear_error(mixtral, tmp_path):
    path, _, llm = mixtral
    with pytest.raises(CadenzaError, match="role"):
        llm.chat_prompt(["Hi"])
    with pytest.raises(CadenzaError, match="empty"):
        llm.chat_prompt([])
    bare = shutil.copytree(path, tmp_path / "bare")
    write_bpe_tokenizer(bare, vocab_size=VOCAB, chat_template=False)
    llm = LLM(bare, device="cpu", dtype="float32")
    with pytest.raises(CadenzaError, match="no chat template"):
        llm.chat([{"role": "user", "content": "Hi"}])
    llm.close()


def test_params_list_must_match_prompts(mixtral):
    _, _, llm = mixtral
    with pytest.raises(CadenzaError, match="2 prompts were given with 3 sampling params"):
        llm.generate([[5, 6], [7]], [SamplingParams()] * 3)
