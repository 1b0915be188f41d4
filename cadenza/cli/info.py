"""`cadenza info`: a checkpoint's architecture and sizes from its headers, and what a run on this machine would do
with it (placement for a budget, CUDA graphs, measured cost models), without loading the weights."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cadenza.cli.flags import add_command, add_expert_args, check_flags
from cadenza.errors import CadenzaError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "info",
        help="describe a checkpoint folder without loading its weights",
        description="Describes a checkpoint from its config and weights' headers, without loading the weights: "
        "family, parameters, experts and their bytes in each --experts format. With --gpu-memory it also shows "
        "which experts would sit on the GPU and the offload policy cadenza would choose.",
        examples=[
            "cadenza info -m ./Mixtral-8x7B-v0.1",
            "# the placement for a 24 GiB GPU with int8 experts, as JSON",
            "cadenza info -m mistralai/Mixtral-8x7B-v0.1 --gpu-memory 24GiB --experts int8 --json",
        ],
    )
    p.add_argument(
        "--model", "-m", required=True,
        help="checkpoint folder, .gguf file, or Hugging Face id ORG/NAME[@REVISION][:FILE] already in the hub cache "
        "(`cadenza pull ID` downloads it: info reads weights' headers, never downloads them)",
    )  # fmt: skip
    p.add_argument(
        "--gpu-memory",
        default=None,
        help="also show the placement for this GPU budget, e.g. 24GiB (24 alone is refused); with --gpus one "
        "for each GPU or one per GPU (24GiB,16GiB)",
    )
    p.add_argument(
        "--gpus", default=None,
        help="with --gpu-memory: the placement over several GPUs (e.g. 0,1): each GPU's layers and experts",
    )  # fmt: skip
    p.add_argument("--max-context", type=int, default=None, help="context the placement reserves KV cache for")
    p.add_argument("--dtype", default=None, help="compute dtype for the placement (default: checkpoint's)")
    p.add_argument("--placement", default=None, help="popularity JSON to choose residents by")
    p.add_argument(
        "--offload-policy",
        default="auto",
        choices=["auto", "cpu", "fetch"],
        help="the policy the placement is for: cpu keeps no fetch slots (default auto)",
    )
    p.add_argument(
        "--max-batch", type=int, default=1, help="sequences whose KV cache the placement reserves (default 1)"
    )
    p.add_argument(
        "--throughput",
        action="store_true",
        help="with --gpu-memory: the batch an offline job (cadenza batch) should run for prompts of --prompt-tokens "
        "generating --max-tokens each, and the tokens per second a step's roofline gives it",
    )
    p.add_argument(
        "--kv-cache", default="gpu", choices=["gpu", "host"],
        help="--throughput: plan for the KV cache on the GPU (default) or in host memory, attention on the CPU",
    )  # fmt: skip
    p.add_argument(
        "--micro-batches", type=int, default=1,
        help="--throughput --kv-cache host: plan with this many micro-batches overlapping the CPU's attention",
    )  # fmt: skip
    p.add_argument("--prompt-tokens", type=int, default=128, help="--throughput: tokens per prompt (default 128)")
    p.add_argument("--max-tokens", type=int, default=128, help="--throughput: tokens generated each (default 128)")
    p.add_argument(
        "--prefill-chunk", dest="pass_tokens", type=int, default=None, metavar="TOKENS",
        help="plan for forward passes of at most this many tokens (default 2048 as cadenza run / serve use; for "
        "--throughput 4096, as cadenza batch --prefill-chunk)",
    )  # fmt: skip
    add_expert_args(p, cache=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def describe(
    model_dir: str | Path, experts: str = "auto", expert_group: int | None = None, download: bool = True
) -> dict:
    """Architecture and sizes of a checkpoint, from config.json and the safetensors headers only; expert bytes as
    the routed experts would be stored with `experts` / `expert_group` (bf16: in the checkpoint's dtype). A hub id
    is downloaded when missing unless `download` is False (then it must be in the hub cache)."""
    import torch

    from cadenza.loader import build_meta, expected_tensors, open_checkpoint
    from cadenza.moe.experts import Experts
    from cadenza.moe.quantize import ExpertFormat

    fmt = ExpertFormat.of(experts, expert_group)
    ckpt = open_checkpoint(model_dir, download=download)
    model = build_meta(ckpt)
    cache = model.new_cache(1, ckpt.torch_dtype(), torch.device("meta"))  # its bytes per token and per sequence
    fmt = fmt.resolve(ckpt, model)
    config = model.config
    expert_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Experts)]
    expert_params = sum(m.num_parameters for _, m in expert_layers)
    prefixes = tuple(f"{n}." for n, _ in expert_layers)  # experts count by their weights, not stored elements
    all_params = expert_params + sum(
        _numel(shape)
        for name, shape in expected_tensors(model).items()
        if not (config.tie_word_embeddings and name == "lm_head.weight") and not name.startswith(prefixes)
    )
    first = expert_layers[0][1] if expert_layers else None
    if fmt.fmt == "blocks":  # per layer: Q4_K_M files mix q4_k and q4_k+q6_k layers
        per_layer = [m.expert_nbytes_as(f) for (_, m), f in zip(expert_layers, fmt.layer_formats, strict=True)]
    else:
        per_layer = [m.expert_nbytes_as(fmt.fmt, fmt.group, ckpt.torch_dtype()) for _, m in expert_layers]
    one_expert = max(per_layer, default=0)
    return {
        "model": str(ckpt.path),
        **({"hub_id": str(ckpt.hub_id)} if ckpt.hub_id else {}),
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
        "experts_format": fmt.describe(),
        "expert_group": fmt.group if fmt.packed and fmt.fmt != "blocks" else None,
        "expert_bytes": one_expert,  # one routed expert, as stored in experts_format (blocks: the largest layer's)
        **({"expert_formats_per_layer": list(fmt.layer_formats)} if fmt.fmt == "blocks" else {}),
        "routed_expert_bytes": sum(b * m.num_experts for b, (_, m) in zip(per_layer, expert_layers, strict=True)),
        "kv_bytes_per_token": cache.nbytes_per_token(),
        "kv_bytes_per_sequence": cache.nbytes_per_sequence(),
        "checkpoint_bytes": ckpt.total_bytes,
        "bytes_by_dtype": ckpt.bytes_by_dtype(),
        "dtype": str(ckpt.torch_dtype()).removeprefix("torch."),
        "shards": len(ckpt.files()),
        # GGUF: bytes per stored type in each tensor group (experts / attention / other)
        **({"gguf_types": ckpt.types_by_group()} if hasattr(ckpt, "types_by_group") else {}),
    }


def _format_name(d: dict) -> str:
    if "expert_formats_per_layer" in d:
        return f"{d['experts_format']} (the file's blocks, kept as they are)"
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
    from cadenza.cli.batch import JOB_PREFILL_CHUNK
    from cadenza.llm import DEFAULT_MAX_CONTEXT, check_prefill_chunk, resolve_dtype
    from cadenza.loader import build_meta, embedding_on_host, model_sizes, open_checkpoint
    from cadenza.moe.offload.planning import plan_offload
    from cadenza.moe.placement import load_popularity, parse_size

    out: dict = {}
    from cadenza.moe.quantize import ExpertFormat

    # the pass size the plans reserve activations for (None: the default of what runs them: cadenza run / serve's
    # for the placement, cadenza batch's for the throughput plan), once
    given = getattr(args, "pass_tokens", None)
    args.pass_tokens = check_prefill_chunk(given)
    args.job_pass_tokens = check_prefill_chunk(given, JOB_PREFILL_CHUNK)
    ckpt = open_checkpoint(args.model, download=False)
    meta = build_meta(ckpt)
    dtype = resolve_dtype(args.dtype, ckpt)
    fmt = ExpertFormat.of(args.experts, args.expert_group).resolve(ckpt, meta)
    # a GPU keeps a GGUF's quantized attention and LM head in their blocks (loader.keep_dense_blocks)
    dense = ckpt.dense_blocks([n for n, _ in meta.named_parameters()]) if hasattr(ckpt, "dense_blocks") else None
    # and one GPU keeps the token embedding table in host memory (loader.embedding_on_host), as LLM plans it
    host_embedding = not getattr(args, "gpus", None) and embedding_on_host(meta)
    sizes = model_sizes(meta, dtype, fmt.fmt, fmt.group, fmt.layer_formats, dense, host_embedding)
    if args.gpu_memory is not None:
        context = min(meta.config.context_length, args.max_context or DEFAULT_MAX_CONTEXT)
        if args.max_context is not None and args.max_context > meta.config.context_length:
            gguf = getattr(ckpt, "metadata", None) is not None
            source = "the GGUF file's context_length" if gguf else "config.json's max_position_embeddings"
            print(
                f"cadenza: --max-context {args.max_context} is beyond the model's context of "
                f"{meta.config.context_length} tokens ({source}): the placement "
                f"reserves KV cache for {context}.",
                file=sys.stderr,
            )
        pop = load_popularity(args.placement, sizes.num_moe_layers, sizes.num_experts) if args.placement else None
        if args.max_batch < 1:
            raise CadenzaError(f"--max-batch {args.max_batch} is not valid. Use a whole number of at least 1.")
        if getattr(args, "gpus", None):
            split_info(args, out, meta, sizes, dtype, context, pop)
            return _rest(args, out, meta, sizes, dtype, fmt)
        budget = parse_size(args.gpu_memory, "--gpu-memory")
        placement = plan_offload(
            sizes, meta.config, dtype, budget, args.offload_policy, context, args.max_batch, args.pass_tokens, pop
        )
        out["placement"] = {**placement.as_dict(), "summary": placement.summary()}
        if pop is not None:
            out["placement"]["expected_gpu_share"] = placement.expected_gpu_share(pop)
    return _rest(args, out, meta, sizes, dtype, fmt)


def split_info(args, out: dict, meta, sizes, dtype, context: int, pop) -> None:
    """--gpus: the layers' split and each GPU's placement (cadenza.moe.devices), as a run would make them; the
    GPUs need not be on this machine."""
    import torch

    from cadenza.layer_split import budgets_for, edge_bytes
    from cadenza.moe.devices import merged
    from cadenza.moe.offload.planning import plan_split

    names = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if len(names) < 2:
        raise CadenzaError(f"--gpus {args.gpus} names {len(names)} GPU; a split needs two or more (e.g. --gpus 0,1).")
    budgets = budgets_for(args.gpu_memory, [torch.device("cuda", i) for i in range(len(names))])
    shares = plan_split(
        sizes, meta.config, dtype, budgets, args.offload_policy, context, args.max_batch, args.pass_tokens, pop,
        edge_bytes=edge_bytes(meta, dtype),
    )  # fmt: skip
    whole = merged(shares)
    out["placement"] = {**whole.as_dict(), "summary": whole.summary()}
    out["placement"]["gpus"] = [
        {"gpu": names[s.device], "moe_layers": [s.first, s.stop], **s.placement.as_dict(), "summary": s.summary()}
        for s in shares
    ]
    if pop is not None:
        out["placement"]["expected_gpu_share"] = whole.expected_gpu_share(pop)


def _rest(args, out: dict, meta, sizes, dtype, fmt) -> dict:
    """What info adds after the placement: cost models, the throughput plan, graphs, the CPU's products."""
    import torch

    from cadenza.paths import cache_dir

    shape = f"expert {meta.config.hidden_size}x"
    try:
        models = json.loads((cache_dir() / "costmodel.json").read_text())
    except (OSError, ValueError):
        models = {}
    out["cost_models"] = {k: v for k, v in models.items() if shape in k and "emulated" not in k}
    if getattr(args, "throughput", False):
        out["throughput"] = throughput_info(args, meta, sizes, dtype, out["cost_models"])

    from cadenza.graphs import StepGraphs

    cuda = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus = len([g for g in args.gpus.split(",") if g.strip()]) if getattr(args, "gpus", None) else None
    out["cuda_graphs"] = StepGraphs(meta, cuda).describe(gpus)  # what a run on this machine would do
    out["cpu_activations"] = cpu_activations(fmt, dtype)
    return out


def cpu_activations(fmt, dtype) -> str:
    """How the CPU kernel would multiply this model's experts here (--cpu-activations), in words."""
    from cadenza.kernels import cpu_moe

    taking = cpu_moe.int8_formats(fmt.layer_formats or (fmt.fmt,), dtype)
    if not taking:
        return "exact (activations as they are)"
    return f"int8 activations for the {', '.join(taking)} experts (--cpu-activations exact: as they are)"


def throughput_info(args: argparse.Namespace, meta, sizes, dtype, cost_models: dict) -> dict:
    """`--throughput`: the batch plan (cadenza.moe.offload.throughput) for this model and budget, with the link
    bandwidth and GPU times of the cost model measured here (per token: the largest-batch slope of its GPU expert
    time; per step: its one-token time; each times top-k and the MoE layers), else assumed values, said so."""
    from cadenza.llm import check_micro_batches
    from cadenza.moe.offload.costmodel import from_dict
    from cadenza.moe.offload.throughput import host_kv_room, plan_job, step_rates
    from cadenza.moe.placement import parse_size

    if args.gpu_memory is None:
        raise CadenzaError("--throughput plans a batch for a GPU budget. Add --gpu-memory SIZE (e.g. 24GiB).")
    for flag, value in (("--prompt-tokens", args.prompt_tokens), ("--max-tokens", args.max_tokens)):
        if value < 1:
            raise CadenzaError(f"{flag} {value} is not valid. Use a whole number of at least 1.")
    check_micro_batches(args.micro_batches, args.kv_cache)
    k = getattr(meta.config, "num_experts_per_tok", 2)
    models = []
    for key, entry in cost_models.items():
        try:
            models.append((key, from_dict(entry)))
        except (KeyError, TypeError, ValueError):
            continue
    rates = step_rates(models, k, sizes.num_moe_layers)
    budget = parse_size(args.gpu_memory, "--gpu-memory")
    plan = plan_job(sizes, meta.config, dtype, budget, args.prompt_tokens, args.max_tokens, rates, args.kv_cache,
                    args.micro_batches, host_kv_room(sizes), getattr(args, "job_prompts", 0),
                    args.job_pass_tokens)  # fmt: skip
    return {**plan.as_dict(), "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "micro_batches": args.micro_batches, "prefill_chunk": args.job_pass_tokens,
            "summary": plan.summary()}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    if args.placement is not None and args.gpu_memory is None:
        print(
            f"cadenza: --placement {args.placement} is ignored without --gpu-memory: it shows the placement and the "
            "expected share of expert work on the GPU for a budget. Add --gpu-memory SIZE (e.g. 24GiB).",
            file=sys.stderr,
        )
    from cadenza.moe.placement import format_size

    d = describe(args.model, args.experts, args.expert_group, download=False)
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
        f"{d['kv_bytes_per_token'] / 1024:.1f} KiB per token ({d['dtype']})"
        + (f" + {format_size(d['kv_bytes_per_sequence'])} per sequence" if d["kv_bytes_per_sequence"] else ""),
        f"parameters    {_count(d['parameters'])}: experts {_count(d['expert_parameters'])} ({share:.1%}), "
        f"non-expert {_count(d['non_expert_parameters'])}",
        f"weights       {_gb(d['checkpoint_bytes'])} in {d['shards']} file(s): "
        + ", ".join(f"{k} {_gb(v)}" for k, v in sorted(d["bytes_by_dtype"].items())),
        f"expert bytes  {_gb(d['routed_expert_bytes'])} routed experts as {_format_name(d)}, "
        f"{d['expert_bytes'] / 1e6:.2f} MB per expert",
    ]
    for group, types in d.get("gguf_types", {}).items():
        stored = ", ".join(f"{k} {_gb(v)}" for k, v in sorted(types.items()))
        lines.append(f"gguf {group.replace('attention', 'attn'):<9}{stored}")  # (the label column is 14 wide)
    lines.append(f"cuda graphs   {d['cuda_graphs']}")
    lines.append(f"cpu products  {d['cpu_activations']}")
    if "placement" in d:
        lines.append(f"placement     {d['placement']['summary']}")
        for g in d["placement"].get("gpus", []):
            lines.append(f"              GPU {g['gpu']}: {g['summary'].partition(': ')[2]}")
        if "expected_gpu_share" in d["placement"]:
            lines.append(
                f"              expected share of expert work on the GPU: {d['placement']['expected_gpu_share']:.1%}"
            )
    from cadenza.moe.offload.costmodel import from_dict

    for key, entry in d["cost_models"].items():
        lines.append(f"cost model    {key}")
        try:
            lines.append(f"              {from_dict(entry).describe()}")
        except (KeyError, TypeError, ValueError):
            lines.append("              measured by an older cadenza: measured again at the next offloaded run")
    if not d["cost_models"]:
        lines.append("cost model    not measured on this machine yet (measured at the first offloaded run)")
    if "throughput" in d:
        t = d["throughput"]
        lines.append(f"throughput    {t['prompt_tokens']} + {t['max_tokens']} tokens a prompt: {t['summary']}")
        run = f"cadenza batch --max-batch {t['max_batch']} --max-context {t['prompt_tokens'] + t['max_tokens']}"
        from cadenza.cli.batch import JOB_PREFILL_CHUNK

        if t["prefill_chunk"] != JOB_PREFILL_CHUNK:
            run += f" --prefill-chunk {t['prefill_chunk']}"
        if t["kv_on_host"]:
            micro = f" --micro-batches {t['micro_batches']}" if t["micro_batches"] > 1 else ""
            lines.append(f"              run it: {run} --kv-cache host{micro}")
        else:
            lines.append(
                f"              run it: {run} (KV cache on the GPU); with it in host memory and attention on the CPU "
                f"the same step could hold ~{t['host_kv_batch']} (plan it: --kv-cache host)"
            )
    print("\n".join(lines))
    return 0
