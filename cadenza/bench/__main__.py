"""`python -m cadenza.bench [options]` == `cadenza bench [options]` (handy before the CLI registers it)."""

import argparse
import sys

from cadenza.bench.scenarios import add_bench_parser
from cadenza.errors import CadenzaError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cadenza")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except CadenzaError as e:
        print(f"cadenza: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
