"""Benchmark harness: synthetic full-size models, the transformers+accelerate baseline, benchmarks/README.md's
scenarios behind `cadenza bench`, and their JSON results.

Its names load on first use (PEP 562), so `cadenza bench --help` builds its parser without importing torch."""

from __future__ import annotations

import importlib

_HOMES = {
    "run_bench": "cadenza.bench.run",
    "add_bench_parser": "cadenza.bench.scenarios",
    "SYNTHETIC_MODELS": "cadenza.bench.models",
    "SyntheticCheckpoint": "cadenza.bench.synthetic",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'cadenza.bench' has no attribute {name!r}")


__all__ = ["add_bench_parser", "run_bench", "SYNTHETIC_MODELS", "SyntheticCheckpoint"]
