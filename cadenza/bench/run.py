"""`cadenza bench`'s run: the transformers baseline, cadenza's configurations one after another on one built model,
the peer's rows, each result written as soon as it is measured. What to run: cadenza.bench.scenarios."""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from cadenza.bench.report import BenchResult, plot_budget_sweep, result_path, write_results
from cadenza.bench.scenarios import (
    D1_BUDGET_GIB,
    EXPERT_FORMAT,
    GGUF_EXPERTS,
    GGUF_LOAD_TARGET_S,
    SOLO,
    command_line,
    parse_budgets,
    parse_policies,
    parse_scenarios,
    plan_configs,
    random_prompt,
)
from cadenza.bench.throughput_job import (
    T_BUDGET_GIB,
    T_NEW_TOKENS,
    T_PROMPT_TOKENS,
    T_PROMPTS,
    job_prompts,
    parse_runs,
    run_job,
)
from cadenza.errors import CadenzaError
from cadenza.moe.cpu import physical_cores
from cadenza.moe.placement import GiB

BASELINE_NEW_TOKENS = 8  # seconds per token: the transformers baseline decodes few tokens (benchmarks/README.md)
PROFILE_STEPS = 8  # decode steps profiled per configuration (--profile-step)
ERROR_LAYERS = 4  # D3 / D4 measure quantization error on the model's first layers (bf16 copy on the GPU)


# --- the run -------------------------------------------------------------------------------------------------------


