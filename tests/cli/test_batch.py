"""`cadenza batch` as a user runs it (real subprocesses), and the throughput API under it (`LLM.generate_iter`)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cadenza import LLM, SamplingParams
from tests.cli.test_cli import cli

MESSAGES = [{"role": "user", "content": "What is an expert?"}]
# mixed kinds; the per-line max_tokens make later lines finish first, so the output must be put back in order
LINES = [
    {"id": "first", "prompt": "Once upon a time there was a long prompt, longer than the others", "max_tokens": 9},
    {"messages": MESSAGES},
    {"prompt_token_ids": [5, 6, 7, 8, 9], "max_tokens": 2},
    {"id": 7, "prompt": "Hello", "max_tokens": 1, "metadata": {"source": "test"}},
    {"prompt": "The quick brown fox jumps over the lazy dog"},
]
FLAGS = ("--temperature", "0", "--ignore-eos", "--max-tokens", "6", "--dtype", "float32", "--device", "cpu",
         "--max-batch", "2", "--sort-window", "4")  # fmt: skip


def write_jsonl(path, objs, blank_after: int | None = None):
    lines = [json.dumps(o) for o in objs]
    if blank_after is not None:
        lines.insert(blank_after, "")  # a blank line: skipped, but it counts for the default ids (line numbers)
    path.write_text("\n".join(lines) + "\n")
    return path


def batch(model, prompts, out, *extra):
    return cli("batch", "--model", str(model), "--prompts", str(prompts), "--out", str(out), *FLAGS, *extra)


@pytest.fixture(scope="module")
def fresh(mixtral_dir, tmp_path_factory):
    """One full run of LINES (a blank line after the third): its folder, input, output text and process."""
    d = tmp_path_factory.mktemp("batch")
    prompts = write_jsonl(d / "prompts.jsonl", LINES, blank_after=3)
    r = batch(mixtral_dir[0], prompts, d / "results.jsonl", "--json")
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(dir=d, prompts=prompts, out=(d / "results.jsonl").read_text(), run=r)


def test_output_in_input_order_equal_to_single_runs(mixtral_dir, fresh):
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32")
    results = [json.loads(line) for line in fresh.out.splitlines()]
    assert [r["id"] for r in results] == ["first", 2, 3, 7, 6]  # ids kept; default: the line number
    for line, got in zip(LINES, results, strict=True):
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=line.get("max_tokens", 6))
        prompt = line.get("prompt") or line.get("prompt_token_ids") or llm.chat_prompt(line["messages"])
        want = llm.generate(prompt, params)
        assert got["token_ids"] == want.token_ids
        assert got["text"] == want.text
        assert got["finish_reason"] == "length"
        assert got["completion_tokens"] == len(want.token_ids)
        assert got["prompt_tokens"] == len(want.prompt_token_ids)
    assert results[3]["metadata"] == {"source": "test"}
    stats = json.loads(fresh.run.stdout)
    assert stats["prompts"] == stats["total"] == len(LINES) and stats["skipped"] == 0
    assert stats["generated_tokens"] == sum(r["completion_tokens"] for r in results)
    from cadenza.cli.batch import JOB_PREFILL_CHUNK

    assert (stats["max_batch"], stats["prefill_chunk"]) == (2, JOB_PREFILL_CHUNK) == (2, 4096)  # (the default's)


def test_auto_batch_is_planned_in_the_budget(mixtral_dir, fresh, tmp_path):
    """--max-batch auto: the throughput plan's batch for sequences of --max-context tokens in --gpu-memory (here the
    emulated GPU side); the results are the same as any batch's (greedy)."""
    out = tmp_path / "auto.jsonl"
    r = batch(mixtral_dir[0], fresh.prompts, out, "--max-batch", "auto", "--gpu-memory", "1GiB", "--max-context", "64")
    assert r.returncode == 0, r.stderr
    assert "--max-batch auto: " in r.stderr and " sequences of up to 64 tokens (KV cache " in r.stderr
    planned = int(r.stderr.split("--max-batch auto: ")[1].split()[0])
    assert 2 < planned <= len(LINES)  # the job's prompts bound it (one round holds them all)
    got = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
    assert got == [json.loads(line)["token_ids"] for line in fresh.out.splitlines()]
    cpu = batch(mixtral_dir[0], fresh.prompts, tmp_path / "cpu.jsonl", "--max-batch", "auto")
    assert cpu.returncode == 0 and "no GPU budget to plan a batch in; 16 sequences" in cpu.stderr
    bad = batch(mixtral_dir[0], fresh.prompts, tmp_path / "bad.jsonl", "--max-batch", "lots")
    assert bad.returncode == 2 and "give a whole number or auto" in bad.stderr


def test_prefill_chunk_sets_the_passes_and_keeps_the_results(mixtral_dir, fresh, tmp_path):
    """--prefill-chunk: passes of at most that many tokens (here fewer than the longest prompt's: it is prefilled
    over several passes, beside the others' decoding rows); greedy results as any pass size's. A bad value is
    refused before any work, naming the flag."""
    out = tmp_path / "small.jsonl"
    r = batch(mixtral_dir[0], fresh.prompts, out, "--prefill-chunk", "8", "--gpu-memory", "1GiB")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
    assert got == [json.loads(line)["token_ids"] for line in fresh.out.splitlines()]
    bad = batch(mixtral_dir[0], fresh.prompts, tmp_path / "bad.jsonl", "--prefill-chunk", "0")
    assert bad.returncode == 2 and "prefill_chunk=0 (--prefill-chunk) is not valid" in bad.stderr
    assert "(default 4096)" in bad.stderr and not (tmp_path / "bad.jsonl").exists()


