"""Micro-benchmark of the fused CPU MoE step (cadenza.kernels.cpu_moe) on one full-size MoE layer.

    python -m cadenza.bench.cpu_kernel --model mixtral-8x7b --formats bf16,int8,int4 --tokens 1,8,64 --out F.json

For each expert format it packs a layer of random experts (copies of it until more than --rotate-gb of packed
weights, so the last-level cache can't flatter the numbers), then times one layer's CPU expert step at each token
count: the kernel, the matrix-unit route ("mm": bf16 chunks through torch.mm / oneDNN, AMX where present), at one
token the PyTorch fallback, and the engine's current path (`run_experts` on stacked bf16 weights). bf16 runs in
both --layouts (default tiled,plain): "tiled" packed by `pack_layer`, "plain" the stacked [E, I, H] / [E, H, I]
tensors read in place (`plain_layer`, no second copy); each result row names its layout. Consecutive calls use
different experts. Weight bytes per second at one token are compared with the DRAM read bandwidth measured at the
start (all threads summing a 4 GiB array). Writes JSON and prints a table.

--peer kt-kernel also times ktransformers' CPU MoE operator on the same layer, routings, token counts and rotation
(cadenza/bench/kt_kernel_peer.py); its rows say system "kt-kernel", cadenza's "cadenza", and "peer_comparison" sets
each beside cadenza's fastest row of the same format and token count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from cadenza.bench.machine import GB, GiB, cpu_facts, git_commit, measure_dram_read_gb_s
from cadenza.bench.synthetic import SYNTHETIC_MODELS
from cadenza.kernels import cpu_moe
from cadenza.models.common import glu_fn
from cadenza.moe.cpu import physical_cores
from cadenza.moe.experts import expert_order, run_experts

TARGET = 0.85  # weight bytes/s at one token as a fraction of DRAM read bandwidth (issue 9)


def layer_shape(model: str) -> dict:
    """E experts, k per token, H hidden, I expert intermediate size and the activation of a synthetic model."""
    c = SYNTHETIC_MODELS[model]
    return {
        "experts": c.get("num_local_experts") or c.get("num_experts") or c["n_routed_experts"],
        "k": c["num_experts_per_tok"],
        "hidden": c["hidden_size"],
        "intermediate": c.get("moe_intermediate_size") or c["intermediate_size"],
        "act": c.get("hidden_act", "silu"),
    }


class Pool:
    """Expert weights as views into one N(0, 1) bf16 pool at seeded offsets: a layer of any size costs ~256 MB of
    random numbers; the packed and stacked copies made from it are distinct memory."""

    def __init__(self, seed: int, elements: int = 1 << 27):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randn(elements, generator=g).to(torch.bfloat16)
        self.g = g

    def matrix(self, rows: int, cols: int) -> torch.Tensor:
        n = rows * cols
        if n > self.data.numel():
            self.data = torch.cat([self.data] * math.ceil(n / self.data.numel() + 1))
        off = int(torch.randint(0, (self.data.numel() - n) // 64 + 1, (1,), generator=self.g)) * 64
        return self.data[off : off + n].view(rows, cols)


def _block_format(fmt: str) -> bool:
    from cadenza.kernels.blocks import BLOCK_FORMATS

    return all(f in BLOCK_FORMATS for f in fmt.split("+"))


def block_layer(fmt: str, shape: dict, seed: int):
    """A layer of random GGUF blocks in block format `fmt` ("q4_k+q6_k": gate/up, down), as a GGUF loads."""
    from cadenza.bench.gguf_quants import random_blocks
    from cadenza.kernels import blocks, layout

    e, h, i = shape["experts"], shape["hidden"], shape["intermediate"]
    gu, _, dn = fmt.partition("+")
    types = [blocks.BLOCK_FORMATS[f].gguf for f in (gu, gu, dn or gu)]
    out = layout.empty_packed(fmt, None, e, h, i)
    for x in range(e):
        mats = [
            blocks.from_gguf(t, random_blocks(t, r, c, seed + 3 * x + n), c)
            for n, (t, r, c) in enumerate(zip(types, (i, i, h), (h, h, i), strict=True))
        ]
        layout.write_block_expert(out, x, *mats)
    return out


def timed(fn, seconds: float, min_calls: int, max_calls: int, warmup: int = 2, gap: float = 0.0) -> list[float]:
    """Call times (s) of fn(i) for i = 0, 1, ...: `warmup` calls, then until `seconds` and `min_calls`; `gap`
    seconds idle (untimed) before each timed call."""
    for i in range(warmup):
        fn(i)
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    i = warmup
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() < t_end):
        if gap:
            time.sleep(gap)
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        i += 1
    return times


def routing(calls: int, tokens: int, e: int, k: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per call (ids [T, k], weights [T, k]). One token: experts in turn, k at a time, so consecutive calls read
    different weights; more tokens: seeded random top-k."""
    g = torch.Generator().manual_seed(seed + tokens)
    out = []
    for c in range(calls):
        if tokens == 1:
            ids = torch.tensor([[(c * k + j) % e for j in range(k)]])
        else:
            ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
        w = torch.softmax(torch.randn(tokens, k, generator=g), dim=-1)
        out.append((ids, w))
    return out


