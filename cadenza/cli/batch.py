"""`cadenza batch`: an offline job, a JSONL file of prompts in, a JSONL file of results out (cadenza.jobs)."""

from __future__ import annotations

import argparse
import json
import sys

from cadenza.cli.flags import add_command, add_engine_args, add_sampling_args, advanced, check_flags, load, sampling
from cadenza.errors import CadenzaError

DEFAULT_MAX_BATCH = 16
# --sort-window's default, in --max-batch's: results wait for the earlier ones of their window before they are
# written, so a larger window loses more finished work to an interruption (and sorting only saves decode attention)
SORT_WINDOWS = 4
# --prefill-chunk's default (LLM's is 2048): each pass that carries prompts moves the non-resident experts once, and
# T1 (Mixtral int4, 24 GiB, H200) ran 963.3 tok/s with passes of 4096 tokens against 865.1 with 2048 (36 mixed
# passes, not 80), the ~470 MB of workspace costing ~5 residents (benchmarks/results/2026-12-04-s26)
JOB_PREFILL_CHUNK = 4096


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "batch",
        help="run a JSONL file of prompts as one job, results to a JSONL file (resumable)",
        description='Runs every request of a JSONL file (one per line: {"prompt": TEXT}, {"messages": [...]} '
        'through the chat template, or {"prompt_token_ids": [...]}; optional "id", "metadata" and per-line '
        "max_tokens, temperature, top_p, seed, stop) with continuous batching, for the most tokens per second over "
        "the whole job. Results go to --out as JSON lines in input order, as soon as they are done; running the "
        "same command again after an interruption runs only the prompts that --out lacks.",
        examples=[
            '# prompts.jsonl: {"id": "q1", "prompt": "The capital of France is", "max_tokens": 8}',
            "cadenza batch -m Qwen/Qwen3-30B-A3B --prompts prompts.jsonl --out results.jsonl --temperature 0",
            "# 32 sequences at a time, statistics as JSON on stdout at the end",
            "cadenza batch -m DIR --prompts prompts.jsonl --out results.jsonl --max-batch 32 --json",
            "# as many as give the most tokens per second in 24 GiB, for prompts + outputs of up to 512 tokens",
            "cadenza batch -m DIR --prompts p.jsonl --out r.jsonl --gpu-memory 24GiB --max-batch auto --max-context 512",  # noqa: E501
        ],
    )
    add_engine_args(p)
    for action in p._actions:
        if action.dest == "max_batch":
            action.default = DEFAULT_MAX_BATCH
            action.type = _batch_size
            action.help = (
                f"sequences decoded together, refilled as they finish (default {DEFAULT_MAX_BATCH}); on a GPU their "
                "KV cache is reserved out of the budget. auto: the batch with the most modeled tokens per second in "
                "the budget for sequences of --max-context tokens (`cadenza info --throughput` shows the plan): give "
                "--max-context as the longest prompt plus --max-tokens"
            )
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl", help="the requests, one JSON object per line")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="the results, one JSON line per request")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace --out if it exists (default: keep its results and run only the remaining prompts)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the job's statistics as one JSON object on stdout")
    add_sampling_args(p, 256)
    advanced(p).add_argument(
        "--sort-window", type=int, default=None, metavar="N",
        help=f"start each N prompts shortest first (default {SORT_WINDOWS} x --max-batch; 1: input order): decode "
        "steps then span rows of similar lengths",
    )  # fmt: skip
    advanced(p).add_argument(
        "--prefill-chunk", dest="pass_tokens", type=int, default=JOB_PREFILL_CHUNK, metavar="TOKENS",
        help="the most tokens a forward pass carries, prompts being prefilled and decoding rows together (default "
        f"{JOB_PREFILL_CHUNK}): each pass that carries prompts moves the non-resident experts over the link once, so "
        "larger passes move them fewer times over the job, at more GPU memory for activations (fewer resident experts)",
    )  # fmt: skip
    p.set_defaults(func=run)
    return p


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a batch size: give a whole number or auto") from None