class _Log:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[bench {time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


def _machine_line(machine: dict) -> str:
    return (
        f"machine: {machine['gpu_name'] or 'no GPU'}, {machine['cpu_model']} ({machine['physical_cores']} cores); "
        f"DRAM read {machine['dram_read_gb_s']} GB/s, pinned H2D {machine['pinned_h2d_gb_s']} GB/s, "
        f"GPU read {machine['gpu_mem_bw_gb_s']} GB/s"
    )


def results_dir(out: str | None) -> Path:
    """Where results go: --out; by default ./benchmarks/results inside a cadenza checkout (where the results are
    committed), else the cache's bench folder (not whatever folder the user stands in)."""
    if out:
        return Path(out)
    here = Path.cwd()
    if (here / "benchmarks" / "results").is_dir() and (here / "cadenza" / "bench").is_dir():
        return here / "benchmarks" / "results"
    from cadenza.paths import cache_dir

    return cache_dir() / "bench"


def _expert_storage(llm) -> str:
    """How the host experts are held: the layers' formats ("q4_k+q6_k", "mxfp4", "int4", "bf16"), as loaded."""
    from cadenza.loader import expert_layers

    formats = sorted({m.expert_format for _, m in expert_layers(llm.model)})
    return ", ".join(formats) or llm.expert_format.fmt


def _describe(r: dict) -> str:
    if r.get("skipped"):
        return "  " + "; ".join(r["notes"])
    parts = []
    if r.get("decode_tok_s") is not None:
        trials = r.get("decode_tok_s_trials") or []
        spread = f" (trials {min(trials):.2f}-{max(trials):.2f})" if len(trials) > 1 else ""
        parts.append(f"decode {r['decode_tok_s']:.2f} tok/s{spread}")
    if r.get("prefill_tok_s") is not None:
        parts.append(f"prefill {r['prefill_tok_s']:.1f} tok/s, TTFT {r['ttft_s']:.3f} s")
    if r.get("roofline_fraction") is not None:
        parts.append(f"roofline {r['roofline_fraction']:.2f}")
    if r.get("peak_gpu_mem_gib") is not None:
        parts.append(f"peak GPU {r['peak_gpu_mem_gib']:.1f} GiB")
    return "  -> " + ", ".join(parts)


def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--trials", args.trials),
        ("--prompt-tokens", args.prompt_tokens),
        ("--new-tokens", args.new_tokens),
        ("--cpu-threads", args.cpu_threads),
    ):
        if value is not None and value < 1:
            raise CadenzaError(f"{flag} {value} is not valid. Give a whole number of at least 1.")


def run_bench(args: argparse.Namespace) -> int:
    """`cadenza bench`: measures the chosen scenarios and writes one JSON file per scenario. Returns 0."""
    from cadenza.bench.baseline_hf import baseline_unavailable
    from cadenza.bench.machine import machine_info
    from cadenza.bench.synthetic import SyntheticCheckpoint
    from cadenza.cli.flags import expert_kwargs
    from cadenza.llm import resolve_device

    _check_args(args)
    scenarios = parse_scenarios(args.scenario)
    budgets = parse_budgets(args.budgets)
    device = resolve_device(args.device)
    for s, (solo_model, _) in SOLO.items():
        if s in scenarios and len(scenarios) > 1:
            raise CadenzaError(f"{s} measures another model ({solo_model}): run --scenario {s} on its own.")
    default, cpu_default = SOLO.get(scenarios[0], ("mixtral-8x7b", None))
    model = args.model or (default if device.type == "cuda" else cpu_default or "mixtral-tiny")
    ckpt = SyntheticCheckpoint(model, seed=args.seed)
    if scenarios[0] in T_BUDGET_GIB:  # an offline job's throughput: its own flow (cadenza.bench.throughput_job)
        return _run_throughput(args, scenarios[0], model, ckpt, device, expert_kwargs(args))
    if args.runs is not None:
        raise CadenzaError(f"--runs chooses T1 / T2's rows; --scenario {args.scenario} has none. Leave it out.")
    for flag, given in (("--prefill-chunk", args.pass_tokens is not None), ("--no-timeline", args.no_timeline)):
        if given:
            raise CadenzaError(f"{flag} is for T1 / T2's jobs; --scenario {args.scenario} has none. Leave it out.")
    baseline = args.baseline if args.baseline is not None else device.type == "cuda"
    baseline = baseline and "D1" in scenarios
    if args.baseline and baseline_unavailable(device):
        raise CadenzaError(f"--baseline: {baseline_unavailable(device)}.")
    all_configs = plan_configs(scenarios, budgets, args.prompt_tokens, args.new_tokens, args.budget)
    policies = parse_policies(args.policies)
    configs = [c for c in all_configs if c.scenario == "S1" or c.policy in policies]
    if not configs and not baseline:
        raise CadenzaError("Nothing to measure: --policies none leaves no configuration and no baseline.")
    max_context = max((c.prompt_tokens + c.new_tokens for c in configs), default=2)
    if args.profile_step:  # the profile decodes a warm-up, an unprofiled and a profiled run after the prompt
        max_context = max(max_context, max(c.prompt_tokens for c in configs) + 3 * PROFILE_STEPS + 1)
    if max_context > ckpt.config["max_position_embeddings"]:
        raise CadenzaError(
            f"The longest request ({max_context} tokens) exceeds {model}'s context of "
            f"{ckpt.config['max_position_embeddings']}. Lower --prompt-tokens / --new-tokens."
        )
    peer = None
    if args.peer:  # a bad --peer is refused before anything is built
        from cadenza.bench.llama_cpp_peer import peer_request

        file_format = EXPERT_FORMAT.get(scenarios[0]) or GGUF_EXPERTS.get(scenarios[0])
        peer = peer_request(args.peer, args.peer_dir, scenarios[0], file_format, ckpt, configs)
    log = _Log()
    command = command_line(args, model, device)
    log(
        f"{command}\n  {model}: {ckpt.total_bytes / 1e9:.1f} GB bf16; {len(configs)} configurations, each 1 warm-up + "
        f"{args.trials} trials{'; transformers baseline first' if baseline else ''}"
    )
    machine = machine_info(device)
    log(_machine_line(machine))
    files = {s: result_path(results_dir(args.out), s, machine["gpu_name"], tag=args.tag) for s in scenarios}
    results: dict[str, list[dict]] = {s: [] for s in scenarios}

    def add(scenario: str, result: dict) -> None:
        results[scenario].append(result)
        write_results(files[scenario], command, machine, results[scenario], complete=False)
        log(_describe(result))

    if baseline:
        add("D1", _run_baseline(ckpt, all_configs, device, machine, log, args.seed))
    if not configs:
        return 0
    add_row = add  # the peer's rows: without cadenza's quantization error
    expert_args = expert_kwargs(args)
    fmt = EXPERT_FORMAT.get(scenarios[0])
    if fmt is not None:  # D3 / D4 fix the format
        if args.experts not in ("auto", "bf16", fmt):
            raise CadenzaError(f"{scenarios[0]} measures {fmt} experts; --experts {args.experts} contradicts it.")
        expert_args["experts"] = fmt
        from cadenza.bench.quant_error import quantization_error

        log(f"{scenarios[0]}: {fmt} vs bf16 output error on {model} cut to {ERROR_LAYERS} layers ...")
        error = quantization_error(model, fmt, device, args.seed, ERROR_LAYERS, expert_args["expert_group"])
        log(
            f"  relative logit error {error['relative_logit_error']:.4f}, top-1 agreement {error['top1_agreement']:.3f}"
        )
        add = _with_error(add, error)

    gguf_format = GGUF_EXPERTS.get(scenarios[0])
    written = None
    if gguf_format is not None:  # G1 / G2 / O1 / Z1: the file both systems load, written once (its folder: the peer's)
        from cadenza.bench.llama_cpp_peer import write_peer_gguf

        folder = peer[1] if peer is not None else _gguf_folder(args.peer_dir)
        written = write_peer_gguf(folder, ckpt, gguf_format, scenarios[0], log)
    try:
        _run_cadenza(args, ckpt, device, configs, expert_args, written, model, max_context, machine, add, log)
        peer_error = None
        if peer is not None:
            peer_error = _run_peer(args, peer, ckpt, fmt, written, scenarios[0], configs, machine, add_row, log)
    finally:
        if written is not None:
            written.path.unlink(missing_ok=True)
            log(f"deleted {written.path}")

    for s in scenarios:
        write_results(files[s], command, machine, results[s], complete=True)
        log(f"wrote {files[s]}")
    if "S1" in scenarios:
        png = plot_budget_sweep(
            results["S1"],
            files["S1"].with_suffix(".png"),
            title=f"{model} decode vs GPU budget ({machine['gpu_name'] or 'CPU only'})",
        )
        if png:
            log(f"wrote {png}")
    if peer_error is not None:
        raise peer_error
    return 0


def _run_throughput(args, scenario: str, model: str, ckpt, device: torch.device, expert_args: dict) -> int:
    """T1 / T2: one model built, the job run with the KV cache on the GPU and then on the host (throughput_job)."""
    from cadenza.bench.machine import machine_info

    n = args.prompts or T_PROMPTS
    p, m = args.prompt_tokens or T_PROMPT_TOKENS, args.new_tokens or T_NEW_TOKENS
    # (the emulated GPU side: half the model's bytes, so some experts are off it)
    budget = T_BUDGET_GIB[scenario] * GiB if device.type == "cuda" else ckpt.total_bytes // 2 + GiB
    log = _Log()
    command = command_line(args, model, device)
    log(f"{command}\n  {model}: {ckpt.total_bytes / 1e9:.1f} GB bf16; {n} prompts of {p} tokens -> {m} each")
    machine = machine_info(device)
    log(_machine_line(machine))
    path = result_path(results_dir(args.out), scenario, machine["gpu_name"], tag=args.tag)
    rows: list[dict] = []

    def add(s: str, row: dict) -> None:
        rows.append({**row, "model": model, "device": str(device), "cpu_experts": None})
        write_results(path, command, machine, rows, complete=False)
        keys = ("generate_mode", "kv_cache", "micro_batches", "max_batch", "throughput_tok_s", "roofline_fraction",
                "skipped")  # fmt: skip
        log(", ".join(f"{k}={row[k]}" for k in keys if k in row))

    peer = _throughput_peer(args, scenario, expert_args, ckpt)  # refused before anything is built
    runs = parse_runs(args.runs)
    from cadenza.bench.llama_batched import parse_parallel

    parallel = parse_parallel(getattr(args, "peer_parallel", None))
    if runs:
        _throughput_rows(args, scenario, ckpt, device, expert_args, budget, (n, p, m), machine, path, runs, add, log)
    elif peer is None:
        raise CadenzaError("--runs none measures only the peer: add --peer llama.cpp=PATH/llama-batched-bench.")
    if peer is not None:  # llama-batched-bench on the same model as a Q4_0 GGUF, cadenza's model freed first
        from cadenza.bench import llama_batched
        from cadenza.bench.llama_cpp_peer import write_peer_gguf

        written = write_peer_gguf(peer[1], ckpt, "int4", f"{scenario} llama.cpp", log)
        try:
            threads = args.cpu_threads or physical_cores()
            llama_batched.measure(peer[0].path, written, scenario, budget / GiB, p, m, threads, add, log, parallel)
        finally:
            written.path.unlink(missing_ok=True)
            log(f"deleted {written.path}")
    write_results(path, command, machine, rows, complete=True)
    log(f"wrote {path}")
    return 0


def _throughput_rows(args, scenario, ckpt, device, expert_args, budget, job, machine, path, runs, add, log) -> None:
    """cadenza's rows of T1 / T2: the model built once at the budget, then the job for each of `runs`."""
    from cadenza.bench.machine import rss_gib
    from cadenza.cli.batch import JOB_PREFILL_CHUNK
    from cadenza.llm import LLM, check_prefill_chunk

    n, p, m = job
    job_chunk = check_prefill_chunk(args.pass_tokens, JOB_PREFILL_CHUNK)  # (as cadenza batch runs it)
    log(f"building cadenza's model on {device} at {budget / GiB:.1f} GiB; host RSS {rss_gib()} GiB ...")
    llm = LLM(checkpoint=ckpt, device=str(device), gpu_memory=budget, offload_policy="auto", max_context=p + m,
              cpu_threads=args.cpu_threads, cuda_graphs=not args.no_cuda_graphs, prefill_chunk=job_chunk,
              **expert_args)  # fmt: skip
    ckpt.release()
    storage = _expert_storage(llm)
    try:
        prompts = job_prompts(n, p, ckpt.config["vocab_size"], args.seed)
        tl = None if args.no_timeline else path.with_name(f"{path.stem}-timeline")
        row = lambda s, r: add(s, {**r, "cpu_experts": storage})  # noqa: E731
        run_job(llm, scenario, prompts, m, budget, machine, row, log, tl, runs)
    finally:
        llm.close()
    del llm
    gc.collect()


def _throughput_peer(args, scenario: str, expert_args: dict, ckpt):
    """(peer, GGUF folder) for T1 / T2's --peer (PATH: llama-batched-bench), or None; refused unless the experts
    are int4 (the peer's file has Q4_0 experts: the same bytes a weight)."""
    if not args.peer:
        return None
    from cadenza.bench.gguf_export import gguf_plan, import_gguf
    from cadenza.bench.llama_cpp_peer import check_disk, parse_peers

    [peer, *more] = parse_peers(args.peer)
    if more:
        raise CadenzaError("--peer: one peer per run.")
    if expert_args.get("experts") != "int4":
        raise CadenzaError(
            f"--peer {peer.name} in {scenario} compares int4 experts with llama.cpp's Q4_0: add --experts int4."
        )
    import_gguf()
    folder = _gguf_folder(args.peer_dir)
    check_disk(folder, gguf_plan(ckpt, "int4").file_bytes_bound())
    return peer, folder


def _gguf_folder(peer_dir: str | None):
    import tempfile
    from pathlib import Path

    return Path(peer_dir or tempfile.gettempdir()).expanduser()


def _run_cadenza(args, ckpt, device, configs, expert_args, written, model, max_context, machine, add, log) -> None:
    """Builds cadenza's model (from the synthetic checkpoint, or with its loader from the GGUF `written`), measures
    every configuration and frees the model (the peer runs after, with host memory and GPU to itself)."""
    from cadenza.bench.machine import rss_gib
    from cadenza.bench.measure import CadenzaUnderTest

    first = _first_fitting(configs, ckpt, device)
    what = (
        f"loading {written.path}"
        if written is not None
        else f"building cadenza's model ({ckpt.total_bytes / 1e9:.1f} GB)"
    )
    log(f"{what} on {device} at {first.budget} GiB; host RSS {rss_gib()} GiB ...")
    cut = CadenzaUnderTest(
        ckpt,
        device,
        first,
        max_context,
        args.cpu_threads,
        prefetch={"auto": None, "on": True, "off": False}[args.prefetch],
        eviction=args.eviction,
        cuda_graphs=not args.no_cuda_graphs,
        gguf=written.path if written is not None else None,
        devices=getattr(args, "gpus", None),
        other_bytes=written.plan.other_bytes() if written is not None else None,
        **expert_args,
    )
    ckpt.release()  # the loader copied every tensor it keeps; the pools are ~1 GB of host memory
    log(f"{'loaded' if written is not None else 'built'} in {cut.load_s:.1f} s; host RSS {rss_gib()} GiB")
    if written is not None:
        add = _with_gguf(add, written, cut, first.budget)
    try:
        for cfg in configs:
            _run_config(cut, cfg, args, model, max_context, machine, add, log)
    finally:
        cut.close()
    del cut
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"cadenza's model freed; host RSS {rss_gib()} GiB")


