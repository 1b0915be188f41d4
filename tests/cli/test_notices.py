"""One-line notices a first user needs: --device auto falling back to the CPU (and the CPU kernel's first-use compile,
which needs an AVX-512 machine and a cold cache, so it is not run here)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from cadenza import LLM

NOTICE = "found no CUDA GPU"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback needs a machine without CUDA")
def test_cli_says_when_auto_falls_back_to_the_cpu(mixtral_dir):
    args = ["run", "--model", str(mixtral_dir[0]), "-p", "hi", "--max-tokens", "2"]
    r = subprocess.run([sys.executable, "-m", "cadenza", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if NOTICE in line]
    assert len(lines) == 1 and lines[0].startswith("cadenza: ") and "--device auto" in lines[0], r.stderr


def test_notice_only_for_auto_without_cuda(mixtral_dir, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="cadenza"):
        LLM(mixtral_dir[0], device="cpu")
    assert NOTICE not in caplog.text  # asked for the CPU: nothing to say
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cadenza"):
        assert LLM(mixtral_dir[0], device="auto").device.type == "cpu"
    assert caplog.text.count(NOTICE) == 1, caplog.text


def test_kernel_compile_notice_only_before_a_compile(tmp_path, monkeypatch, caplog):
    """native.build logs its notice when the binary is not in the cache yet, and not once it is (the compiler is
    faked: the real CPU kernel needs AVX-512)."""
    import torch.utils.cpp_extension

    from cadenza.kernels import native

    def fake_load(name, build_directory, **kwargs):
        path = f"{build_directory}/{name}.so"
        open(path, "w").close()
        return path

    monkeypatch.setenv("CADENZA_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setattr(native.ctypes, "CDLL", lambda path: path)
    for expected in (1, 0):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cadenza"):
            native.build("cpu_moe.cpp", ["-O3"], [], notice="compiling cadenza's CPU kernel (first use)...")
        assert caplog.text.count("compiling cadenza's CPU kernel") == expected, caplog.text
