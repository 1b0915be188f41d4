"""What a new user met in their first hour (issue "the first hour of a real user"), each mended: a clear message that
names the problem and the fix, nothing silent, no traceback. Through the CLI as a user runs it (subprocesses: exit
code, stderr text) and through the Python API."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cadenza import LLM, CadenzaError, SamplingParams
from cadenza.engine import Generation
from cadenza.text import TokenText
from tests.conftest import edit_config, make_mixtral

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, stdin: str | None = None, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "cadenza", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def ok(*args, **kw) -> subprocess.CompletedProcess:
    r = cli(*args, **kw)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r


def refused(*args, words=()) -> str:
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("cadenza: error: "), r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    return r.stderr


@pytest.fixture
def ckpt(tmp_path, mixtral_dir):
    """A fresh copy of the tiny checkpoint, to break or edit."""
    return shutil.copytree(mixtral_dir[0], tmp_path / "ckpt")


GREEDY = ("--temperature", "0", "--ignore-eos", "--dtype", "float32")


# --- 1. a truncated .safetensors file -------------------------------------------------------------------------------


def _truncate(file: Path, by: int) -> tuple[int, int]:
    data = file.read_bytes()
    file.write_bytes(data[:-by])
    return len(data), len(data) - by


def test_truncated_file_is_refused_at_open_by_run_and_info(ckpt):
    expected, actual = _truncate(ckpt / "model.safetensors", 1000)
    words = ["model.safetensors", "truncated", f"{expected:,}", f"{actual:,}", "Download this file again"]
    with pytest.raises(CadenzaError) as e:
        LLM(ckpt, device="cpu")
    assert all(w in str(e.value) for w in words), e.value
    refused("run", "--model", str(ckpt), "--prompt", "hi", words=words)
    refused("info", "--model", str(ckpt), words=words)


def test_truncated_shard_is_named(tmp_path):
    path, _ = make_mixtral(tmp_path / "sharded", save_kw={"max_shard_size": "100KB"})
    victim = sorted(path.glob("model-*.safetensors"))[1]
    expected, actual = _truncate(victim, 1)
    refused("info", "--model", str(path), words=[victim.name, "truncated", f"{expected:,}", f"{actual:,}"])


def test_file_longer_than_its_header_is_refused(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes() + b"\0" * 10)
    refused("info", "--model", str(ckpt), words=["longer than its header says", "Download this file again"])


# --- 2. beam search with log-probs -----------------------------------------------------------------------------------


def test_beams_report_the_returned_beams_logprobs(mixtral_dir):
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32")
    ids = [1, 5, 9, 22]
    plain = llm.generate(ids, SamplingParams(temperature=0, num_beams=3, max_tokens=8))
    out = llm.generate(ids, SamplingParams(temperature=0, num_beams=3, max_tokens=8, top_logprobs=3))
    assert out.token_ids == plain.token_ids and len(out.logprobs) == len(out.token_ids)
    lsm = torch.log_softmax(llm.score(ids + out.token_ids), dim=-1)  # teacher-forced: the raw log-probs
    for i, (token, lp, top) in enumerate(zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True)):
        row = lsm[len(ids) - 1 + i]
        assert lp == pytest.approx(float(row[token]), abs=1e-4)
        best = torch.topk(row, 3)
        assert [t for t, _ in top] == best.indices.tolist()
        assert [a for _, a in top] == pytest.approx(best.values.tolist(), abs=1e-4)
    # length_penalty 1: the score is the mean log-prob of the returned beam
    assert out.cumulative_logprob == pytest.approx(sum(out.logprobs) / len(out.logprobs), abs=1e-4)


def test_beams_with_logprobs_in_the_cli(mixtral_dir):
    path = str(mixtral_dir[0])
    args = ("run", "--model", path, "--prompt", "Hello", "--max-tokens", "6", *GREEDY, "--num-beams", "2")
    text = ok(*args, "--logprobs", "2")
    lines = text.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("id\ttoken"))
    assert len(lines[start + 1 :]) == 6 and all(line.count("\t") == 3 for line in lines[start + 1 :])
    out = json.loads(ok(*args, "--logprobs", "2", "--json").stdout)
    assert len(out["logprobs"]) == len(out["token_ids"]) == len(out["tokens"]) == len(out["top_logprobs"])


# --- 3. --gpu-memory without a unit --------------------------------------------------------------------------------


def test_bare_number_budget_is_refused_with_the_fix(mixtral_dir):
    path = str(mixtral_dir[0])
    words = ["--gpu-memory '24'", "no unit", "24GiB", "24GB"]
    refused("run", "--model", path, "--prompt", "hi", "--gpu-memory", "24", words=words)
    refused("info", "--model", path, "--gpu-memory", "24", words=words)
    with pytest.raises(CadenzaError, match="no unit"):
        LLM(path, device="cpu", gpu_memory="24")


def test_zero_budget_still_means_nothing_on_the_gpu(mixtral_dir):
    path = str(mixtral_dir[0])
    r = ok("run", "--model", path, "--prompt", "hi", "--max-tokens", "3", *GREEDY, "--gpu-memory", "0",
           "--offload-policy", "cpu")  # fmt: skip
    assert "0/" in r.stderr  # the placement summary: no expert resident
    llm = LLM(path, device="cpu", dtype="float32", gpu_memory=0, offload_policy="cpu")  # an int is bytes
    assert llm.placement.resident_count == 0
    llm.close()


# --- 4. --placement without a GPU budget ------------------------------------------------------------------------------


def test_placement_without_a_gpu_side_says_so(mixtral_dir, tmp_path):
    path = str(mixtral_dir[0])
    pop = tmp_path / "pop.json"
    pop.write_text(json.dumps({"counts": [[1, 2, 3, 4]] * 2}))
    r = ok("run", "--model", path, "--prompt", "hi", "--max-tokens", "2", *GREEDY, "--placement", str(pop))
    assert "--placement" in r.stderr and "ignored" in r.stderr and "--gpu-memory" in r.stderr
    r = ok("info", "--model", path, "--placement", str(pop))
    assert "--placement" in r.stderr and "ignored without --gpu-memory" in r.stderr


# --- 5. context limits --------------------------------------------------------------------------------------------


def test_max_context_beyond_the_model_is_capped_with_a_notice(mixtral_dir):
    path = str(mixtral_dir[0])
    r = ok("run", "--model", path, "--prompt", "hi", "--max-tokens", "2", *GREEDY, "--max-context", "100000")
    assert "100000" in r.stderr and "model's context of 256 tokens" in r.stderr
    assert "max_position_embeddings" in r.stderr and "using 256" in r.stderr
    r = ok("info", "--model", path, "--gpu-memory", "300MiB", "--max-context", "100000")
    assert "model's context of 256 tokens" in r.stderr and "KV cache for 256" in r.stderr


def test_prompt_plus_max_tokens_beyond_the_context_is_said(mixtral_dir, caplog):
    path = str(mixtral_dir[0])
    prompt = list(range(3, 23))  # 20 tokens
    r = ok("run", "--model", path, "--prompt", "Hello world", "--max-tokens", "100", *GREEDY, "--max-context", "40",
           "--json")  # fmt: skip
    out = json.loads(r.stdout)
    n = out["stats"]["prompt_tokens"]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 40 - n
    assert f"the prompt has {n} tokens" in r.stderr and "up to 100 more" in r.stderr
    assert "context is 40 tokens" in r.stderr and f"at most {40 - n} will be generated" in r.stderr
    # the API says it too (a warning on the cadenza logger)
    llm = LLM(path, device="cpu", dtype="float32", max_context=30)
    with caplog.at_level(logging.WARNING, logger="cadenza"):
        llm.generate(prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert any("at most 10 will be generated" in m for m in caplog.messages)


def test_prompt_too_long_says_which_limit_applies(mixtral_dir, ckpt):
    path = str(mixtral_dir[0])
    long_prompt = "word " * 400  # far more than the model's 256 tokens
    words = ["context is 16 tokens", "set by --max-context", "Shorten the prompt", "up to the model's 256"]
    # --device cpu: these check the error paragraph, and --device auto adds its CPU notice above it
    refused("run", "--model", path, "--device", "cpu", "--max-context", "16", "--prompt", long_prompt, words=words)
    words = ["context is 256 tokens", "the model's context"]
    err = refused("run", "--model", path, "--device", "cpu", "--prompt", long_prompt, words=words)
    assert "config.json's max_position_embeddings" in err and "--max-context" not in err
    edit_config(ckpt, max_position_embeddings=10000)  # beyond cadenza's default of 8192
    llm = LLM(ckpt, device="cpu", dtype="float32")
    with pytest.raises(CadenzaError, match="cadenza's default of 8192") as e:
        llm.generate(list(range(3, 9000)), SamplingParams(max_tokens=1))
    assert "the model allows 10000" in str(e.value) and "raise --max-context" in str(e.value)


# --- 6. --stop escapes ------------------------------------------------------------------------------------------


def test_stop_escapes_in_the_cli(mixtral_dir):
    path = str(mixtral_dir[0])
    llm = LLM(path, device="cpu", dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    # "Hi" gives a newline, "a" a backslash, within 60 tokens of the tiny model's greedy text
    for prompt, typed, char in (("Hi", "\\n", "\n"), ("a", "\\\\", "\\")):
        free = llm.generate(prompt, greedy).text
        assert char in free
        r = ok("run", "--model", path, "--prompt", prompt, "--max-tokens", "60", *GREEDY, "--stop", typed, "--json")
        out = json.loads(r.stdout)
        assert out["text"] == free[: free.find(char)] and out["finish_reason"] == "stop"
    # the API takes text as given: a backslash and an n are two characters
    assert llm.generate("Hi", SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop=["\\n"])).text == (
        llm.generate("Hi", greedy).text
    )
    help_text = " ".join(ok("run", "--help").stdout.split())
    assert "\\n, \\t and \\\\ in it mean a newline, a tab and a backslash" in help_text


def test_unescape_rules():
    from cadenza.cli.flags import unescape

    assert unescape("\\n\\n") == "\n\n" and unescape("a\\tb") == "a\tb" and unescape("\\\\n") == "\\n"
    assert unescape("\\x") == "\\x" and unescape("\\") == "\\" and unescape("plain") == "plain"


# --- 7. token texts beside log-prob ids -------------------------------------------------------------------------


def test_logprobs_carry_token_texts(mixtral_dir):
    path = str(mixtral_dir[0])
    llm = LLM(path, device="cpu", dtype="float32")
    texts = TokenText(llm.tokenizer)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, top_logprobs=2))
    assert out.tokens == [texts.text(t) for t in out.token_ids]
    assert out.top_tokens == [[texts.text(t) for t, _ in row] for row in out.top_logprobs]
    r = ok("run", "--model", path, "--prompt", "Hello", "--max-tokens", "5", *GREEDY, "--logprobs", "2", "--json")
    d = json.loads(r.stdout)
    assert d["tokens"] == out.tokens
    assert d["top_logprobs"][0][0] == [out.top_logprobs[0][0][0], pytest.approx(out.top_logprobs[0][0][1]),
                                       out.top_tokens[0][0]]  # fmt: skip
    r = ok("run", "--model", path, "--prompt", "Hello", "--max-tokens", "5", *GREEDY, "--logprobs", "2")
    rows = r.stderr.split("id\ttoken\tlogprob", 1)[1].splitlines()[1:6]
    for row, token, text in zip(rows, out.token_ids, out.tokens, strict=True):
        assert row.startswith(f"{token}\t{json.dumps(text, ensure_ascii=False)}\t")
    # the server's responses use the same helper
    from cadenza.server import responses

    assert responses.TokenText is TokenText


# --- 8. chat: line editing, history, /stats after Ctrl-C -------------------------------------------------------------


def test_stream_stopped_early_keeps_its_decode_rate(mixtral_dir):
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32")
    gen = Generation([])
    steps = llm.stream_steps("Hello", SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), gen)
    for i, _ in enumerate(steps):
        if i == 5:
            break
    steps.close()
    assert gen.finish_reason == "abort" and gen.stats.generated_tokens == 6
    assert gen.stats.decode_s > 0 and gen.stats.decode_tok_s > 0


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals")
def test_chat_on_a_terminal_edits_lines_and_keeps_history(mixtral_dir, tmp_path):
    import pty
    import select
    import time

    pytest.importorskip("readline")
    cache = tmp_path / "cache"
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cadenza", "chat", "--model", str(mixtral_dir[0]), "--max-tokens", "4", *GREEDY],
        stdin=slave, stdout=slave, stderr=subprocess.PIPE, env={**os.environ, "CADENZA_CACHE": str(cache),
                                                                 "TERM": "xterm"},
    )  # fmt: skip
    os.close(slave)
    seen = b""

    def wait_for_prompts(n: int) -> None:
        nonlocal seen
        deadline = time.time() + 120
        while seen.count(b"> ") < n and time.time() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    return

    try:
        wait_for_prompts(1)
        os.write(master, b"Hello there\r")
        wait_for_prompts(2)
        os.write(master, b"\x1b[A\r")  # up arrow: the last line again
        wait_for_prompts(3)
        os.write(master, b"/quit\r")
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        proc.kill()
        os.close(master)
    screen = seen.decode(errors="replace")
    assert "^[[A" not in screen
    assert screen.count("> Hello there") == 2  # typed once, recalled once
    history = (cache / "chat_history").read_text().splitlines()
    assert "Hello there" in history and "/quit" in history


# --- 9. --help points only to files that exist -----------------------------------------------------------------


def test_help_names_only_files_that_exist():
    for command in ("", "run", "chat", "info", "profile", "serve", "bench"):
        text = ok(*([command] if command else []), "--help").stdout
        for name in re.findall(r"[\w./-]+\.md\b", text.replace("\n", " ")):
            assert (ROOT / name).exists(), f"`cadenza {command} --help` names {name}, which does not exist"
