"""`cadenza run | info`: argument parsing and printing only; the work is in LLM / Engine / Checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cadenza.errors import CadenzaError


def add_expert_args(p: argparse.ArgumentParser, cache: bool = True) -> None:
    """--experts and --expert-group (and --no-cache, for commands that load weights): how routed experts are
    stored. `expert_kwargs` reads them back as LLM's keyword arguments."""
    p.add_argument(
        "--experts", default="bf16", choices=["bf16", "int8", "int4"],
        help="routed experts stored as: bf16 (default: as the checkpoint, in the compute dtype), int8 (about half "
        "the bytes) or int4 (about 0.27): faster on the CPU, more of them fit on the GPU, slightly less accurate",
    )  # fmt: skip
    p.add_argument(
        "--expert-group", type=int, default=None, metavar="N",
        help="columns per quantization scale: int8 0 (per output channel, default), 32, 64, 128; int4 32, 64 "
        "(default), 128",
    )  # fmt: skip
    if cache:
        p.add_argument(
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


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="checkpoint folder (config.json, *.safetensors, tokenizer files)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--dtype", default=None, help="compute dtype: float32, float16 or bfloat16 (default: checkpoint's)")
    p.add_argument(
        "--max-context", type=int, default=None, help="longest sequence in tokens (default: model's, at most 8192)"
    )
    p.add_argument(
        "--gpu-memory",
        default=None,
        help="GPU budget, e.g. 24GiB; 0 keeps every routed expert on the host (default: free GPU memory less a margin)",
    )
    p.add_argument(
        "--offload-policy",
        default="auto",
        choices=["auto", "cpu", "fetch"],
        help="non-resident experts: computed on the CPU, fetched to the GPU, or chosen by the cost model (default)",
    )
    p.add_argument("--cpu-threads", type=int, default=None, help="threads for CPU experts (default: physical cores)")
    p.add_argument("--placement", default=None, help="popularity JSON (from `cadenza profile`) to choose residents")
    p.add_argument(
        "--max-batch", type=int, default=1,
        help="sequences decoded together whose KV cache is reserved on the GPU (default 1)",
    )  # fmt: skip
    p.add_argument("--eviction", default="lru", choices=["lru", "lfu", "lrfu"],
                   help="which fetched expert leaves a full fetch cache (default lru)")  # fmt: skip
    p.add_argument("--prefetch", default="auto", choices=["auto", "on", "off"],
                   help="guess the next layer's experts and copy them early: auto (default) = with --offload-policy "
                   "fetch only")  # fmt: skip
    add_graph_args(p)
    add_expert_args(p)


