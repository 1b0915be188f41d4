"""`cadenza run` and `cadenza info` as a user runs them: real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from cadenza import LLM, SamplingParams


def cli(*args, stdin: str | None = None, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "cadenza", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_run_streams_text_and_stats(mixtral_dir):
    path = str(mixtral_dir[0])
    r = cli("run", "--model", path, "--prompt", "Hello world", "--max-tokens", "12", "--temperature", "0",
            "--ignore-eos", "--dtype", "float32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    want = LLM(path, device="cpu", dtype="float32").generate(
        "Hello world", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    assert r.stdout == want.text + "\n"
    assert "decode" in r.stderr and "tok/s" in r.stderr and "[length]" in r.stderr


def test_run_json(mixtral_dir):
    path = str(mixtral_dir[0])
    r = cli("run", "--model", path, "--prompt", "Hello", "--max-tokens", "5", "--seed", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "token_ids", "finish_reason", "stats"}
    assert out["finish_reason"] in ("stop", "length")
    assert 1 <= len(out["token_ids"]) <= 5
    assert out["stats"]["generated_tokens"] == len(out["token_ids"])
    assert out["stats"]["prompt_tokens"] > 0
    # same seed, same output
    again = json.loads(cli("run", "--model", path, "--prompt", "Hello", "--max-tokens", "5", "--seed", "3",
                           "--json").stdout)  # fmt: skip
    assert again["token_ids"] == out["token_ids"]


def test_run_prompt_from_stdin(mixtral_dir):
    path = str(mixtral_dir[0])
    a = cli("run", "--model", path, "--prompt", "-", "--max-tokens", "6", "--temperature", "0", "--json",
            stdin="Bonjour")  # fmt: skip
    b = cli("run", "--model", path, "--prompt", "Bonjour", "--max-tokens", "6", "--temperature", "0", "--json")
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_run_demo_model_without_model_flag(tmp_path):
    env = {"CADENZA_CACHE": str(tmp_path / "cache")}
    r = cli("run", "--max-tokens", "8", "--temperature", "0", "--ignore-eos", env=env)
    assert r.returncode == 0, r.stderr
    assert "demo" in r.stderr and "trained on a few paragraphs" in r.stderr
    assert "building the demo model (first use" in r.stderr
    assert "[length]" in r.stderr
    assert (tmp_path / "cache" / "demo-mixtral-v2" / "config.json").exists()
    # the second run reuses the folder and gives the same greedy text
    again = cli("run", "--max-tokens", "8", "--temperature", "0", "--ignore-eos", env=env)
    assert again.stdout == r.stdout
    assert "building the demo model" not in again.stderr


def test_info(mixtral_dir):
    path = str(mixtral_dir[0])
    r = cli("info", "--model", path, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    hf = mixtral_dir[1]
    assert d["architecture"] == "MixtralForCausalLM"
    assert d["layers"] == hf.config.num_hidden_layers
    assert d["experts_per_layer"] == hf.config.num_local_experts
    assert d["parameters"] == sum(p.numel() for p in hf.parameters())
    expert = sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    assert d["expert_parameters"] == expert
    assert d["bytes_by_dtype"] == {"F32": 4 * d["parameters"]}
    text = cli("info", "--model", path)
    assert text.returncode == 0 and "experts" in text.stdout and "non-expert" in text.stdout


def test_console_script_installed():
    exe = shutil.which("cadenza")
    assert exe is not None, "the `cadenza` command is not on PATH: install the package (see README)"
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("cadenza ")


def test_info_placement_and_cost_model(mixtral_dir, tmp_path):
    from cadenza.moe.offload.costmodel import CostModel, save_cached

    cache = tmp_path / "cache"
    key = "Test CPU | Test GPU | 15 threads | expert 64x96 torch.float32 | torch x"
    points = ((1, 1e-4), (16, 1.2e-4), (128, 2e-4))
    save_cached(cache, CostModel(key, 73728, (1e-4, 1e-6), (2e-5, 1e-7), 50.0, cpu_points=points))
    stale = "Test CPU | Test GPU | 15 threads | expert 64x96 torch.float32 | old"  # a line fit, no points
    save_cached(cache, CostModel(stale, 73728, (1e-4, 1e-6), (2e-5, 1e-7), 50.0))
    path = str(mixtral_dir[0])
    r = cli("info", "--model", path, "--gpu-memory", "300MiB", "--json", env={"CADENZA_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["placement"]["budget_bytes"] == 300 * 2**20
    assert d["placement"]["resident_count"] == d["placement"]["total_experts"]  # the tiny model fits
    assert list(d["cost_models"]) == [key, stale]
    text = cli("info", "--model", path, "--gpu-memory", "300MiB", env={"CADENZA_CACHE": str(cache)}).stdout
    assert "placement" in text and "fetch beats CPU" in text and "0.10 ms at 1 token (0.12 at 16" in text
    assert "measured by an older cadenza" in text
    small = cli("info", "--model", path, "--gpu-memory", "1MiB")
    assert small.returncode == 2 and "too small" in small.stderr


# --- generation flags and `cadenza chat` ---------------------------------------------------------------------


def test_run_stop_logprobs_and_beams(mixtral_dir):
    path = str(mixtral_dir[0])
    llm = LLM(path, device="cpu", dtype="float32")
    free = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)).text
    stop = free[10:13]
    r = cli("run", "--model", path, "--prompt", "Hello", "--max-tokens", "30", "--temperature", "0", "--ignore-eos",
            "--dtype", "float32", "--stop", stop, "--logprobs", "2", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == free[: free.find(stop)] and out["finish_reason"] == "stop"
    assert len(out["logprobs"]) == len(out["token_ids"]) and all(len(t) == 2 for t in out["top_logprobs"])
    r = cli("run", "--model", path, "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0", "--dtype",
            "float32", "--num-beams", "3", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    want = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, num_beams=3))
    assert json.loads(r.stdout)["token_ids"] == want.token_ids
    bad = cli("run", "--model", path, "--prompt", "x", "--num-beams", "2", "--temperature", "0.7")
    assert bad.returncode == 2 and "beam search is deterministic" in bad.stderr


def test_run_chat_flag_uses_the_template(mixtral_dir):
    path = str(mixtral_dir[0])
    r = cli("run", "--model", path, "--prompt", "Hi", "--chat", "--system", "Be brief.", "--max-tokens", "6",
            "--temperature", "0", "--ignore-eos", "--dtype", "float32", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    llm = LLM(path, device="cpu", dtype="float32")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert json.loads(r.stdout)["token_ids"] == want.token_ids


def chat_cli(path, script: str, *extra):
    return cli("chat", "--model", str(path), "--temperature", "0", "--max-tokens", "8", "--ignore-eos",
               "--dtype", "float32", *extra, stdin=script)  # fmt: skip


def test_chat_keeps_history_and_commands(mixtral_dir):
    path = mixtral_dir[0]
    script = "/system Be brief.\nHello\n/stats\nAnd then?\n/reset\nHello\n/bogus\n/help\n/quit\nnever read\n"
    r = chat_cli(path, script)
    assert r.returncode == 0, r.stderr
    llm = LLM(path, device="cpu", dtype="float32")
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    system = {"role": "system", "content": "Be brief."}
    first = llm.chat([system, {"role": "user", "content": "Hello"}], sp).text
    second = llm.chat(
        [system, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
         {"role": "user", "content": "And then?"}], sp,
    ).text  # fmt: skip
    answers = [a.removesuffix("\n") for a in r.stdout.split("> ") if a]
    assert answers[:3] == [first, second, first]  # /reset forgot the history, kept the system message
    assert "decode" in r.stderr and "tok/s" in r.stderr  # /stats
    assert "unknown command /bogus" in r.stderr and "/system TEXT" in r.stderr


def test_chat_drops_old_turns_when_the_context_fills(mixtral_dir):
    r = chat_cli(mixtral_dir[0], "".join(f"message number {i} " * 4 + "\n" for i in range(8)), "--max-context", "120")
    assert r.returncode == 0, r.stderr
    assert "oldest message(s) to fit the context" in r.stderr


def test_chat_without_template_says_so(mixtral_dir, tmp_path):
    from tests.conftest import VOCAB
    from tests.text.tokenizer_files import write_bpe_tokenizer

    bare = shutil.copytree(mixtral_dir[0], tmp_path / "bare")
    write_bpe_tokenizer(bare, vocab_size=VOCAB, chat_template=False)
    r = chat_cli(bare, "Hello\n")
    assert r.returncode == 2 and "no chat template" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_stops_the_answer_and_keeps_the_session(mixtral_dir, tmp_path):
    import signal
    import threading
    import time

    from tests.conftest import edit_config

    long = shutil.copytree(mixtral_dir[0], tmp_path / "long")
    edit_config(long, max_position_embeddings=8192)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cadenza", "chat", "--model", str(long), "--temperature", "0", "--max-tokens", "6000",
         "--ignore-eos", "--dtype", "float32"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
    )  # fmt: skip
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        proc.stdin.write("Tell me everything\n")
        proc.stdin.flush()
        deadline = time.time() + 120
        while len("".join(out)) < 20 and time.time() < deadline:  # the prompt "> " and some of the answer
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("/stats\n/quit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "[stopped]" in err
    stats = err.split("[stopped] prompt ")[1]  # /stats on the stopped answer
    generated = int(stats.split("generated ")[1].split(" tok")[0])
    assert 0 < generated < 6000
    assert float(stats.split("decode ")[1].split(" tok/s")[0]) > 0  # the rate of what was generated, not 0.00
