"""`cadenza bench`: the scenarios of benchmarks/README.md on a synthetic full-size model, in one command.

The model is built once per run and re-planned between configurations (rebuilding 93 GB costs a minute). The
transformers baseline runs first, before cadenza's copy of the model exists, and is freed: host memory holds one
copy at a time. Results are written after every configuration, so a run cut short keeps what it measured.

This module says what a run measures (the scenarios, the command line, the configurations they expand to);
cadenza.bench.run runs them.
"""

from __future__ import annotations

import argparse
import shlex
from typing import TYPE_CHECKING

from cadenza.errors import CadenzaError

SCENARIOS = ("D1", "P1", "S1", "F1", "F2", "D3", "D4", "F3", "F4", "G1", "G2", "O1", "Z1", "R1", "T1", "T2")
if TYPE_CHECKING:
    import torch

DEFAULT_SCENARIOS = "D1,P1,S1"  # F1 and F2 run other models: ask for each alone
D1_BUDGET_GIB = 24
F1_BUDGET_GIB = 8  # qwen3-30b-a3b: 48 layers, 8 small experts per token: where per-call overhead shows
F1_MODEL = "qwen3-30b-a3b"
F2_BUDGET_GIB = 6  # deepseek-v2-lite: MLA, a dense first layer, 2 shared + 6 of 64 routed experts per token
F2_MODEL = "deepseek-v2-lite"
F2_CPU_MODEL = "deepseek-v2-tiny"  # its layout at laptop size, for runs without CUDA
F1_CPU_MODEL = "qwen3-tiny"
G2_CPU_MODEL = "qwen3-tiny-256"  # qwen3-tiny's experts have rows of 128: no whole K-quant blocks
O1_MODEL = "gpt-oss-120b"  # 36 layers of 128 MXFP4 experts (top-4): a 61 GB file, mostly experts
Z1_MODEL = "glm-4.5-air"  # 45 MoE layers of 128 experts (top-8) + a shared one; int4: bf16 does not fit the host
R1_MODEL = "olmoe-1b-7b"  # every expert resident on the GPU: what is left is per-step overhead and HBM bandwidth
# scenario -> (model, model without CUDA)
SOLO = {
    "F1": (F1_MODEL, None),
    "F2": (F2_MODEL, F2_CPU_MODEL),
    "D3": ("mixtral-8x7b", None),
    "D4": ("mixtral-8x7b", None),
    "F3": (F1_MODEL, F1_CPU_MODEL),
    "F4": (F1_MODEL, F1_CPU_MODEL),
    "G1": ("mixtral-8x7b", None),
    "G2": (F1_MODEL, G2_CPU_MODEL),
    "O1": (O1_MODEL, "gpt-oss-tiny"),
    "Z1": (Z1_MODEL, "glm-4.5-air-tiny"),
    "R1": (R1_MODEL, None),
    "T1": ("mixtral-8x7b", None),  # offline jobs (cadenza.bench.throughput_job)
    "T2": (F1_MODEL, F1_CPU_MODEL),
}
EXPERT_FORMAT = {"D3": "int8", "D4": "int4", "F3": "int8", "F4": "int4"}  # scenarios with quantized experts
# their GPU budgets: D1's / F1's budget, and every expert on the host
QUANT_BUDGETS = {"D3": (D1_BUDGET_GIB, 0), "D4": (D1_BUDGET_GIB, 0), "F3": (F1_BUDGET_GIB, 0), "F4": (F1_BUDGET_GIB, 0)}
# scenarios measured on a GGUF file written once per run, which cadenza loads with its own loader (LLM(path)) and
# llama.cpp (--peer) benchmarks as it is: the file's expert types (cadenza.bench.gguf_export), the budgets as above
# O1: gpt-oss's MXFP4 experts (random blocks), Z1: GLM-4.5-Air's experts in Q4_0 (quantized from the weights)
GGUF_EXPERTS = {"G1": "q4_k_m", "G2": "q4_k_m", "O1": "mxfp4", "Z1": "int4"}
QUANT_BUDGETS |= {"G1": (D1_BUDGET_GIB, 0), "G2": (F1_BUDGET_GIB, 0), "O1": (D1_BUDGET_GIB, 0), "Z1": (D1_BUDGET_GIB,)}
GGUF_LOAD_TARGET_S = 30  # the target: a 26 GB GGUF ready to generate, from a warm page cache, at 24 GiB
QUANT_PREFILL = 512
D1_POLICIES = ("auto", "cpu", "fetch")
P1_POLICIES = ("auto", "cpu")
P1_PROMPTS = (512, 2048)
DEFAULT_BUDGETS = "0,12,24,48,all"


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `cadenza bench` on the CLI's subparsers; its `func` is `run_bench` (cadenza.bench.run)."""
    from cadenza.bench.models import SYNTHETIC_MODELS
    from cadenza.cli.flags import add_command, add_expert_args, add_graph_args, advanced

    p = add_command(
        subparsers,
        "bench",
        help="benchmark scenarios on a synthetic full-size model (see benchmarks/README.md)",
        description="Runs the scenarios of benchmarks/README.md (D1 decode, P1 prefill, S1 budget sweep) on a "
        "synthetic model with a published model's shapes and random weights, and writes JSON results (and the S1 "
        "plot). Nothing is downloaded; without CUDA it runs a laptop-size model of the same layout.",
        examples=[
            "# the default scenarios D1, P1 and S1 on synthetic Mixtral-8x7B, results in benchmarks/results",
            "cadenza bench",
            "# int4 experts on Qwen3-30B-A3B's shapes, one trial, results elsewhere",
            "cadenza bench --scenario F4 --trials 1 --out /tmp/bench",
        ],
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"synthetic model: {', '.join(SYNTHETIC_MODELS)} (default: the scenario's model with CUDA, "
        f"mixtral-8x7b for D1/P1/S1; mixtral-tiny without, {F2_CPU_MODEL} for F2)",
    )
    p.add_argument(
        "--scenario",
        default=DEFAULT_SCENARIOS,
        help=f"comma-separated scenarios (default {DEFAULT_SCENARIOS}); F1 (qwen3-30b-a3b, 8 GiB), F2 "
        "(deepseek-v2-lite, 6 GiB), D3 / D4 (mixtral-8x7b, int8 / int4 experts, 24 GiB and 0), F3 / F4 "
        "(qwen3-30b-a3b, int8 / int4 experts, 8 GiB and 0), G1 / G2 (a Q4_K_M-like GGUF of mixtral-8x7b / "
        "qwen3-30b-a3b loaded by cadenza, 24 / 8 GiB and 0), O1 (a gpt-oss-120b GGUF, MXFP4 experts, 24 GiB and 0), "
        "Z1 (a glm-4.5-air GGUF, Q4_0 experts, 24 GiB), R1, and T1 / T2 (an offline job's tokens per second: "
        "mixtral-8x7b at 24 GiB / qwen3-30b-a3b at 8 GiB, the KV cache on the GPU then on the host) each run on "
        "their own",
    )
    p.add_argument(
        "--out", default=None,
        help="folder for the results (default: benchmarks/results inside a cadenza checkout, else the cache's bench "
        "folder, ~/.cache/cadenza/bench)",
    )  # fmt: skip
    p.add_argument("--trials", type=int, default=3, help="measured trials after one warm-up; the median is reported")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument(
        "--gpus", default=None,
        help="several GPUs (e.g. 0,1): cadenza splits the layers over them, each GPU with the budget of --budgets "
        "(a row at 24 is 24 GiB on each); D1 / D4 beside a single GPU's rows: issue 'several GPUs'",
    )  # fmt: skip
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure transformers+accelerate offloading in D1 (default: on with CUDA)",
    )
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"S1's GPU budgets in GiB (default {DEFAULT_BUDGETS})")
    p.add_argument(
        "--budget", type=float, default=None,
        help=f"the GPU budget in GiB of the scenarios that use {D1_BUDGET_GIB} (D1, P1, D3, D4, G1, O1, Z1; with "
        "--gpus each GPU's): e.g. 48 to set one GPU beside two of 24",
    )  # fmt: skip
    p.add_argument("--prompt-tokens", type=int, default=None, help="override every scenario's prompt length")
    p.add_argument("--prompts", type=int, default=None, help="T1 / T2: prompts in the job (default 1024)")
    p.add_argument("--runs", default=None,
                   help="T1 / T2: which of gpu,host,host2,batched (the KV cache on the GPU, on the host, on the host "
                   "in two micro-batches; the latency mode's batched generate, the baseline) to measure (default all "
                   "four); none: only --peer")  # fmt: skip
    p.add_argument("--prefill-chunk", dest="pass_tokens", type=int, default=None, metavar="TOKENS",
                   help="T1 / T2: the most tokens a pass carries, prompts and decoding rows together (default 4096, "
                   "as cadenza batch --prefill-chunk)")  # fmt: skip
    p.add_argument("--no-timeline", action="store_true",
                   help="T1 / T2: skip each row's timeline of three decode steps (~40 s for T1's 512 rows; bf16 T1's "
                   "1024 prompts fit a 10-minute box call only without it)")  # fmt: skip
    p.add_argument("--peer-parallel", default=None, metavar="B,B,..",
                   help="T1 / T2: llama-batched-bench's parallel sequences (default 16,32,64,128,256)")  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=None, help="override D1's and S1's generated tokens")
    advanced(p).add_argument(
        "--cpu-threads", type=int, default=None, help="threads for CPU expert work (default: cadenza's)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and the prompts (default 0)")
    p.add_argument(
        "--policies",
        default="auto,cpu,fetch",
        help="offload policies measured in D1 and P1 (default auto,cpu,fetch); 'none' runs only the D1 baseline",
    )
    p.add_argument("--tag", default=None, help="suffix for the result files, so split runs do not overwrite")
    p.add_argument(
        "--peer",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="also measure a peer in the same run, into the same JSON: llama.cpp=PATH (PATH: its llama-bench). "
        "D3 / D4 / F3 / F4 / G1 / G2 / O1 / Z1 only: after cadenza's configurations, with cadenza's model freed, the "
        "same synthetic model is written as a GGUF file (Q8_0 experts for int8, Q4_0 for int4; G1 / G2 / O1 / Z1: the "
        "file cadenza loaded), each configuration is run with "
        "llama-bench -ngl 99 --n-cpu-moe N, N the fewest layers whose experts stay on the host for llama.cpp's "
        "estimated GPU memory to fit the budget (0: every layer's), and the file is deleted. T1 / T2 with --experts "
        "int4: PATH is llama-batched-bench, run on a Q4_0 GGUF at 16-256 parallel sequences",
    )
    advanced(p).add_argument(
        "--peer-dir",
        default=None,
        help="folder for the peer's GGUF file (and G1 / G2 / O1 / Z1's), which needs up to ~66 GiB of free disk (Z1) "
        "(default: the system's temporary folder)",
    )
    advanced(p).add_argument(
        "--prefetch",
        default="auto",
        choices=["auto", "on", "off"],
        help="speculative prefetch: auto (default: with the fetch policy), on or off",
    )
    advanced(p).add_argument(
        "--eviction", default="lru", choices=["lru", "lfu", "lrfu"], help="fetch-cache eviction policy"
    )
    advanced(p).add_argument(
        "--profile-step",
        action="store_true",
        help="after each decode configuration, profile a few decode steps: GPU kernels, transfers, CPU experts and "
        "overhead, in total and per layer (with --no-cuda-graphs; graphs hide the layers)",
    )
    add_graph_args(p)
    add_expert_args(p)  # synthetic models are never cached: --no-cache changes nothing here
    p.set_defaults(func=_run_bench)
    return p


