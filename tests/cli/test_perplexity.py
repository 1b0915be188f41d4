"""`cadenza perplexity` and `cadenza run --prompt-logprobs` as a user runs them (subprocesses), checked against
the same numbers computed directly from `LLM.score`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cadenza import LLM
from cadenza.cli.perplexity import windows
from tests.cli.test_cli import cli

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Once upon a time there was a small model.\n") * 2
CPU = ("--device", "cpu", "--dtype", "float32")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(TEXT)
    return path


def direct_perplexity(llm, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The usual strided perplexity, written out: windows `stride` apart; each counts the tokens after the last
    one an earlier window scored (and never its own first token)."""
    nll, count, scored_to, begin = 0.0, 0, 1, 0
    while True:
        end = min(begin + context, len(ids))
        window = ids[begin:end]
        logprobs = torch.log_softmax(llm.score(window), dim=-1)
        for pos in range(max(scored_to, begin + 1), end):
            nll -= logprobs[pos - begin - 1, ids[pos]].item()
            count += 1
        scored_to = max(scored_to, end)
        if end == len(ids):
            return math.exp(nll / count), count
        begin += stride


def test_windows_score_each_token_once():
    for n, context, stride in [(50, 16, 8), (50, 16, 16), (17, 16, 5), (3, 16, 8), (40, 7, 1)]:
        spans = windows(n, context, stride)
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert all(end - begin <= context and begin < first for begin, end, first in spans)
        if stride < context:
            assert scored == list(range(1, n))
        else:  # disjoint windows: their first tokens go unscored
            assert scored == [t for t in range(1, n) if t % stride != 0]