def _run_peer(args, peer, ckpt, fmt, written, scenario, configs, machine, add, log) -> CadenzaError | None:
    """The peer's rows (after cadenza's, with its model freed: host memory and GPU are the peer's): on the GGUF
    cadenza loaded (G1 / G2 / O1 / Z1), else on one written from `ckpt` in `fmt` and deleted. Returns its failure, if
    any: its rows say skipped and why, and the files are completed first."""
    from cadenza.bench.llama_cpp_peer import LlamaCppPeer

    runner = LlamaCppPeer(*peer, args.cpu_threads or physical_cores(), args.trials, machine, log)
    try:
        if written is not None:
            runner.measure_file(scenario, written, configs, add)
        else:
            runner.run(scenario, ckpt, fmt, configs, add)
    except CadenzaError as e:
        return e
    return None


def _with_gguf(add, written, cut, budget):
    """`add` that records the GGUF cadenza loaded, and how long loading it took, next to every cadenza result."""
    plan = written.plan
    types: dict[str, int] = {}
    for t in plan.tensors:
        types[t.qtype] = types.get(t.qtype, 0) + t.nbytes
    facts = {
        "gguf": {
            "file": written.path.name,
            "bytes": written.nbytes,
            "bytes_by_type": types,
            "expert_types": plan.expert_qtype,
            "write_s": round(written.seconds, 3),
            "load_s": round(cut.load_s, 3),  # LLM(path, ...) to ready to generate, the file just written (warm cache)
            "load_budget_gib": budget,
            "load_target_s": GGUF_LOAD_TARGET_S,
        }
    }
    return lambda scenario, result: add(scenario, {**result, **facts})