def _run_bench(args: argparse.Namespace) -> int:
    from cadenza.bench.run import run_bench  # imports torch: only when the command runs
    from cadenza.cli.flags import check_flags

    check_flags(args)
    return run_bench(args)


# --- what to run ---------------------------------------------------------------------------------------------------


def parse_scenarios(text: str) -> list[str]:
    names = [s.strip().upper() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SCENARIOS]
    if bad or not names:
        raise CadenzaError(
            f"Unknown scenario {bad[0] if bad else text!r}. Use a comma-separated list of {', '.join(SCENARIOS)}."
        )
    return list(dict.fromkeys(names))


def parse_policies(text: str) -> list[str]:
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    if names == ["none"]:
        return []
    bad = [s for s in names if s not in ("auto", "cpu", "fetch")]
    if bad or not names:
        raise CadenzaError(f"--policies: {text!r} is not a list of auto, cpu, fetch (or 'none').")
    return list(dict.fromkeys(names))


def parse_budgets(text: str) -> list[float | str]:
    out: list[float | str] = []
    for part in (s.strip().lower() for s in text.split(",") if s.strip()):
        if part == "all":
            out.append("all")
            continue
        try:
            value = float(part.removesuffix("gib"))
        except ValueError:
            value = -1.0
        if value < 0:
            raise CadenzaError(f"--budgets: {part!r} is not a budget. Give GiB numbers or 'all', e.g. 0,12,24,48,all.")
        out.append(int(value) if value.is_integer() else value)
    if not out:
        raise CadenzaError("--budgets is empty. Give GiB numbers or 'all', e.g. 0,12,24,48,all.")
    return out


