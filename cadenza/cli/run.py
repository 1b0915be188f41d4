"""`cadenza run`: one prompt's text streamed to stdout (or one JSON object), stats on stderr."""

from __future__ import annotations

import argparse
import json
import math
import sys

from cadenza.cli.flags import add_command, add_engine_args, add_sampling_args, load, sampling
from cadenza.errors import CadenzaError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "run",
        help="generate text for one prompt, streamed to stdout",
        description="Loads a model (routed experts split between the GPU and the host to fit --gpu-memory) and "
        "generates text for one prompt, streamed to stdout with speed statistics on stderr. Without --model it runs "
        "a small built-in demo model, so it works offline.",
        examples=[
            "# the built-in demo model: no download, no GPU needed",
            'cadenza run --prompt "Hello"',
            "# a Hugging Face model (downloaded once), 24 GiB of GPU memory, greedy, through its chat template",
            'cadenza run -m Qwen/Qwen3-30B-A3B --gpu-memory 24GiB --chat --temperature 0 -p "What is an expert?"',
        ],
    )
    add_engine_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt; '-' reads it from stdin")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message")
    add_sampling_args(p, 128)
    p.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="report each token's id, text and log-probability and the N most likely alternatives (0: none); "
        "on stderr after the text, or in the --json object",
    )
    p.add_argument(
        "--prompt-logprobs",
        type=int,
        default=None,
        metavar="N",
        help="score the prompt: each prompt token's id, text, log-probability given the tokens before it, rank "
        "and the N most likely alternatives (0: none); on stderr after the text, or in the --json object; with "
        "--max-tokens 0 only the prompt is scored (the table goes to stdout)",
    )
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (needs temperature 0)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length**penalty")
    p.add_argument(
        "--early-stopping",
        default="false",
        choices=["true", "false", "never"],
        help="beam search: when to stop (transformers' definition; default false)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if prompt is None:
        if args.model is not None:
            raise CadenzaError("No prompt given. Pass --prompt TEXT (or --prompt - to read it from stdin).")
        prompt = "Once upon a time"
    beams = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    logprobs = {} if args.logprobs is None else {"logprobs": True, "top_logprobs": args.logprobs}
    if args.prompt_logprobs is not None:
        logprobs["prompt_logprobs"] = args.prompt_logprobs
    extra = dict(num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=beams, **logprobs)
    sampling(args, None, **extra)
    llm = load(args)
    params = sampling(args, llm, **extra)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = llm.chat_prompt(system + [{"role": "user", "content": prompt}])
    elif args.system:
        raise CadenzaError("--system goes with --chat (it is a chat message). Add --chat, or drop --system.")
    if args.json:
        result = llm.generate(prompt, params)
        print(json.dumps({"model": str(llm.checkpoint.path), **result.as_dict()}, ensure_ascii=False))
        return 0
    if args.logprobs is not None or args.prompt_logprobs is not None:
        result = llm.generate(prompt, params)
        if not result.token_ids and result.prompt_logprobs is not None:  # --max-tokens 0: the scores are the output
            print_prompt_logprobs(result.prompt_logprobs, sys.stdout)
            return 0
        print(result.text)
        if result.prompt_logprobs is not None:
            print_prompt_logprobs(result.prompt_logprobs, sys.stderr)
        if args.logprobs is not None:
            print_logprobs(result, sys.stderr)
        return 0
    from cadenza.engine import Generation

    gen = Generation([])
    for piece in llm.stream(prompt, params, gen):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"[{gen.finish_reason}] {gen.stats.summary()}", file=sys.stderr)
    return 0


def print_logprobs(result, out) -> None:
    """One line per generated token: id, its text (JSON-quoted, so spaces and newlines show), log-prob, then the
    alternatives as `id "text" log-prob`."""
    n = len(result.token_ids)
    tokens = result.tokens or [None] * n
    alternatives = result.top_logprobs or [[] for _ in range(n)]
    alt_texts = result.top_tokens or [[None] * len(row) for row in alternatives]
    print("id\ttoken\tlogprob\talternatives (id token logprob)", file=out)
    for tok, text, lp, alts, names in zip(result.token_ids, tokens, result.logprobs, alternatives, alt_texts,
                                          strict=True):  # fmt: skip
        alt = ", ".join(f"{t} {_quoted(name)} {a:.3f}" for (t, a), name in zip(alts, names, strict=True))
        print(f"{tok}\t{_quoted(text)}\t{lp:.4f}\t{alt}", file=out)


def print_prompt_logprobs(scored, out) -> None:
    """One line per prompt token: id, its text, log-prob given the tokens before it ('-' for the first), rank,
    then the alternatives; a last line with their sum and the perplexity over the scored tokens."""
    n = len(scored.token_ids)
    tokens = scored.tokens or [None] * n
    alt_texts = scored.top_tokens or [None if row is None else [None] * len(row) for row in scored.top_logprobs]
    print("id\ttoken\tlogprob\trank\talternatives (id token logprob)", file=out)
    for tok, text, lp, rank, alts, names in zip(scored.token_ids, tokens, scored.logprobs, scored.ranks,
                                                scored.top_logprobs, alt_texts, strict=True):  # fmt: skip
        if lp is None:
            print(f"{tok}\t{_quoted(text)}\t-\t-\t", file=out)
            continue
        alt = ", ".join(f"{t} {_quoted(name)} {a:.3f}" for (t, a), name in zip(alts, names, strict=True))
        print(f"{tok}\t{_quoted(text)}\t{lp:.4f}\t{rank}\t{alt}", file=out)
    if n > 1:
        print(
            f"sum {scored.total:.4f} over {n - 1} tokens, perplexity {math.exp(-scored.total / (n - 1)):.4f}", file=out
        )


def _quoted(text: str | None) -> str:
    return "?" if text is None else json.dumps(text, ensure_ascii=False)