class Bench:
    """One run: the layer's source weights, the routings and inputs per token count, and the result rows."""

    def __init__(self, args: argparse.Namespace, shape: dict, threads: int, logical: int, dram: float):
        self.args, self.shape, self.threads, self.logical, self.dram = args, shape, threads, logical, dram
        self.tokens = [int(t) for t in args.tokens.split(",") if t]
        self.prefetches = [int(p) for p in args.prefetch.split(",") if p] or [0]
        self.sweep = [int(s) for s in args.thread_sweep.split(",") if s]
        e, k, h, i = shape["experts"], shape["k"], shape["hidden"], shape["intermediate"]
        pool = Pool(args.seed)
        self.gate = [pool.matrix(i, h) for _ in range(e)]
        self.up = [pool.matrix(i, h) for _ in range(e)]
        self.down = [pool.matrix(h, i) for _ in range(e)]
        self.prefill = args.prefill_tokens
        every = self.tokens + ([self.prefill] if self.prefill else [])
        self.routes = {t: routing(64 if t < 256 else 4, t, e, k, args.seed) for t in every}
        self.xs = {
            t: (torch.randn(t, h, generator=torch.Generator().manual_seed(t)) * h**-0.5).bfloat16() for t in every
        }
        self.err_input = (
            (torch.randn(64, h, generator=torch.Generator().manual_seed(7)) * h**-0.5).bfloat16(),
            *routing(1, 64, e, k, args.seed + 1)[0],
        )
        self.results: list[dict] = []
        self.errors: dict[str, float] = {}
        self.outputs: dict[str, torch.Tensor] = {}  # label -> layer output on err_input (a peer's error reference)
        self.y_bf16: torch.Tensor | None = None
        self._stacked: list[torch.Tensor] | None = None

    def stacked(self) -> list[torch.Tensor]:
        """The layer as a bf16 model holds it: gate, up [E, I, H], down [E, H, I] (one copy, made once)."""
        if self._stacked is None:
            self._stacked = [torch.stack(ws).bfloat16().contiguous() for ws in (self.gate, self.up, self.down)]
        return self._stacked

    def record(
        self, fmt: str, t: int, route: str, times: list[float], nbytes: int, layout: str = "tiled", **extra
    ) -> None:
        med = statistics.median(times)
        self.results.append(
            {
                "system": "cadenza",
                "format": fmt,
                "layout": layout,
                "tokens": t,
                "route": route,
                "threads": self.threads,
                "calls": len(times),
                "ms_median": round(med * 1e3, 3),
                "ms_min": round(min(times) * 1e3, 3),
                "weight_bytes_per_call": nbytes,
                "weight_gb_s": round(nbytes / med / GB, 2),
                "dram_fraction": round(nbytes / med / GB / self.dram, 3),
                **extra,
            }
        )

    def bytes_per_call(self, t: int, per_expert: int) -> int:
        """Weight bytes a call reads: every expert its tokens touch, once."""
        return int(statistics.mean(len(torch.unique(ids)) for ids, _ in self.routes[t]) * per_expert)

    def run_format(self, fmt: str, kernel_ok: bool, layout: str = "tiled", activations: str = "exact") -> None:
        """activations "int8": the tiles of cpu_moe.INT8_FORMATS take int8 activations (cpu_moe.int8_bits, through
        the environment); the rows' format is then named FMT@int8, and its output error is taken against FMT's."""
        a, sh, seconds = self.args, self.shape, self.args.seconds
        os.environ[cpu_moe.ACTIVATIONS_ENV] = activations
        name = fmt if activations == "exact" else f"{fmt}@{activations}"  # the rows' format
        e, k, act = sh["experts"], sh["k"], sh["act"]
        t0 = time.perf_counter()
        if layout == "plain":  # bf16 only: the stacked tensors themselves (copies: clones of them)
            packed = cpu_moe.plain_layer(*self.stacked())
            n_copies = max(1, math.ceil(a.rotate_gb * GB / packed.nbytes))
            copies = [packed] + [cpu_moe.plain_layer(*(m.clone() for m in self.stacked())) for _ in range(n_copies - 1)]
        elif fmt in cpu_moe.FORMATS:
            packed = cpu_moe.pack_layer(self.gate, self.up, self.down, fmt)
            n_copies = max(1, math.ceil(a.rotate_gb * GB / packed.nbytes))
            copies = [packed] + [
                replace(packed, gate_up=packed.gate_up.clone(), down=packed.down.clone()) for _ in range(n_copies - 1)
            ]
        else:  # a file's block format: random blocks (its speed does not depend on the values)
            packed = block_layer(fmt, sh, a.seed)
            n_copies = max(1, math.ceil(a.rotate_gb * GB / packed.nbytes))
            copies = [packed] + [
                replace(packed, gate_up=packed.gate_up.clone(), down=packed.down.clone()) for _ in range(n_copies - 1)
            ]
        eb = packed.expert_bytes
        common = {"layout": layout, "expert_bytes": eb, "rotation_gb": round(n_copies * packed.nbytes / GB, 2)}
        common["pack_s"] = round(time.perf_counter() - t0, 1)
        label = name if layout == "tiled" else f"{name}-{layout}"

        y = cpu_moe.moe_forward(
            packed, *self.err_input, None, act, self.threads, route="auto" if kernel_ok else "torch"
        )
        self.outputs[label] = y
        exact = self.outputs.get(label.replace(name, fmt, 1)) if activations != "exact" else None
        if label == "bf16":
            self.y_bf16 = y
        elif exact is not None:  # int8 activations against the same tiles' exact products
            self.errors[label] = round(((y - exact).norm() / exact.norm()).item(), 7)
        elif self.y_bf16 is not None:
            self.errors[label] = round(((y - self.y_bf16).norm() / self.y_bf16.norm()).item(), 7)

        for t in self.tokens:
            rs, x = self.routes[t], self.xs[t]
            nbytes = self.bytes_per_call(t, eb)

            def call(n, route, pf=0, th=self.threads, rs=rs, x=x, t=t):
                if a.in_cache:  # the same experts every call: what the arithmetic alone sustains
                    n = 0
                ids, w = rs[n % len(rs)]
                layer = copies[(n // max(1, e // k) if t == 1 else n) % len(copies)]  # new weights every call
                cpu_moe.moe_forward(layer, x, ids, w, None, act, th, route=route, prefetch=pf)

            def read(n, th, rs=rs):
                if a.in_cache:
                    n = 0
                ids, _ = rs[n % len(rs)]
                layer = copies[(n // max(1, e // k)) % len(copies)]
                cpu_moe.read_spans(layer, torch.unique(ids).tolist(), th)

            if kernel_ok:
                for pf in self.prefetches if t == 1 else self.prefetches[:1]:
                    times = timed(lambda n, pf=pf: call(n, "kernel", pf), seconds, 5, 10_000)
                    self.record(name, t, "kernel", times, nbytes, prefetch=pf, **common)
                    if a.gap_ms and t == 1:  # the same calls after an idle pause each: what a cold pool costs
                        gap = a.gap_ms / 1e3
                        times = timed(lambda n, pf=pf: call(n, "kernel", pf), seconds, 5, 10_000, gap=gap)
                        self.record(name, t, "kernel", times, nbytes, prefetch=pf, gap_ms=a.gap_ms, **common)
                if t == 1 and layout == "tiled":  # the same bytes read with no arithmetic: the kernel's ceiling
                    pf = self.prefetches[0]
                    for th in self.sweep or [self.threads]:
                        if th != self.threads:
                            times = timed(lambda n, th=th, pf=pf: call(n, "kernel", pf, th), seconds, 5, 10_000)
                            self.record(name, t, "kernel", times, nbytes, prefetch=pf, **common)
                            self.results[-1]["threads"] = th
                        times = timed(lambda n, th=th: read(n, th), seconds, 5, 10_000)
                        self.record(name, t, "read", times, nbytes, **common)
                        self.results[-1]["threads"] = th
                if t == 1 and self.logical != self.threads:  # hyper-threads: does streaming gain from them?
                    pf = self.prefetches[0]
                    times = timed(lambda n, pf=pf: call(n, "kernel", pf, self.logical), seconds, 5, 10_000)
                    self.record(name, t, "kernel", times, nbytes, prefetch=pf, **common)
                    self.results[-1]["threads"] = self.logical
                if t > 1:
                    times = timed(lambda n: call(n, "mm"), seconds, 3, 10_000)
                    self.record(name, t, "mm", times, nbytes, **common)
            if t == 1 and not a.no_torch:  # the fallback dequantizes whole experts: a couple of calls
                times = timed(lambda n: call(n, "torch"), 0.0, 2, 2, warmup=1)
                self.record(name, t, "torch-fallback", times, nbytes, **common)
            print(f"  {label} T={t} done", file=sys.stderr)
        if self.prefill and kernel_ok:  # many tokens per expert: where the matrix units (mm) overtake the kernel
            t = self.prefill
            nbytes = self.bytes_per_call(t, eb)
            for route in ("kernel", "mm"):
                ids, w = self.routes[t][0]
                fn = lambda n, r=route, ids=ids, w=w: cpu_moe.moe_forward(
                    copies[n % len(copies)], self.xs[t], ids, w, None, act, self.threads, route=r
                )
                self.record(name, t, route, timed(fn, 0.0, 2, 2, warmup=1), nbytes, **common)
            print(f"  {label} T={t} done", file=sys.stderr)

    def run_pytorch(self) -> None:
        """The engine's current CPU path: run_experts, one PyTorch call per matrix per expert, stacked bf16."""
        e, k = self.shape["experts"], self.shape["k"]
        stacked = self.stacked()
        eb = sum(w[0].numel() * w.element_size() for w in stacked)
        fn = glu_fn(self.shape["act"])
        weights = lambda j: (stacked[0][j], stacked[1][j], stacked[2][j])
        for t in self.tokens:
            rs, x = self.routes[t], self.xs[t]

            def call(n, rs=rs, x=x):
                ids, w = rs[n % len(rs)]
                counts = torch.bincount(ids.view(-1), minlength=e).tolist()
                active = [j for j, c in enumerate(counts) if c]
                run_experts(x, k, w.to(x.dtype), expert_order(ids), counts, active, weights, fn, torch.zeros_like(x))

            times = timed(call, self.args.seconds, 3, 10_000)
            self.record("bf16", t, "pytorch-run_experts", times, self.bytes_per_call(t, eb), layout="plain")

    def summary(self) -> dict:
        out = {}
        for fmt, layout in dict.fromkeys((r["format"], r["layout"]) for r in self.results):
            rows = [
                r
                for r in self.results
                if (r["format"], r["layout"]) == (fmt, layout) and r["tokens"] == 1 and r["route"] == "kernel"
            ]
            if rows:
                best = max(rows, key=lambda r: r["dram_fraction"])
                out[fmt if layout == "tiled" else f"{fmt}-{layout}"] = {
                    "t1_weight_gb_s": best["weight_gb_s"],
                    "t1_dram_fraction": best["dram_fraction"],
                    "t1_best_prefetch": best.get("prefetch"),
                    "t1_best_threads": best["threads"],
                    "meets_target": best["dram_fraction"] >= TARGET,
                }
        return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cadenza.bench.cpu_kernel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mixtral-8x7b", choices=sorted(SYNTHETIC_MODELS))
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument(
        "--layouts", default="tiled,plain", help="tiled (pack_layer) and/or plain (bf16 stacked tensors in place)"
    )
    ap.add_argument("--tokens", default="1,8,64", help="tokens per call (the layer's batch), comma-separated")
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    ap.add_argument("--threads", type=int, default=None, help="kernel and torch threads (default: physical cores)")
    ap.add_argument(
        "--thread-sweep",
        default="",
        help="also time one-token calls, and reading the same tiles with no arithmetic ('read' rows), at these "
        "thread counts (e.g. 1,2,4,8,16): where the kernel stops scaling, and how far below memory's rate it runs",
    )
    ap.add_argument("--rotate-gb", type=float, default=1.2, help="packed weights rotated through per format")
    ap.add_argument(
        "--in-cache",
        action="store_true",
        help="every call the same experts (they stay in the caches if small enough, e.g. qwen3-30b-a3b's 8 at one "
        "token): the kernel's compute rate per thread, to tell a compute-bound loop from a memory-bound one",
    )
    ap.add_argument("--seconds", type=float, default=1.0, help="timing window per measurement")
    ap.add_argument(
        "--gap-ms",
        type=float,
        default=0.0,
        help="also time one-token calls each after this idle pause (a decode step's GPU-only layers before the "
        "CPU's): what waking the thread pool costs",
    )
    ap.add_argument("--dram-gib", type=float, default=4.0, help="array size of the DRAM read measurement")
    ap.add_argument("--prefetch", default="0,2048", help="software prefetch distances tried at one token (bytes)")
    ap.add_argument("--prefill-tokens", type=int, default=256, help="kernel vs mm at this many tokens (0: skip)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch paths (fallback and run_experts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--activations",
        default="exact",
        help="exact and/or int8 (comma-separated): K-quant tiles also timed on int8 activations (rows FMT@int8)",
    )
    ap.add_argument("--peer", choices=["kt-kernel"], default=None, help="also time this peer's CPU MoE operator")
    ap.add_argument("--kt-methods", default="", help="kt-kernel methods (default: all whose format is in --formats)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        if f not in cpu_moe.FORMATS and not _block_format(f):
            ap.error(f"unknown format {f!r}: use {', '.join(cpu_moe.FORMATS)} or block formats (q4_k+q6_k, mxfp4, ...)")
    layouts = [x for x in args.layouts.split(",") if x]
    activations = [x for x in args.activations.split(",") if x]
    if not set(activations) <= {"exact", "int8"}:
        raise SystemExit(f"--activations {args.activations!r}: give exact and/or int8")
    if "int8" in activations and not cpu_moe.has_int8_dot():
        raise SystemExit("--activations int8 needs a CPU with AVX512-VNNI and AVX512_VBMI; this one lacks them")
    for x in layouts:
        if x not in ("tiled", "plain"):
            ap.error(f"unknown layout {x!r}: use tiled, plain")
    peer = None
    if args.peer:  # before anything slow: a missing peer fails at once
        from cadenza.bench import kt_kernel_peer as peer

        try:
            peer.selected(args.kt_methods, formats)
            ext, peer_facts = peer.load()
        except ValueError as e:
            ap.error(str(e))
        except peer.Unavailable as e:
            print(f"kt-kernel peer unavailable: {e}. Fix: {peer.FIX}", file=sys.stderr)
            return 2

    t_start = time.perf_counter()
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or threads)
    kernel_ok = cpu_moe.available()
    print(f"measuring DRAM read bandwidth ({args.dram_gib:g} GiB, {threads} threads) ...", file=sys.stderr)
    dram_by_threads = {threads: measure_dram_read_gb_s(int(args.dram_gib * GiB))}
    if logical != threads:  # hyper-threads may read more: the denominator is the best the box does
        torch.set_num_threads(logical)
        dram_by_threads[logical] = measure_dram_read_gb_s(int(args.dram_gib * GiB))
        torch.set_num_threads(threads)
    dram = max(dram_by_threads.values())
    cpu = cpu_facts()
    machine = {
        "cpu_model": cpu["model"],
        "physical_cores": cpu["physical_cores"],
        "logical_cpus": logical,
        "cpu_flags": cpu["flags"],
        "threads": threads,
        "dram_read_gb_s": round(dram, 2),
        "dram_read_gb_s_by_threads": {str(t): round(v, 2) for t, v in dram_by_threads.items()},
        "torch": torch.__version__,
        "kernel_available": kernel_ok,
        "kernel_unavailable_reason": cpu_moe.unavailable_reason(),
        "bf16_dot": cpu_moe.has_bf16_dot(),
        "amx": cpu_moe.has_amx(),
        "default_mm_min_tokens": cpu_moe.default_mm_min_tokens(),
    }
    shape = layer_shape(args.model)
    print(f"DRAM read {dram:.1f} GB/s; building a {args.model} layer {shape} ...", file=sys.stderr)
    bench = Bench(args, shape, threads, logical, dram)
    before = os.environ.get(cpu_moe.ACTIVATIONS_ENV)  # run_format switches it; a caller in-process gets it back
    try:
        for fmt in formats:
            for layout in layouts:
                if layout == "plain" and fmt != "bf16":
                    continue  # the plain layout is the model's own bf16 tensors
                for acts in activations:
                    if acts == "int8" and not set(fmt.split("+")) & set(cpu_moe.INT8_FORMATS):
                        continue  # no int8 kernel for these tiles
                    print(f"{fmt} {layout} {acts}: packing and timing ...", file=sys.stderr)
                    bench.run_format(fmt, kernel_ok, layout, acts)
    finally:
        if before is None:
            os.environ.pop(cpu_moe.ACTIVATIONS_ENV, None)
        else:
            os.environ[cpu_moe.ACTIVATIONS_ENV] = before
    if not args.no_torch:
        print("PyTorch run_experts on bf16 ...", file=sys.stderr)
        bench.run_pytorch()

    out = {
        "command": "python -m cadenza.bench.cpu_kernel " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": git_commit(),
        "machine": machine,
        "model": args.model,
        "layer": shape,
        "target_dram_fraction_at_1_token": TARGET,
        "rel_err_vs_bf16": bench.errors,
        "summary": bench.summary(),
        "results": bench.results,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if peer is not None:
        out["peer"] = {"name": args.peer, "status": "running"}
        write(args.out, out)  # cadenza's rows survive a peer that dies
        print(f"{args.peer}: building and timing ...", file=sys.stderr)
        with peer.c_stdout_to_stderr():
            out["peer"] = peer.run(bench, timed, ext, peer_facts) | {"name": args.peer, "status": "done"}
        out["peer_comparison"] = peer.compare(bench.results, shape["hidden"], shape["intermediate"])
        out["wall_s"] = round(time.perf_counter() - t_start, 1)
    print_table(out)
    write(args.out, out)
    return 0


def write(path: Path | None, out: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)


def print_table(out: dict) -> None:
    m = out["machine"]
    print(f"{m['cpu_model']}: {m['threads']} threads, DRAM read {m['dram_read_gb_s']} GB/s, flags {m['cpu_flags']}")
    head = f"{'system':9} {'format':7} {'layout':6} {'T':>4} {'route':20} {'thr':>4} {'pf':>5} {'ms':>9} {'GB/s':>7}"
    head += f" {'of DRAM':>8}"
    print(head)
    for r in out["results"]:
        pf = r.get("prefetch", "")
        route = r["route"] + (f" after {r['gap_ms']:g} ms" if r.get("gap_ms") else "")
        print(
            f"{r.get('system', 'cadenza'):9} {r['format']:7} {r['layout']:6} {r['tokens']:>4} {route:20} "
            f"{r['threads']:>4} {pf!s:>5} {r['ms_median']:>9.3f} {r['weight_gb_s']:>7.1f} {r['dram_fraction']:>8.2f}"
        )
    for fmt, s in out["summary"].items():
        ok = "meets" if s["meets_target"] else "misses"
        print(f"{fmt}: {s['t1_dram_fraction']:.2f} of DRAM at 1 token ({ok} the {TARGET} target)")
    if out["rel_err_vs_bf16"]:
        print("layer output error vs bf16 weights:", out["rel_err_vs_bf16"])
    if "peer_comparison" in out:
        from cadenza.bench.kt_kernel_peer import print_comparison

        print("layer output error vs fp32 weights:", out["peer"]["rel_err_vs_fp32"])
        print_comparison(out["peer_comparison"])


if __name__ == "__main__":
    sys.exit(main())