def plan_configs(
    scenarios: list[str],
    budgets: list[float | str],
    prompt_tokens: int | None = None,
    new_tokens: int | None = None,
    budget: float | None = None,
):
    """The configurations of the chosen scenarios, in run order, with the overrides applied (budget: in place of
    D1_BUDGET_GIB)."""
    from cadenza.bench.measure import RunConfig

    d1 = D1_BUDGET_GIB if budget is None else (int(budget) if float(budget).is_integer() else budget)
    quant = {s: tuple(d1 if b == D1_BUDGET_GIB else b for b in bs) for s, bs in QUANT_BUDGETS.items()}

    prompt = lambda n: prompt_tokens or n
    new = lambda n: new_tokens or n
    out: list[RunConfig] = []
    for s in scenarios:
        if s == "D1":
            out += [RunConfig("D1", pol, d1, prompt(64), new(128)) for pol in D1_POLICIES]
        elif s == "F1":
            out += [RunConfig("F1", pol, F1_BUDGET_GIB, prompt(64), new(128)) for pol in D1_POLICIES]
        elif s == "F2":
            out += [RunConfig("F2", pol, F2_BUDGET_GIB, prompt(64), new(128)) for pol in D1_POLICIES]
        elif s == "P1":
            prompts = list(dict.fromkeys(prompt(n) for n in P1_PROMPTS))
            out += [RunConfig("P1", pol, d1, n, 1) for n in prompts for pol in P1_POLICIES]
        elif s == "S1":
            out += [RunConfig("S1", "auto", b, prompt(64), new(64)) for b in budgets]
        elif s in quant:
            # the budget with auto (CPU and link, a sync per host layer) and cpu (CPU only, launched from the stream)
            quant_budgets = quant[s]
            out += [
                RunConfig(s, pol, b, prompt(64), new(128))
                for b in quant_budgets
                for pol in ("auto", "cpu")
                if b or pol == "cpu"
            ]
            out.append(RunConfig(s, "auto", quant_budgets[0], prompt(QUANT_PREFILL), 1))
        elif s == "R1":
            out.append(RunConfig("R1", "auto", "all", prompt(64), new(128)))
    return out