def test_perplexity_matches_a_direct_computation(mixtral_dir, text_file):
    path = str(mixtral_dir[0])
    r = cli(
        "perplexity", "--model", path, *CPU, "--file", str(text_file), "--context", "24", "--stride", "10", "--json"
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    llm = LLM(path, device="cpu", dtype="float32")
    ids = llm.tokenizer.encode(TEXT)
    want, count = direct_perplexity(llm, ids, 24, 10)
    assert got["tokens"] == count == len(ids) - 1
    assert got["perplexity"] == pytest.approx(want, rel=1e-5)
    assert got["context"] == 24 and got["stride"] == 10 and got["windows"] == len(windows(len(ids), 24, 10))
    assert got["perplexity_error"] > 0 and got["nll"] == pytest.approx(math.log(want), rel=1e-5)
    assert "kl_divergence" not in got and r.stderr.count("\r") == 0  # piped: no progress bar
    text = cli("perplexity", "--model", path, *CPU, "--file", str(text_file), "--context", "24", "--stride", "10")
    assert text.returncode == 0 and text.stdout.startswith(f"perplexity {want:.4f} ± ")


def test_kl_divergence_against_bf16_experts(mixtral_dir, text_file, tmp_path):
    path = str(mixtral_dir[0])
    flags = (*CPU, "--file", str(text_file), "--context", "32", "--stride", "16")
    r = cli("perplexity", "--model", path, *flags, "--experts", "int8", "--baseline", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["experts"] == "int8" and got["baseline"]["experts"] == "bf16"
    kl, agree = got["kl_divergence"], got["top1_agreement"]
    assert 0 < kl["mean"] < 0.05 and kl["stderr"] > 0 and kl["max"] >= kl["p99"] >= kl["median"] >= 0
    assert 50 < agree["percent"] <= 100
    assert got["baseline"]["perplexity"] != got["perplexity"]
    # the baseline saved once and read back: the same KL as --baseline; bf16 against itself: none
    saved = tmp_path / "base.bin"
    base = cli("perplexity", "--model", path, *flags, "--experts", "bf16", "--save-logits", str(saved), "--json")
    assert base.returncode == 0, base.stderr
    assert json.loads(base.stdout)["perplexity"] == pytest.approx(got["baseline"]["perplexity"], rel=1e-6)
    again = cli("perplexity", "--model", path, *flags, "--experts", "int8", "--kl-from", str(saved))
    assert again.returncode == 0, again.stderr
    assert f"KL divergence: mean {kl['mean']:.6f}" in again.stdout and "top-1 agreement: " in again.stdout
    same = json.loads(cli("perplexity", "--model", path, *flags, "--kl-from", str(saved), "--json").stdout)
    assert same["kl_divergence"]["max"] < 1e-6 and same["top1_agreement"]["percent"] == 100
    # another window size scores other tokens: refused
    other = cli("perplexity", "--model", path, *CPU, "--file", str(text_file), "--context", "16", "--kl-from",
                str(saved))  # fmt: skip
    assert other.returncode == 2 and "scored other tokens" in other.stderr


@pytest.mark.parametrize(
    "extra, words",
    [
        (("--file", "/nonexistent/text.txt"), "does not exist"),
        (("--file", "EMPTY"), "holds no text"),
        (("--file", "TEXT", "--context", "16", "--stride", "32"), "--stride 32 is longer than --context 16"),
        (("--file", "TEXT", "--kl-from", "/nonexistent.bin"), "do not exist"),
        (("--file", "TEXT", "--kl-from", "TEXT"), "not a file written by `cadenza perplexity --save-logits`"),
        (("--file", "TEXT", "--context", "100000"), "longer than the model's context"),
    ],
)
def test_clear_errors(mixtral_dir, text_file, tmp_path, extra, words):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    extra = [str(empty) if a == "EMPTY" else str(text_file) if a == "TEXT" else a for a in extra]
    r = cli("perplexity", "--model", str(mixtral_dir[0]), *CPU, *extra)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_run_prompt_logprobs(mixtral_dir):
    path = str(mixtral_dir[0])
    llm = LLM(path, device="cpu", dtype="float32")
    want = llm.prompt_logprobs("Hello world", top=2)
    r = cli("run", "--model", path, *CPU, "-p", "Hello world", "--prompt-logprobs", "2", "--max-tokens", "0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("id\ttoken\tlogprob\trank") and len(lines) == len(want.token_ids) + 2
    assert lines[2].split("\t")[2] == f"{want.logprobs[1]:.4f}" and lines[2].split("\t")[3] == str(want.ranks[1])
    assert lines[-1].startswith(f"sum {want.total:.4f} over {len(want.token_ids) - 1} tokens, perplexity ")
    r = cli("run", "--model", path, *CPU, "-p", "Hello world", "--prompt-logprobs", "1", "--max-tokens", "3",
            "--temperature", "0", "--ignore-eos", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got["token_ids"]) == 3 and got["prompt_logprobs"]["token_ids"] == want.token_ids
    assert got["prompt_logprobs"]["logprobs"][1:] == pytest.approx(want.logprobs[1:], abs=1e-5)
    assert got["prompt_logprobs"]["top_logprobs"][1][0][:2] == pytest.approx(list(want.top_logprobs[1][0]), abs=1e-5)
    r = cli("run", "--model", path, *CPU, "-p", "Hi", "--prompt-logprobs", "1", "--max-tokens", "2")
    assert r.returncode == 0 and "id\ttoken\tlogprob\trank" in r.stderr


def test_bench_perplexity_comparison_is_the_commands_math():
    """The bench's quantization report (cadenza.bench.quant_error) states what `--baseline` states, computed the same
    way: perplexities of both copies and the KL divergence per position, here against a direct computation."""
    import math

    import torch

    from cadenza.bench.quant_error import perplexity_comparison

    g = torch.Generator().manual_seed(0)
    want = torch.randn(9, 50, generator=g)
    got = want + 0.3 * torch.randn(9, 50, generator=g)
    prompt = torch.randint(0, 50, (9,), generator=g).tolist()
    out = perplexity_comparison(want, got, prompt)
    p, q = torch.softmax(want[:-1].double(), -1), torch.softmax(got[:-1].double(), -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    nll = -torch.log_softmax(got[:-1].double(), -1)[range(8), prompt[1:]]
    assert out["kl_divergence"]["mean"] == pytest.approx(kl.mean().item(), abs=1e-6)
    assert out["kl_divergence"]["max"] == pytest.approx(kl.max().item(), abs=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)
    same = perplexity_comparison(want, want, prompt)
    assert same["kl_divergence"]["max"] < 1e-9 and same["perplexity"] == same["baseline_perplexity"]
