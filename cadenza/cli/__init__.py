"""The `cadenza` command: one module per subcommand (each registers its parser and handler), the shared flags in
cadenza.cli.flags. Only argument parsing and printing happen here; the work is in LLM / Engine / Checkpoint.

Command modules are imported when the parser is built, not with this package, so cadenza.bench can import
cadenza.cli.flags without importing itself back through the bench command."""

from __future__ import annotations

import argparse
import importlib
import sys

from cadenza.errors import CadenzaError
from cadenza.log import to_terminal

# cadenza.cli.<name>, in the help's order
COMMANDS = ("run", "chat", "batch", "info", "pull", "profile", "perplexity", "serve", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadenza",
        description="Run Mixture-of-Experts language models larger than the GPU's memory, on one machine.",
    )
    parser.add_argument("--version", action="version", version=f"cadenza {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from cadenza.cli.flags import advanced_last

    for name in COMMANDS:
        advanced_last(importlib.import_module(f"cadenza.cli.{name}").add_parser(sub))
    return parser


def _version() -> str:
    from cadenza import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    to_terminal()  # the library's notices and progress lines, as `cadenza: ...` on stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CadenzaError as e:
        print(f"cadenza: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncadenza: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cadenza run ... | head`
        return 0


__all__ = ["build_parser", "main"]