def add_graph_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-cuda-graphs", action="store_true",
        help="run every decode step eagerly instead of replaying it as CUDA graphs (for debugging and comparison)",
    )  # fmt: skip


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
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
    g.add_argument("--stop", action="append", default=[], help="stop before this text (repeat for several)")
    g.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop at this token id")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadenza",
        description="Run Mixture-of-Experts language models larger than the GPU's memory, on one machine.",
    )
    parser.add_argument("--version", action="version", version=f"cadenza {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="generate text for one prompt, streamed to stdout")
    _add_engine_args(run)
    run.add_argument("--prompt", "-p", default=None, help="the prompt; '-' reads it from stdin")
    run.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    run.add_argument("--system", default=None, help="with --chat: a system message")
    _add_sampling_args(run, 128)
    run.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="report each token's log-probability and the N most likely alternatives (JSON output)",
    )
    run.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (needs temperature 0)")
    run.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length**penalty")
    run.add_argument(
        "--early-stopping",
        default="false",
        choices=["true", "false", "never"],
        help="beam search: when to stop (transformers' definition; default false)",
    )
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="an interactive chat in the terminal (streams answers, keeps the history)")
    _add_engine_args(chat)
    chat.add_argument("--system", default=None, help="a system message to start with")
    _add_sampling_args(chat, 1024)
    chat.set_defaults(func=cmd_chat)

    info = sub.add_parser("info", help="describe a checkpoint folder without loading its weights")
    info.add_argument("--model", "-m", required=True, help="checkpoint folder")
    info.add_argument("--gpu-memory", default=None, help="also show the placement for this GPU budget, e.g. 24GiB")
    info.add_argument("--max-context", type=int, default=None, help="context the placement reserves KV cache for")
    info.add_argument("--dtype", default=None, help="compute dtype for the placement (default: checkpoint's)")
    info.add_argument("--placement", default=None, help="popularity JSON to choose residents by")
    add_expert_args(info, cache=False)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    prof = sub.add_parser("profile", help="count the experts a file of prompts uses: a popularity file for --placement")
    _add_engine_args(prof)
    prof.add_argument("--prompts", required=True, help="text file, one prompt per line (or JSONL with chat messages)")
    prof.add_argument("--out", default="popularity.json", help="JSON to write (a PNG heatmap goes beside it)")
    prof.add_argument("--budget", action="append", default=None,
                      help="GPU budgets to compare popularity and even placement at, e.g. 24GiB,12GiB "
                      "(default: a quarter, half and three quarters of the experts resident)")  # fmt: skip
    _add_sampling_args(prof, 32)
    prof.set_defaults(func=cmd_profile)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra)")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    serve.add_argument(
        "--api-key", default=None,
        help="require 'Authorization: Bearer KEY' on /v1/ requests (default: $CADENZA_API_KEY, else none)",
    )  # fmt: skip
    serve.add_argument(
        "--max-queue", type=int, default=64,
        help="sequences that may wait for a slot; beyond, requests get 429 (default 64)",
    )  # fmt: skip
    serve.add_argument(
        "--served-model-name", default=None, help="the model's name in the API (default: the checkpoint folder's)"
    )
    serve.add_argument(
        "--adapt-bytes", default="1GiB",
        help="adaptive placement: resident experts exchanged for ones live traffic uses more, at most this many "
        "bytes of copies at a time, between requests (default 1GiB)",
    )  # fmt: skip
    serve.add_argument("--no-adaptive-placement", action="store_true", help="keep the placement fixed")
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's logging, access log included at info (default info)",
    )  # fmt: skip
    serve.set_defaults(func=cmd_serve)

    from cadenza.bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def _version() -> str:
    from cadenza import __version__

    return __version__


def _load(args: argparse.Namespace):
    from cadenza.llm import LLM

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
        **expert_kwargs(args),
    )
    if llm.placement is not None:
        print(f"cadenza: {llm.placement.summary()}", file=sys.stderr)
    if llm.is_demo:
        from cadenza.demo import DEMO_LABEL

        print(f"cadenza: no --model given: running the {DEMO_LABEL}.", file=sys.stderr)
    return llm


def _sampling(args: argparse.Namespace, llm, **extra):
    """SamplingParams from the flags; unset ones come from the checkpoint's generation_config.json (llm None:
    plain defaults, to refuse bad values before the weights load)."""
    from cadenza.sampling import SamplingParams

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
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        ignore_eos=args.ignore_eos,
        **{k: v for k, v in given.items() if v is not None},
        **extra,
    )


def cmd_run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if prompt is None:
        if args.model is not None:
            raise CadenzaError("No prompt given. Pass --prompt TEXT (or --prompt - to read it from stdin).")
        prompt = "Once upon a time"
    beams = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    logprobs = {} if args.logprobs is None else {"logprobs": True, "top_logprobs": args.logprobs}
    extra = dict(num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=beams, **logprobs)
    _sampling(args, None, **extra)
    llm = _load(args)
    params = _sampling(args, llm, **extra)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = llm.chat_prompt(system + [{"role": "user", "content": prompt}])
    elif args.system:
        raise CadenzaError("--system goes with --chat (it is a chat message). Add --chat, or drop --system.")
    if args.json:
        result = llm.generate(prompt, params)
        print(json.dumps({"model": str(llm.checkpoint.path), **result.as_dict()}, ensure_ascii=False))
        return 0
    if args.logprobs is not None:
        result = llm.generate(prompt, params)
        print(result.text)
        alternatives = result.top_logprobs or [[] for _ in result.token_ids]
        for tok, lp, alts in zip(result.token_ids, result.logprobs, alternatives, strict=True):
            alt = ", ".join(f"{t}:{a:.3f}" for t, a in alts)
            print(f"{tok}\t{lp:.4f}\t{alt}", file=sys.stderr)
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


