"""`cadenza pull`: downloads a Hugging Face model's files that cadenza reads into the hub cache, and prints where
they are; no model is loaded. Later `--model ID` runs (HF_HUB_OFFLINE=1 included) read them from there."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from cadenza.cli.flags import add_command
from cadenza.errors import CadenzaError
from cadenza.hub import HubId, hub_cache_dir, snapshot


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "pull",
        help="download what cadenza reads of a Hugging Face model into the hub cache; print its folder (or .gguf file)",
        description="Downloads the files cadenza reads of a Hugging Face model (config, safetensors, tokenizer) into "
        "the hub cache and prints the local folder, or the .gguf file. The other commands download on first use "
        "too; pull does it ahead of time (set HF_TOKEN for gated models).",
        examples=[
            "cadenza pull Qwen/Qwen3-30B-A3B",
            "# one GGUF model of a repository, by a piece of its file name",
            "cadenza pull unsloth/Qwen3-30B-A3B-GGUF:Q4_K_M",
        ],
    )
    p.add_argument(
        "id", metavar="ID",
        help="ORG/NAME, ORG/NAME@REVISION, or ORG/NAME:FILE for one GGUF model of a repository (a .gguf file's "
        "path in it, or a piece of its name such as Q4_K_M)",
    )  # fmt: skip
    p.add_argument("--revision", default=None, help="a branch, tag or commit (the same as ID@REVISION)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    hub_id = HubId.parse(args.id)
    if hub_id is None:
        raise CadenzaError(
            f"'{args.id}' is not a Hugging Face model id. Use ORG/NAME as in the model page's URL "
            "(https://huggingface.co/ORG/NAME), optionally @REVISION or :FILE.gguf. A local folder needs no pull: "
            "pass it to --model as it is."
        )
    if args.revision is not None:
        if hub_id.revision not in (None, args.revision):
            raise CadenzaError(
                f"Two revisions given: @{hub_id.revision} in the id and --revision {args.revision}. Keep one."
            )
        hub_id = replace(hub_id, revision=args.revision)
    path = snapshot(hub_id)
    print(path)
    folder = path if path.is_dir() else path.parent
    print(f"cadenza: {hub_id} is in {folder} (cache: {hub_cache_dir()}); run it with --model {hub_id}", file=sys.stderr)
    return 0
