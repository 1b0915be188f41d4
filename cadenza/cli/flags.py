"""Flags that several commands share (model and engine, experts, CUDA graphs, sampling) and what they turn into:
`load` gives the LLM, `sampling` the SamplingParams. `cadenza bench` adds some of them to its own parser."""

from __future__ import annotations

import argparse
import re
import sys
import textwrap

ADVANCED = "advanced (tuning and debugging; the defaults suit most runs)"


def add_command(subparsers, name: str, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand's parser whose --help is enough to use it: `help` on `cadenza --help`'s list, `description`
    (what it does, in two sentences) above the flags, `examples` (command lines; a line starting with # is a
    comment) below them."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return subparsers.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, width=78),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def advanced(p: argparse.ArgumentParser):
    """The parser's "advanced" argument group (made on first use): rare knobs, listed after the common flags
    (`advanced_last` moves it behind groups made later)."""
    for g in p._action_groups:
        if g.title == ADVANCED:
            return g
    return p.add_argument_group(ADVANCED)


def advanced_last(p: argparse.ArgumentParser) -> None:
    """Moves the "advanced" group to the end of p's --help, after sampling and the command's own groups."""
    p._action_groups.sort(key=lambda g: g.title == ADVANCED)  # stable: the others keep their order


def add_expert_args(p: argparse.ArgumentParser, cache: bool = True) -> None:
    """--experts and --expert-group (and --no-cache, for commands that load weights): how routed experts are
    stored. `expert_kwargs` reads them back as LLM's keyword arguments."""
    p.add_argument(
        "--experts", default="auto", choices=["auto", "bf16", "int8", "int4"],
        help="routed experts stored as: auto (default: a GGUF's Q4_0/Q4_K/Q6_K/MXFP4 blocks as they are, else "
        "bf16), bf16 (as the checkpoint, in the compute dtype), int8 (about half "
        "the bytes) or int4 (about 0.27): faster on the CPU, more of them fit on the GPU, slightly less accurate",
    )  # fmt: skip
    advanced(p).add_argument(
        "--expert-group", type=int, default=None, metavar="N",
        help="columns per quantization scale: int8 0 (per output channel, default), 32, 64, 128; int4 32, 64 "
        "(default), 128",
    )  # fmt: skip
    if cache:
        advanced(p).add_argument(
            "--no-cache", action="store_true",
            help="neither read nor write the disk cache of quantized experts (~/.cache/cadenza/experts)",
        )  # fmt: skip


def expert_kwargs(args: argparse.Namespace) -> dict:
    """LLM's experts / expert_group / expert_cache from the flags `add_expert_args` added."""
    return {
        "experts": args.experts,
        "expert_group": args.expert_group,
        "expert_cache": not getattr(args, "no_cache", False),
    }


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a model (run, chat, profile, serve); `load` reads them back."""
    p.add_argument(
        "--model", "-m",
        help="checkpoint folder (config.json, *.safetensors, tokenizer files), a .gguf file, or a Hugging Face id "
        "ORG/NAME[@REVISION][:FILE] (downloaded to the hub cache when missing; FILE picks one GGUF model of a repo)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--dtype", default=None, help="compute dtype: float32, float16 or bfloat16 (default: checkpoint's)")
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="longest sequence in tokens, prompt + output (default: the model's, at most 8192; more than the "
        "model's config.json max_position_embeddings is capped to it)",
    )
    p.add_argument(
        "--gpu-memory",
        default=None,
        help="GPU budget with a unit: 24GiB (or 24G), 24GB (10^9 bytes), 512MiB; 0 keeps every routed expert on "
        "the host; a bare number such as 24 is refused (default: free GPU memory less a margin). With --gpus: one "
        "size for each GPU, or one per GPU (24GiB,16GiB)",
    )
    p.add_argument(
        "--gpus",
        default=None,
        help="several GPUs of this machine, e.g. 0,1: the layers split in contiguous blocks, one a GPU, each GPU's "
        "experts placed in its --gpu-memory (default: one GPU, --device)",
    )
    p.add_argument(
        "--offload-policy",
        default="auto",
        choices=["auto", "cpu", "fetch"],
        help="non-resident experts: computed on the CPU, fetched to the GPU, or chosen by the cost model (default)",
    )
    p.add_argument("--placement", default=None, help="popularity JSON (from `cadenza profile`) to choose residents")
    p.add_argument(
        "--max-batch", type=int, default=1,
        help="sequences decoded together whose KV cache is reserved on the GPU (default 1)",
    )  # fmt: skip
    add_expert_args(p)
    a = advanced(p)
    a.add_argument("--cpu-threads", type=int, default=None, help="threads for CPU experts (default: physical cores)")
    a.add_argument("--cpu-activations", default=None, choices=["auto", "exact", "int8"],
                   help="experts with integer codes (GGUF Q4_K, Q5_K, Q6_K, Q8_0; --experts int8) computed on the "
                   "CPU: int8 quantizes the activations to 8 bits per 256 columns, as llama.cpp does, for integer dot "
                   "products (faster; ~1.5%% error on a layer's output); exact multiplies them as they are; auto "
                   "(default): int8 for K-quant experts in bf16 and fp16 runs, else exact. Default: "
                   "$CADENZA_CPU_ACTIVATIONS, else auto")  # fmt: skip
    a.add_argument("--kv-cache", default="gpu", choices=["gpu", "host"],
                   help="where the KV cache lives on a GPU run: gpu (default, in the budget) or host (host memory, "
                   "attention on the CPU: big offline batches past the GPU's memory; no CUDA graphs)")  # fmt: skip
    a.add_argument("--micro-batches", type=int, default=1,
                   help="with --kv-cache host: decode each step's batch as this many micro-batches in threads, one's "
                   "CPU attention overlapping another's GPU experts (default 1: none; measured slower so far: a big "
                   "step's experts are launched from Python, and two threads take turns)")  # fmt: skip
    a.add_argument("--eviction", default="lru", choices=["lru", "lfu", "lrfu"],
                   help="which fetched expert leaves a full fetch cache (default lru)")  # fmt: skip
    a.add_argument("--prefetch", default="auto", choices=["auto", "on", "off"],
                   help="guess the next layer's experts and copy them early: auto (default) = with --offload-policy "
                   "fetch only")  # fmt: skip
    add_graph_args(p)


def add_graph_args(p: argparse.ArgumentParser) -> None:
    advanced(p).add_argument(
        "--no-cuda-graphs", action="store_true",
        help="run every decode step eagerly instead of replaying it as CUDA graphs (for debugging and comparison)",
    )  # fmt: skip


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json, else as shown)")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"most tokens to generate (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=None, help="0 is greedy (default 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default 1: off)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default 0: off)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability (0: off)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (default 1: off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2], OpenAI's definition (default 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2], OpenAI's definition (default 0)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    g.add_argument(
        "--stop", action="append", default=[], metavar="TEXT",
        help=r"stop before this text (repeat for several); \n, \t and \\ in it mean a newline, a tab and a "
        r"backslash, so --stop '\n\n' stops at a blank line",
    )  # fmt: skip
    g.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop at this token id")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def check_flags(args: argparse.Namespace) -> None:
    """Refuses bad values of the shared flags, before anything loads, with messages that name the flags: LLM's own
    messages name its Python parameters (expert_group=48), which a CLI user never typed. Flags a command lacks are
    skipped."""
    from cadenza.errors import CadenzaError

    context = getattr(args, "max_context", None)
    if context is not None and context < 2:
        raise CadenzaError(
            f"--max-context {context} is not a valid length. Use a whole number >= 2, or leave --max-context out "
            "for the model's context (at most 8192)."
        )
    batch = getattr(args, "max_batch", 1)
    if batch != "auto" and batch < 1:  # (cadenza batch's auto is resolved into a number before loading)
        raise CadenzaError(f"--max-batch {batch} is not valid. Use a whole number of at least 1 (default 1).")
    for flag in ("logprobs", "prompt_logprobs"):
        n = getattr(args, flag, None)
        if n is not None and not 0 <= n <= 20:
            name = "--" + flag.replace("_", "-")
            raise CadenzaError(f"{name} {n} is not valid. Use a whole number from 0 to 20, or leave {name} out.")
    threads = getattr(args, "cpu_threads", None)
    if threads is not None and threads < 1:
        raise CadenzaError(
            f"--cpu-threads {threads} is not valid. Use a whole number of at least 1, or leave --cpu-threads out "
            "for one per physical core."
        )
    acts = getattr(args, "cpu_activations", None)
    if acts == "int8":
        from cadenza.kernels import cpu_moe

        if not cpu_moe.has_int8_dot():
            raise CadenzaError(
                "--cpu-activations int8 needs a CPU with AVX512-VNNI and AVX512_VBMI, which this one lacks. Use "
                "--cpu-activations exact, or leave the flag out (auto: exact on this CPU)."
            )
    group = getattr(args, "expert_group", None)
    if group is None:
        return
    from cadenza.kernels.layout import DEFAULT_GROUP, INT4_GROUPS, INT8_GROUPS

    experts = args.experts
    if experts in ("bf16", "auto"):
        if group != 0:
            raise CadenzaError(
                f"--expert-group {group} applies to quantized experts only. Add --experts int8 or --experts int4, "
                "or leave --expert-group out."
            )
        return
    allowed = {"int8": INT8_GROUPS, "int4": INT4_GROUPS}[experts]
    if group not in allowed:
        names = ", ".join(str(g) + (" (per output channel)" if g == 0 else "") for g in allowed)
        default = DEFAULT_GROUP[experts] or "per output channel"
        raise CadenzaError(
            f"--expert-group {group} is not supported with --experts {experts}. Use one of: {names} (default "
            f"{default}), or leave --expert-group out."
        )


def load(args: argparse.Namespace):
    """The LLM the `add_engine_args` flags ask for; says on stderr where its experts went."""
    from cadenza.llm import LLM
    from cadenza.moe.placement import parse_size

    check_flags(args)
    if args.gpu_memory is not None:  # the message names the flag; 24 (no unit) is refused
        for size in args.gpu_memory.split(",") if getattr(args, "gpus", None) else [args.gpu_memory]:
            parse_size(size.strip(), "--gpu-memory")
    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_context=args.max_context,
        gpu_memory=args.gpu_memory,
        offload_policy=args.offload_policy,
        cpu_threads=args.cpu_threads,
        placement=args.placement,
        max_batch=args.max_batch,
        eviction=args.eviction,
        prefetch={"auto": None, "on": True, "off": False}[args.prefetch],
        cuda_graphs=not args.no_cuda_graphs,
        kv_cache=args.kv_cache,
        micro_batches=args.micro_batches,
        cpu_activations=args.cpu_activations or "auto",
        devices=getattr(args, "gpus", None),
        prefill_chunk=getattr(args, "pass_tokens", None),  # (cadenza batch's --prefill-chunk; serve's is its own)
        **expert_kwargs(args),
    )
    if getattr(llm, "split", None) is not None:
        for share in llm.orchestra.shares:
            print(f"cadenza: {llm.devices[share.device]}: {share.summary().partition(': ')[2]}", file=sys.stderr)
    if llm.placement is not None:
        print(f"cadenza: {llm.placement.summary()}", file=sys.stderr)
    if llm.is_demo:
        from cadenza.demo import DEMO_LABEL

        print(f"cadenza: no --model given: running the {DEMO_LABEL}.", file=sys.stderr)
    return llm


def sampling(args: argparse.Namespace, llm, **extra):
    """SamplingParams from the flags; unset ones come from the checkpoint's generation_config.json (llm None:
    plain defaults, to refuse bad values before the weights load)."""
    from cadenza.sampling import SamplingParams

    if llm is None:
        check_flags(args)  # the flags' own names in the message, before SamplingParams names its parameters
    given = {
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
    }  # fmt: skip
    make = llm.default_params if llm is not None else SamplingParams
    return make(
        max_tokens=args.max_tokens,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=[unescape(s) for s in args.stop],
        stop_token_ids=args.stop_token_id,
        ignore_eos=args.ignore_eos,
        **{k: v for k, v in given.items() if v is not None},
        **extra,
    )


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """--stop's escapes: \\n, \\t and \\\\ become a newline, a tab and a backslash (a shell passes "\\n" as a
    backslash and an n); any other backslash stays as it is. The CLI's only: the API and the server take text as
    given."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)
