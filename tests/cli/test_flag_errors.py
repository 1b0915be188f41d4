"""Bad values of the CLI's flags are refused with messages naming the flags a user typed (--expert-group 48), not
LLM's Python parameters (expert_group=48): exit status 2, one paragraph, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cadenza", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["run", "-p", "hi", "--experts", "int8", "--expert-group", "48"],
            ["--expert-group 48", "--experts int8", "128"],
        ),
        (["run", "-p", "hi", "--expert-group", "64"], ["--expert-group 64", "--experts int4"]),
        (["chat", "--max-context", "1"], ["--max-context 1", ">= 2"]),
        (["run", "-p", "hi", "--max-batch", "0"], ["--max-batch 0"]),
        (["run", "-p", "hi", "--cpu-threads", "0"], ["--cpu-threads 0"]),
        (["run", "-p", "hi", "--logprobs", "21"], ["--logprobs 21", "0 to 20"]),
        (["serve", "--prefill-chunk", "-1"], ["--prefill-chunk -1", "0"]),
        (["run", "-p", "hi", "--prompt-logprobs", "-3"], ["--prompt-logprobs -3", "0 to 20"]),
        (["info", "-m", "nowhere", "--experts", "int4", "--expert-group", "48"], ["--expert-group 48", "32, 64, 128"]),
        (["bench", "--experts", "int4", "--expert-group", "7"], ["--expert-group 7", "--experts int4"]),
    ],
)
def test_flag_errors_name_the_flag(args, words):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("cadenza: error: --"), r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    for python_spelling in ("expert_group=", "max_context=", "max_batch=", "cpu_threads=", "experts='", "logprobs="):
        assert python_spelling not in r.stderr, r.stderr


def test_cpu_activations_flag(monkeypatch):
    """--cpu-activations reaches LLM's cpu_activations; int8 on a CPU without the instructions is refused first."""
    import argparse

    from cadenza.cli import flags
    from cadenza.errors import CadenzaError
    from cadenza.kernels import cpu_moe

    p = argparse.ArgumentParser()
    flags.add_engine_args(p)
    args = p.parse_args(["--cpu-activations", "int8"])
    monkeypatch.setattr(cpu_moe, "has_int8_dot", lambda: True)
    flags.check_flags(args)
    seen = {}

    class Fake:
        placement, is_demo = None, False

        def __init__(self, *a, **kw):
            seen.update(kw)

    monkeypatch.setattr("cadenza.llm.LLM", Fake)
    flags.load(args)
    assert seen["cpu_activations"] == "int8"
    flags.load(p.parse_args([]))
    assert seen["cpu_activations"] == "auto"
    monkeypatch.setattr(cpu_moe, "has_int8_dot", lambda: False)
    with pytest.raises(CadenzaError, match="--cpu-activations int8 needs a CPU with AVX512-VNNI"):
        flags.check_flags(args)
    assert p.parse_args([]).cpu_activations is None  # not given: LLM's default (auto), the environment over it