def test_piped_stderr_has_the_summary_only(fresh):
    lines = fresh.run.stderr.strip().splitlines()
    assert len(lines) == 1, fresh.run.stderr
    assert lines[0].startswith("cadenza: batch: 5 prompts, ") and "tok/s" in lines[0]


def test_resume_runs_only_the_rest(mixtral_dir, fresh, tmp_path):
    out = tmp_path / "results.jsonl"
    # two results, then a line cut off in the middle of its write (a killed job): dropped, and run again
    done = fresh.out.splitlines(keepends=True)[:2]
    out.write_text("".join(done) + '{"id": 3, "te')
    r = batch(mixtral_dir[0], fresh.prompts, out, "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert (stats["skipped"], stats["prompts"]) == (2, 3)
    assert "3 prompts" in r.stderr.splitlines()[-1] and "2 done before" in r.stderr
    assert out.read_text() == fresh.out
    # complete: nothing left to run, nothing loaded
    again = batch(mixtral_dir[0], fresh.prompts, out, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["prompts"] == 0
    assert out.read_text() == fresh.out


def test_mismatched_out_is_refused_and_overwrite_replaces_it(mixtral_dir, fresh, tmp_path):
    out = tmp_path / "results.jsonl"
    other = '{"id": "someone else", "text": "x"}\n'
    out.write_text(other)
    r = batch(mixtral_dir[0], fresh.prompts, out)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert '"someone else"' in r.stderr and '"first"' in r.stderr
    assert "another --out" in r.stderr and "--overwrite" in r.stderr
    assert out.read_text() == other  # untouched
    r = batch(mixtral_dir[0], fresh.prompts, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert out.read_text() == fresh.out


def test_bad_lines_are_all_reported_before_any_work(mixtral_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "fine"}\n'
        "not json\n"
        '{"prompt": 3}\n'
        '{"id": "x"}\n'
        '{"prompt": "a", "max_tokens": "ten"}\n'
        '{"messages": [{"role": "user"}]}\n'
        '{"prompt": "b", "temprature": 0}\n'
    )
    out = tmp_path / "results.jsonl"
    r = batch(mixtral_dir[0], prompts, out)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "6 bad input lines" in r.stderr
    for n in range(2, 8):
        assert f"line {n}: " in r.stderr
    assert "line 1: " not in r.stderr
    assert "not JSON" in r.stderr and "no prompt" in r.stderr and "'temprature'" in r.stderr
    assert not out.exists()


def test_prompts_too_long_are_reported_with_their_lines(mixtral_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt_token_ids": [5] * 300}])
    r = batch(mixtral_dir[0], prompts, tmp_path / "out.jsonl", "--max-context", "64")
    assert r.returncode == 2
    assert "line 2: The prompt has 300 tokens" in r.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_generate_iter_and_throughput_mode_equal_single_runs(mixtral_dir):
    llm = LLM(mixtral_dir[0], device="cpu", dtype="float32")
    prompts = ["Hello world", "a", "The quick brown fox jumps over the lazy dog", [5, 6, 7, 8, 9, 10, 11], "x y"]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=2 + 3 * (i % 3)) for i in range(5)]
    alone = [llm.generate(p, sp).token_ids for p, sp in zip(prompts, params, strict=True)]
    got = {}
    for i, result in llm.generate_iter(iter(prompts), iter(params), max_batch=2, sort_window=3):
        assert i not in got
        got[i] = result.token_ids
    assert [got[i] for i in range(len(prompts))] == alone
    throughput = llm.generate(prompts, params, mode="throughput")
    assert [r.token_ids for r in throughput] == alone


def test_interrupted_job_leaves_whole_lines_in_order(tmp_path):
    """Results finishing out of order, then Ctrl-C: the file holds exactly the finished prefix, whole lines."""
    from cadenza import jobs

    requests = [jobs.JobRequest(n, n, "prompt_token_ids", [n]) for n in range(1, 6)]

    def generate_iter(prompts, params, max_batch, sort_window):
        list(prompts), list(params)
        for i in (1, 0, 3):  # 0 and 1 can be written; 3 waits for 2, which never comes
            yield i, SimpleNamespace(text=f"t{i}", token_ids=[i], finish_reason="stop", prompt_token_ids=[i])
        raise KeyboardInterrupt

    out = tmp_path / "results.jsonl"
    stats = jobs.JobStats(total=5)
    llm = SimpleNamespace(generate_iter=generate_iter)
    with pytest.raises(KeyboardInterrupt):
        jobs.run_job(llm, requests, out, SamplingParams(), 0, 2, 1, stats)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines(keepends=True)] == [1, 2]
    assert out.read_text().endswith("\n")
    assert stats.written == 2 and stats.prompts == 3
    assert jobs.resume_point(out, requests, overwrite=False) == 2
