"""Where cadenza keeps files between runs (CADENZA_CACHE, default ~/.cache/cadenza)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("CADENZA_CACHE", Path.home() / ".cache" / "cadenza")).expanduser()
