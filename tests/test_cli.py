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
    assert "demo" in r.stderr and "random weights" in r.stderr
    assert "[length]" in r.stderr
    assert (tmp_path / "cache" / "demo-mixtral-v1" / "config.json").exists()
    # the second run reuses the folder and gives the same greedy text
    again = cli("run", "--max-tokens", "8", "--temperature", "0", "--ignore-eos", env=env)
    assert again.stdout == r.stdout


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
    from cadenza.moe.costmodel import CostModel, save_cached

    cache = tmp_path / "cache"
    key = "Test CPU | Test GPU | 15 threads | expert 64x96 torch.float32 | torch x"
    save_cached(cache, CostModel(key, 73728, (1e-4, 1e-6), (2e-5, 1e-7), 50.0))
    path = str(mixtral_dir[0])
    r = cli("info", "--model", path, "--gpu-memory", "300MiB", "--json", env={"CADENZA_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["placement"]["budget_bytes"] == 300 * 2**20
    assert d["placement"]["resident_count"] == d["placement"]["total_experts"]  # the tiny model fits
    assert list(d["cost_models"]) == [key]
    text = cli("info", "--model", path, "--gpu-memory", "300MiB", env={"CADENZA_CACHE": str(cache)}).stdout
    assert "placement" in text and "fetch beats CPU" in text
    small = cli("info", "--model", path, "--gpu-memory", "1MiB")
    assert small.returncode == 2 and "too small" in small.stderr