def auto_batch(args: argparse.Namespace, prompts: int = 0) -> int:
    """--max-batch auto: the throughput plan's batch (cadenza.moe.offload.throughput) for `prompts` sequences
    (0: many) of --max-context tokens (default: the model's, at most 8192) generating --max-tokens, in --gpu-memory
    (default: the free GPU memory); without a GPU side to plan (the CPU alone), the default batch."""
    import torch

    from cadenza.cli.info import offload_info
    from cadenza.llm import DEFAULT_MAX_CONTEXT
    from cadenza.moe.placement import format_size

    cuda = args.device != "cpu" and torch.cuda.is_available()
    budget = args.gpu_memory
    if budget is None and cuda:
        from cadenza.moe.offload.planning import default_budget

        budget = str(default_budget(torch.device("cuda", torch.cuda.current_device())))
    if budget is None or budget in ("0", 0):
        print(f"cadenza: --max-batch auto: no GPU budget to plan a batch in; {DEFAULT_MAX_BATCH} sequences",
              file=sys.stderr)  # fmt: skip
        return DEFAULT_MAX_BATCH
    from cadenza.loader import open_checkpoint

    open_checkpoint(args.model)  # a hub id the job needs anyway is downloaded now (the plan reads its headers)
    context = args.max_context or DEFAULT_MAX_CONTEXT
    new = max(1, min(args.max_tokens, context - 1))
    info = argparse.Namespace(**{**vars(args), "gpu_memory": budget, "throughput": True, "placement": None,
                                 "max_batch": 1, "max_context": context, "prompt_tokens": context - new,
                                 "max_tokens": new, "job_prompts": prompts})  # fmt: skip
    plan = offload_info(info)["throughput"]
    print(
        f"cadenza: --max-batch auto: {plan['max_batch']} sequences of up to {context} tokens "
        f"(KV cache {format_size(plan['kv_bytes'])}{' in host memory' if plan['kv_on_host'] else ''}; "
        f"modeled ~{plan['tok_s']:.0f} tok/s, {plan['source']})"
        + ("" if args.max_context else "; give --max-context (longest prompt + --max-tokens) for a larger batch"),
        file=sys.stderr,
    )
    args.max_context = context
    return int(plan["max_batch"])


def run(args: argparse.Namespace) -> int:
    from cadenza import jobs
    from cadenza.llm import check_prefill_chunk

    check_prefill_chunk(args.pass_tokens, JOB_PREFILL_CHUNK)  # (here: its message gives this command's default)
    requests = None
    if args.max_batch == "auto":
        check_flags(args)  # (its own flags first: the plan reads --max-context and --gpu-memory)
        requests = jobs.read_requests(args.prompts)  # the job's size: its rounds of a batch
        rest = len(requests) - jobs.resume_point(args.out, requests, args.overwrite)
        args.max_batch = auto_batch(args, rest) if rest else DEFAULT_MAX_BATCH  # (all done: nothing to plan)
    if args.max_batch < 1:  # first: the default --sort-window follows from it
        raise CadenzaError(
            f"--max-batch {args.max_batch} is not valid. Use a whole number of at least 1 "
            f"(default {DEFAULT_MAX_BATCH})."
        )
    check_flags(args)
    if args.sort_window is None:
        args.sort_window = SORT_WINDOWS * args.max_batch
    if args.sort_window < 1:
        raise CadenzaError(f"--sort-window {args.sort_window} is not valid. Use a whole number of at least 1.")
    sampling(args, None)  # bad flags refused before anything is read
    requests = jobs.read_requests(args.prompts) if requests is None else requests
    skip = jobs.resume_point(args.out, requests, args.overwrite)
    stats = jobs.JobStats(total=len(requests), skipped=skip)
    if skip < len(requests):
        llm = load(args)
        base = sampling(args, llm)
        jobs.check_prompts(llm, args.prompts, requests[skip:])
        if skip:
            rest = len(requests) - skip
            print(f"cadenza: {args.out} holds {skip} of the {len(requests)} results; running the other {rest}",
                  file=sys.stderr)  # fmt: skip
        progress = jobs.JobProgress(len(requests), skip)
        try:
            jobs.run_job(llm, requests, args.out, base, skip, args.max_batch, args.sort_window, stats, progress)
        except KeyboardInterrupt:
            progress.close()
            done = skip + stats.written
            print(
                f"\ncadenza: interrupted: {done} of {len(requests)} results are in {args.out}; run the same command "
                "again to run the rest",
                file=sys.stderr,
            )
            return 130
        progress.close()
    print(f"cadenza: {stats.summary()}", file=sys.stderr)
    if args.json:
        print(json.dumps({"out": args.out, "max_batch": args.max_batch, "prefill_chunk": args.pass_tokens,
                          **stats.as_dict()}))  # fmt: skip
    return 0