def cmd_chat(args: argparse.Namespace) -> int:
    from cadenza import chat

    _sampling(args, None)
    llm = _load(args)
    params = _sampling(args, llm)
    return chat.run(llm, params, system=args.system)


def cmd_profile(args: argparse.Namespace) -> int:
    from cadenza.profile import main

    return main(args)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise CadenzaError(
            f"`cadenza serve` needs FastAPI and uvicorn, which are not installed ({e}). Install them with: "
            "pip install 'cadenza[serve]'  (or: pip install fastapi uvicorn)"
        ) from None
    if args.max_queue < 1:
        raise CadenzaError(f"--max-queue {args.max_queue} is not valid. Use a whole number of at least 1.")
    api_key = args.api_key if args.api_key is not None else os.environ.get("CADENZA_API_KEY") or None
    from cadenza.moe.placement import parse_size
    from cadenza.server.serve import bind, serve

    if not args.no_adaptive_placement:
        parse_size(args.adapt_bytes)  # refuse a bad size before loading

    sock = bind(args.host, args.port)  # before loading: a taken port fails at once
    try:
        llm = _load(args)
        name = args.served_model_name or Path(llm.checkpoint.path).name
        adapt = None if args.no_adaptive_placement else parse_size(args.adapt_bytes)
        return serve(llm, sock, name, api_key, args.max_queue, args.log_level, adapt)
    finally:
        sock.close()


def describe(model_dir: str | Path, experts: str = "bf16", expert_group: int | None = None) -> dict:
    """Architecture and sizes of a checkpoint, from config.json and the safetensors headers only; expert bytes as
    the routed experts would be stored with `experts` / `expert_group` (bf16: in the checkpoint's dtype)."""
    import torch

    from cadenza.checkpoint import Checkpoint
    from cadenza.loader import build_meta, expected_tensors
    from cadenza.moe.experts import Experts
    from cadenza.moe.quantize import ExpertFormat

    fmt = ExpertFormat.of(experts, expert_group)
    ckpt = Checkpoint(model_dir)
    model = build_meta(ckpt)
    config = model.config
    expert_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Experts)]
    expert_params = sum(m.num_parameters for _, m in expert_layers)
    all_params = sum(
        _numel(shape)
        for name, shape in expected_tensors(model).items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    )
    first = expert_layers[0][1] if expert_layers else None
    one_expert = first.expert_nbytes_as(fmt.fmt, fmt.group, ckpt.torch_dtype()) if first else 0
    return {
        "model": str(ckpt.path),
        "architecture": ckpt.architecture,
        "model_type": ckpt.config.get("model_type"),
        "layers": config.num_hidden_layers,
        "moe_layers": len(expert_layers),
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "experts_per_layer": first.num_experts if first else 0,
        "experts_per_token": getattr(config, "num_experts_per_tok", None),
        "expert_intermediate_size": first.intermediate_size if first else None,
        "parameters": all_params,
        "expert_parameters": expert_params,
        "non_expert_parameters": all_params - expert_params,
        "experts_format": fmt.fmt,
        "expert_group": fmt.group if fmt.packed else None,
        "expert_bytes": one_expert,  # one routed expert, as stored in experts_format
        "routed_expert_bytes": one_expert * sum(m.num_experts for _, m in expert_layers),
        "kv_bytes_per_token": model.new_cache(1, ckpt.torch_dtype(), torch.device("meta")).nbytes_per_token(),
        "checkpoint_bytes": ckpt.total_bytes,
        "bytes_by_dtype": ckpt.bytes_by_dtype(),
        "dtype": str(ckpt.torch_dtype()).removeprefix("torch."),
        "shards": len(ckpt.files()),
    }