def random_prompt(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """Seeded random token ids, clear of the usual special ids (0-2)."""
    import torch

    g = torch.Generator().manual_seed(seed * 7919 + n)
    return torch.randint(3, vocab_size, (n,), generator=g).tolist()


def command_line(args: argparse.Namespace, model: str, device: torch.device) -> str:
    """The run as one reproducible command (resolved defaults spelled out)."""
    parts = ["cadenza", "bench", "--model", model, "--scenario", args.scenario, "--device", device.type]
    parts += ["--trials", str(args.trials), "--budgets", args.budgets, "--seed", str(args.seed)]
    if args.out:
        parts += ["--out", args.out]
    if args.baseline is not None:
        parts.append("--baseline" if args.baseline else "--no-baseline")
    for flag, value in (
        ("--prompt-tokens", args.prompt_tokens),
        ("--new-tokens", args.new_tokens),
        ("--cpu-threads", args.cpu_threads),
        ("--policies", None if args.policies == "auto,cpu,fetch" else args.policies),
        ("--tag", args.tag),
        ("--gpus", getattr(args, "gpus", None)),
        ("--budget", getattr(args, "budget", None)),
        ("--eviction", None if args.eviction == "lru" else args.eviction),
    ):
        if value is not None:
            parts += [flag, str(value)]
    parts += [
        flag for flag, on in (("--profile-step", args.profile_step), ("--no-cuda-graphs", args.no_cuda_graphs)) if on
    ]
    if args.prefetch != "auto":
        parts += ["--prefetch", args.prefetch]
    if args.experts not in ("auto", "bf16"):
        parts += ["--experts", args.experts]
    if args.expert_group is not None:
        parts += ["--expert-group", str(args.expert_group)]
    for peer in args.peer or []:
        parts += ["--peer", peer]
    if args.peer_dir is not None:
        parts += ["--peer-dir", args.peer_dir]
    return shlex.join(parts)
