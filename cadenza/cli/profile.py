"""`cadenza profile`: which experts a file of prompts uses, written as the popularity file `--placement` reads
(the counting and the report are cadenza.profile's)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cadenza.cli.flags import add_command, add_engine_args, add_sampling_args, load, sampling


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "profile",
        help="count the experts a file of prompts uses: a popularity file for --placement",
        description="Runs a file of prompts like your workload and counts how often each expert is routed to, "
        "writing a popularity JSON (and a heatmap) that --placement uses to keep the busiest experts on the GPU. "
        "It also compares that placement with an even one at a few GPU budgets.",
        examples=[
            "cadenza profile -m Qwen/Qwen3-30B-A3B --prompts prompts.txt --out popularity.json",
            "# then: the profiled experts stay on the GPU",
            'cadenza run -m Qwen/Qwen3-30B-A3B --placement popularity.json --gpu-memory 12GiB -p "Hi"',
        ],
    )
    add_engine_args(p)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (or JSONL with chat messages)")
    p.add_argument("--out", default="popularity.json", help="JSON to write (a PNG heatmap goes beside it)")
    p.add_argument("--budget", action="append", default=None,
                      help="GPU budgets to compare popularity and even placement at, e.g. 24GiB,12GiB "
                      "(default: a quarter, half and three quarters of the experts resident)")  # fmt: skip
    add_sampling_args(p, 32)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from cadenza.profile import parse_budgets, read_prompts, run_profile, summary

    prompts = read_prompts(args.prompts)
    sampling(args, None)
    budgets = parse_budgets(args.budget)
    llm = load(args)
    params = sampling(args, llm)
    report = run_profile(llm, prompts, params, Path(args.out), budgets)
    print(summary(report), file=sys.stderr)
    print(f"wrote {args.out} (use it with --placement {args.out})", file=sys.stderr)
    return 0
