"""Benchmark harness: synthetic full-size models, the transformers+accelerate baseline, benchmarks/README.md's
scenarios behind `cadenza bench`, and their JSON results."""

from cadenza.bench.run import run_bench
from cadenza.bench.scenarios import add_bench_parser
from cadenza.bench.synthetic import SYNTHETIC_MODELS, SyntheticCheckpoint

__all__ = ["add_bench_parser", "run_bench", "SYNTHETIC_MODELS", "SyntheticCheckpoint"]
