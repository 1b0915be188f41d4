"""JIT builds of cadenza's C++ sources (plain C ABI, loaded with ctypes; no torch headers, so a build takes
seconds) into the cadenza cache: one folder per source, flags and machine, so a changed source or compiler flag
builds anew and an unchanged one loads at once."""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import torch


def build(source: str, cflags: list[str], ldflags: list[str], key: str = "") -> ctypes.CDLL:
    """Compiles `source` (a file beside this module) with `cflags` and links it with `ldflags`; `key` adds what
    else the binary depends on (a CPU's model and flags). Raises what the compiler or ninja raise."""
    from torch.utils.cpp_extension import load

    from cadenza.demo import cache_dir

    src = Path(__file__).with_name(source)
    text = "\n".join([src.read_text(), " ".join(cflags), " ".join(ldflags), torch.__version__, key])
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    build_dir = cache_dir() / "kernels" / f"{src.stem}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    path = load(
        name=f"cadenza_{src.stem}_{digest}",
        sources=[str(src)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return ctypes.CDLL(path)