def _with_error(add, error: dict):
    """`add` that records the format's measured output error next to every result."""
    return lambda scenario, result: add(scenario, {**result, "error_vs_bf16": error})


def _run_config(cut, cfg, args: argparse.Namespace, model: str, max_context: int, machine: dict, add, log) -> None:
    """Measures one cadenza configuration (or records why it was skipped) and hands the result to `add`."""
    from cadenza.bench.measure import SYSTEM, measure

    log(
        f"{cfg.scenario} cadenza policy={cfg.policy} budget={cfg.budget} GiB, {cfg.prompt_tokens} -> "
        f"{cfg.new_tokens} tokens"
    )
    ckpt = cut.ckpt
    result = BenchResult(
        scenario=cfg.scenario,
        system=SYSTEM,
        model=model,
        cpu_experts=_expert_storage(cut.llm),
        policy=cfg.policy,
        gpu_budget_gib=cfg.budget,
        prompt_tokens=cfg.prompt_tokens,
        new_tokens=cfg.new_tokens,
        device=str(cut.device),
        trials=args.trials,
        model_bytes=ckpt.total_bytes,
        max_context=max_context,
    )
    prompt = random_prompt(cfg.prompt_tokens, ckpt.config["vocab_size"], args.seed)
    try:
        measure(cut, cfg, result, prompt, args.trials, machine)
    except CadenzaError as e:
        result.skip(str(e))
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        result.skip(f"out of GPU memory: {str(e).splitlines()[0]}")
    out = {**result.as_dict(), **kv_cache_facts(cut.llm), "cuda_graphs": cut.llm.engine.graphs.describe()}
    orch = cut.llm.orchestra
    if cut.llm.split is not None:  # several GPUs: each one's layers and experts (the budget is each GPU's)
        out["gpus"] = [{"device": str(cut.llm.devices[s.device]), "summary": s.summary()} for s in orch.shares]
    if orch is not None:  # how the decode layers hand the CPU its share (cadenza.moe.offload.streamed)
        out["cpu_launch"] = "stream" if orch.streamed is not None else f"host sync per layer ({orch.streamed_reason})"
        # the expert kernel's threads and torch's intra-op threads in this process (rows differ by either)
        out["threads"] = {"cpu_experts": orch.worker.threads, "torch": torch.get_num_threads()}
        # the CPU kernel's software prefetch distance for decode and its one-token time per expert, as calibrated
        # (on the box the distance moved the kernel by up to 30%: benchmarks/results/2026-12-03-s19/tile-memory.txt)
        one = None if orch.cpu_one_s is None else round(orch.cpu_one_s * 1e3, 3)
        out["cpu_prefetch"] = {"bytes": orch.cpu_prefetch, "one_expert_ms": one}
        from cadenza.kernels import cpu_moe

        # K-quant experts on the CPU: int8 activations or exact products (CADENZA_CPU_ACTIVATIONS)
        out["cpu_activations"] = cpu_moe.activations_label(cut.llm.dtype, orch.options.cpu_activations)
        if orch.streamed is not None:  # how the stream hands a layer over: the worker thread or a host function
            out["cpu_handoff"] = {"launch": orch.streamed.launch, "reason": orch.streamed.launch_reason}
            if orch.options.zero_copy != 0:  # CADENZA_ZERO_COPY: the GPU's share of each token's host experts
                s = orch.streamed
                asked = "auto" if orch.options.zero_copy is None else orch.options.zero_copy
                out["zero_copy"] = {"asked": asked, "share": orch.zero_copy_share, "unavailable": s.zero_copy_reason}
    if args.profile_step and cfg.new_tokens > 1 and not out.get("skipped"):
        from cadenza.bench.step_profile import profile_decode

        graphs = cut.llm.engine.graphs.enabled
        try:
            prof = profile_decode(cut.llm, prompt, steps=PROFILE_STEPS, warmup=PROFILE_STEPS, eager=not graphs)
        except CadenzaError as e:
            out["step_profile"] = {"error": str(e)}
            log(f"step profile failed: {e}")
        else:
            out["step_profile"] = prof.as_dict()
            log("step profile" + (" (CUDA graphs: totals only)" if graphs else "") + "\n" + prof.table())
    add(cfg.scenario, out)


