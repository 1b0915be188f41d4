"""`cadenza bench`: its parser and its work live in cadenza.bench; this only registers it."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from cadenza.bench.scenarios import add_bench_parser

    return add_bench_parser(subparsers)
