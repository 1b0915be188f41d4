"""Kernel modules for the Triton kernel tests: compiled on CUDA, else a private copy run by Triton's interpreter.

Triton reads TRITON_INTERPRET when a kernel (its own library's included) is defined, and the first launch imports
a module that checks it. So the flag is on only while triton and a private copy of a kernels module are imported:
the package's own module stays uninterpreted, and the engine's CPU tests keep its fast torch fallback (through the
interpreter a small model's decode takes minutes); the copy brings its own copies of the kernel modules it
imports (gpu_moe's kernels live in gpu_moe_triton). If something imported triton before the first such copy, the
flag comes too late: those kernel tests then run in a fresh subprocess (`subprocess` True).
"""

import importlib
import importlib.util
import os
import subprocess
import sys

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = importlib.util.find_spec("triton") is not None
_interpreted = False  # triton was first imported here, under the interpreter


def kernels_module(name: str):
    """(module, subprocess) for `cadenza.kernels.<name>`: interpreted on CPU-only machines where possible."""
    global _interpreted
    if not TRITON or DEVICE.type != "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
        return importlib.import_module(f"cadenza.kernels.{name}"), False
    if "triton" in sys.modules and not _interpreted:
        return importlib.import_module(f"cadenza.kernels.{name}"), True
    private = f"cadenza.kernels._{name}_interpreted"
    if private in sys.modules:
        return sys.modules[private], False
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.experimental.gluon  # noqa: F401

        _interpreted = True
        module = sys.modules[private] = _import_fresh(f"cadenza.kernels.{name}")
    finally:
        del os.environ["TRITON_INTERPRET"]
    return module, False


def _import_fresh(full: str):
    """`full` imported anew, with new copies of the GPU kernel modules it imports (cadenza.kernels.gpu_*: they
    define Triton kernels, e.g. gpu_moe's in gpu_moe_triton), which are then taken out of sys.modules and the
    package again: the package's own modules, imported before or after, stay uninterpreted."""
    package = importlib.import_module(full.rpartition(".")[0])
    fresh = lambda n: n.startswith("cadenza.kernels.gpu_")  # noqa: E731
    saved = {n: m for n, m in sys.modules.items() if fresh(n)}
    attrs = {n: getattr(package, n.rpartition(".")[2], None) for n in saved}
    for n in saved:
        del sys.modules[n]
    try:
        return importlib.import_module(full)
    finally:
        for n in [n for n in sys.modules if fresh(n)]:
            del sys.modules[n]
        sys.modules.update(saved)
        for n in [n for n in vars(package) if fresh(f"{package.__name__}.{n}")]:
            delattr(package, n)
        for n, attr in attrs.items():
            if attr is not None:
                setattr(package, n.rpartition(".")[2], attr)


def run_file_interpreted(path: str) -> None:
    """Runs a test file in a fresh interpreter with TRITON_INTERPRET=1 (where triton came in too early here)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