def _format_name(d: dict) -> str:
    if d["expert_group"] is None:
        return f"{d['experts_format']} ({d['dtype']})"
    group = f"groups of {d['expert_group']}" if d["expert_group"] else "per output channel"
    return f"{d['experts_format']} (scales {group})"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def offload_info(args: argparse.Namespace) -> dict:
    """The placement a budget would give, and the cost models measured on this machine, without CUDA."""
    from cadenza.checkpoint import Checkpoint
    from cadenza.llm import DEFAULT_MAX_CONTEXT, PREFILL_CHUNK, resolve_dtype, workspace_bytes
    from cadenza.loader import build_meta, model_sizes
    from cadenza.moe.placement import load_popularity, parse_size, plan
    from cadenza.paths import cache_dir

    out: dict = {}
    ckpt = Checkpoint(args.model)
    meta = build_meta(ckpt)
    dtype = resolve_dtype(args.dtype, ckpt)
    sizes = model_sizes(meta, dtype, args.experts, args.expert_group)
    if args.gpu_memory is not None:
        context = min(meta.config.context_length, args.max_context or DEFAULT_MAX_CONTEXT)
        pop = load_popularity(args.placement, sizes.num_moe_layers, sizes.num_experts) if args.placement else None
        ws = workspace_bytes(meta.config, dtype, context, PREFILL_CHUNK, 256 * 1024 * 1024)
        slots = max(2, getattr(meta.config, "num_experts_per_tok", 2))
        placement = plan(sizes, parse_size(args.gpu_memory), context, ws, pop, fetch_slots=slots)
        out["placement"] = {**placement.as_dict(), "summary": placement.summary()}
        if pop is not None:
            out["placement"]["expected_gpu_share"] = placement.expected_gpu_share(pop)
    import torch

    from cadenza.graphs import StepGraphs

    cuda = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out["cuda_graphs"] = StepGraphs(meta, cuda).describe()  # what a run on this machine would do
    shape = f"expert {meta.config.hidden_size}x"
    try:
        models = json.loads((cache_dir() / "costmodel.json").read_text())
    except (OSError, ValueError):
        models = {}
    out["cost_models"] = {k: v for k, v in models.items() if shape in k and "emulated" not in k}
    return out


def cmd_info(args: argparse.Namespace) -> int:
    d = describe(args.model, args.experts, args.expert_group)
    d.update(offload_info(args))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    share = d["expert_parameters"] / d["parameters"] if d["parameters"] else 0.0
    lines = [
        f"model         {d['model']}",
        f"architecture  {d['architecture']} ({d['model_type']})",
        f"layers        {d['layers']} ({d['moe_layers']} MoE), hidden {d['hidden_size']}, "
        f"heads {d['attention_heads']} / {d['kv_heads']} KV, head_dim {d['head_dim']}",
        f"experts       {d['experts_per_layer']} per layer, top-{d['experts_per_token']}, "
        f"intermediate {d['expert_intermediate_size']}",
        f"vocab         {d['vocab_size']}, context {d['max_position_embeddings']}, KV cache "
        f"{d['kv_bytes_per_token'] / 1024:.1f} KiB per token ({d['dtype']})",
        f"parameters    {_count(d['parameters'])}: experts {_count(d['expert_parameters'])} ({share:.1%}), "
        f"non-expert {_count(d['non_expert_parameters'])}",
        f"weights       {_gb(d['checkpoint_bytes'])} in {d['shards']} file(s): "
        + ", ".join(f"{k} {_gb(v)}" for k, v in sorted(d["bytes_by_dtype"].items())),
        f"expert bytes  {_gb(d['routed_expert_bytes'])} routed experts as {_format_name(d)}, "
        f"{d['expert_bytes'] / 1e6:.2f} MB per expert",
    ]
    lines.append(f"cuda graphs   {d['cuda_graphs']}")
    if "placement" in d:
        lines.append(f"placement     {d['placement']['summary']}")
        if "expected_gpu_share" in d["placement"]:
            lines.append(
                f"              expected share of expert work on the GPU: {d['placement']['expected_gpu_share']:.1%}"
            )
    from cadenza.moe.costmodel import CostModel

    for key, entry in d["cost_models"].items():
        lines.append(f"cost model    {key}")
        cm = CostModel(**{**entry, "cpu_s": tuple(entry["cpu_s"]), "gpu_s": tuple(entry["gpu_s"])})
        lines.append(f"              {cm.describe()}")
    if not d["cost_models"]:
        lines.append("cost model    not measured on this machine yet (measured at the first offloaded run)")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
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