def kv_cache_facts(llm) -> dict:
    """KV-cache bytes per token of context (all layers, compute dtype) as cadenza stores them, and for multi-head
    latent attention (DeepSeek) what per-head keys and values would take instead."""
    out = {"kv_bytes_per_token": llm.sizes.kv_bytes_per_token}
    c = llm.config
    if hasattr(c, "kv_lora_rank"):  # MLA: the cache holds the latent and the rope key, shared by every head
        elem = torch.empty((), dtype=llm.dtype).element_size()
        per_head = c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim  # key + value of one head
        out["kv_bytes_per_token_decompressed"] = c.num_hidden_layers * c.num_attention_heads * per_head * elem
    return out


def _first_fitting(configs, ckpt, device: torch.device):
    """The configuration to build with: the first whose budget fits the GPU (placement is re-done per config)."""
    if device.type != "cuda":
        return configs[0]
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory
    for cfg in configs:
        need = ckpt.total_bytes if cfg.budget == "all" else cfg.budget * (1 << 30)
        if need < gpu_bytes:
            return cfg
    return configs[0]


def _run_baseline(ckpt, configs, device: torch.device, machine: dict, log, seed: int) -> dict:
    """D1's transformers+accelerate row: measured, or skipped with the reason."""
    from cadenza.bench.baseline_hf import SYSTEM, baseline_unavailable, run_transformers_offload

    d1 = next(c for c in configs if c.scenario == "D1")
    new_tokens = min(BASELINE_NEW_TOKENS, d1.new_tokens)
    prompt = random_prompt(d1.prompt_tokens, ckpt.config["vocab_size"], seed)  # the same prompt as cadenza's D1
    skipped = BenchResult(
        scenario="D1",
        system=SYSTEM,
        model=ckpt.name,
        policy="device_map",
        gpu_budget_gib=D1_BUDGET_GIB,
        prompt_tokens=d1.prompt_tokens,
        new_tokens=new_tokens,
        device=str(device),
        model_bytes=ckpt.total_bytes,
    )
    reason = baseline_unavailable(device)
    if reason:
        log(f"baseline skipped: {reason}")
        return skipped.skip(reason).as_dict()
    log(
        f"D1 {SYSTEM}: building the transformers model ({ckpt.total_bytes / 1e9:.1f} GB), then "
        f"{d1.prompt_tokens} -> {new_tokens} tokens (seconds per token) ..."
    )
    try:
        return run_transformers_offload(ckpt, D1_BUDGET_GIB, prompt, new_tokens, trials=1, machine=machine)
    except CadenzaError as e:
        return skipped.skip(str(e)).as_dict()
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return skipped.skip(f"out of GPU memory: {str(e).splitlines()[0]}").as_dict()
