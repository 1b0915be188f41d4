"""The folders cadenza writes below one cache root: `CADENZA_CACHE`, default ~/.cache/cadenza.

A leaf module (no cadenza imports), so the kernels, the expert store and the demo model can all ask for their folder
without importing one another. The variable is read at each call: tests and users move the cache per process."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (cost models and the CPU prefetch tuning live directly in it)."""
    return Path(os.environ.get("CADENZA_CACHE", Path.home() / ".cache" / "cadenza")).expanduser()


def kernels_dir() -> Path:
    """JIT builds of the C++ kernels, one subfolder per source, flags and machine."""
    return cache_dir() / "kernels"


def experts_dir() -> Path:
    """The disk cache of packed (int8 / int4) routed experts, one subfolder per checkpoint and format."""
    return cache_dir() / "experts"


def demo_dir(name: str) -> Path:
    """The built-in demo checkpoint `name`."""
    return cache_dir() / name


def chat_history_file() -> Path:
    """`cadenza chat`'s line history (arrow keys recall earlier lines), shared by every model."""
    return cache_dir() / "chat_history"
