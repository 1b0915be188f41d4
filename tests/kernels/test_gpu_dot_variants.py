"""CADENZA_GPU_DOT: the candidate accumulation of the K-quant / 4-bit dot loops ("acc4") passes the same kernel tests
as the default ("reduce"), each in a fresh interpreter (the choice is read once, when the kernels are defined)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interpreted import TRITON

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], dot: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CADENZA_GPU_DOT": dot}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
def test_acc4_passes_the_dense_and_expert_block_kernel_tests():
    tests = ["tests/kernels/test_gpu_linear.py", "tests/kernels/test_gpu_moe.py"]
    pick = "routes or split or block or q4 or q6 or mxfp4"
    r = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests, "-k", pick], "acc4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
def test_the_choice_is_read_and_a_wrong_one_named():
    probe = "from cadenza.kernels import gpu_moe_triton as g; print(g.GPU_DOT, bool(g.ACC4))"
    assert _run(["-c", probe], "acc4").stdout.split() == ["acc4", "True"]
    r = _run(["-c", probe], "fast")
    assert r.returncode != 0 and "CADENZA_GPU_DOT='fast'" in r.stderr and "acc4" in r.stderr
