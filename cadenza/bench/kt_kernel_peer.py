"""ktransformers' kt-kernel CPU MoE operator as a peer of `python -m cadenza.bench.cpu_kernel --peer kt-kernel`.

What is timed: kt-kernel's own fused MoE layer (a `TP_MOE<...>` object of its compiled extension `kt_kernel_ext`),
driven the way its own benchmarks (kt-kernel/bench/bench_moe_amx.py) drive it: `CPUInfer.submit(moe.forward_task(
...))` then `CPUInfer.sync()`, one call per layer step. It gets the bench's layer: the same bf16 source weights
(`Bench.stacked()`, from the same random pool), which kt-kernel quantizes itself, online, as its
`load_weights_from_tensors` does; the same routings, inputs, token counts and timer; and the same rotation (copies
of the layer until --rotate-gb of kt-kernel's bytes, new experts or a new copy every call). Rows say system
"kt-kernel", the method, the class, the GEMM it took and the quantization.

Methods (kt-kernel 0.6.1's method names; the class in `kt_kernel_ext.moe`; bytes per weight, gate/up/down):
- BF16: AMXBF16_MOE, the bf16 weights as they are (2).
- AMXINT8: AMXInt8_MOE, int8 symmetric, one fp32 scale per output channel (1 + 4/K: as cadenza's int8).
- AMXINT4: AMXInt4_MOE, int4 symmetric, one fp32 scale per output channel (0.5 + 4/K): kt-kernel's int4.
- AMXINT4_1KGROUP: AMXInt4_1KGroup_MOE, int4 asymmetric in groups of 64 along K, fp32 scale + fp32 min per group
  (0.625): the nearest to cadenza's int4 (group 64, bf16 scale + uint8 zero: 0.547). Not a KTMoEWrapper method;
  kt-kernel's examples/test_moe_amx.py runs it this way ("int4_1k").
Every class picks its GEMM by tokens: T <= 4E/k AVX-512 ("vec_mul": VNNI int8 / BF16 dot products), above that
AMX tiles ("mat_mul"). The integer methods quantize the activations to int8 per token (per group for the K-group
one), cadenza keeps them in fp32.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from cadenza.bench.machine import GB
from cadenza.models.common import act_fn

SYSTEM = "kt-kernel"
VERSION = "0.6.1"
FIX = (
    f"install the kt-kernel {VERSION} wheel (CPython 3.12; it wants torch >= 2.10, < 2.12): python3 -m pip install "
    "--no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"
)
# kt-kernel's own test for its AMX build (kt_kernel/_cpu_detect.py): the 0.6.1 wheel holds only that build, compiled
# for AVX-512 (VNNI, VBMI, BF16) throughout, so loading it elsewhere could die of an illegal instruction
NEEDED_FLAGS = ("amx_tile", "amx_int8", "amx_bf16", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16")
ROUTES = ("kernel", "mm")  # cadenza's own kernel routes, what a peer row is compared with


class Unavailable(RuntimeError):
    """kt-kernel cannot run here; the message says why."""


@dataclass(frozen=True)
class Method:
    name: str  # kt-kernel's method name (KTMoEWrapper(method=...)), or ours for the K-group int4
    cls: str  # its class in kt_kernel_ext.moe
    fmt: str  # the cadenza format it is compared with
    bits: int
    group: int  # quantization group along K (0: one scale per output channel)
    symmetric: bool
    scales: str

    def quant(self) -> dict:
        if self.bits == 16:
            return {"bits": 16, "group_size": None, "symmetric": None, "scales": self.scales}
        return {
            "bits": self.bits,
            "group_size": self.group or "per-channel",
            "symmetric": self.symmetric,
            "scales": self.scales,
        }

    def expert_bytes(self, hidden: int, inter: int, tp: int = 1) -> int:
        """Bytes of one expert in kt-kernel's buffers (`BufferB::required_size` of gate, up [I, H] and down [H, I];
        down split into `tp` column parts, one per NUMA subpool, each with its own per-row scales)."""
        weights = 3 * hidden * inter * self.bits // 8
        if self.bits == 16:
            return weights
        per_group = 4 if self.symmetric else 8  # fp32 scale, + fp32 min when asymmetric
        if self.group:
            return weights + per_group * 3 * hidden * inter // self.group
        return weights + per_group * (2 * inter + tp * hidden)


METHODS = {
    m.name: m
    for m in (
        Method("BF16", "AMXBF16_MOE", "bf16", 16, 0, True, "none"),
        Method("AMXINT8", "AMXInt8_MOE", "int8", 8, 0, True, "fp32 per output channel"),
        Method("AMXINT4", "AMXInt4_MOE", "int4", 4, 0, True, "fp32 per output channel"),
        Method("AMXINT4_1KGROUP", "AMXInt4_1KGroup_MOE", "int4", 4, 64, False, "fp32 scale + fp32 min per group"),
    )
}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return next((set(ln.partition(":")[2].split()) for ln in cpuinfo.splitlines() if ln.startswith("flags")), set())


def missing_flags(flags: set[str]) -> list[str]:
    return [f for f in NEEDED_FLAGS if f not in flags and f.replace("_", "") not in flags]


def load(flags: set[str] | None = None) -> tuple[ModuleType, dict]:
    """kt-kernel's compiled extension and facts about it, or Unavailable. The extension is loaded from its file,
    as kt_kernel/_cpu_detect.py does, without `import kt_kernel`: that package's __init__ pulls in its CLI and GGUF
    loaders (gguf, typer, ...), none of which the MoE operator needs."""
    spec = importlib.util.find_spec("kt_kernel")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"the kt_kernel package is not importable from this Python ({sys.version.split()[0]})")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    built = sorted(pkg.glob("_kt_kernel_ext_amx.*.so")) or sorted(pkg.glob("kt_kernel_ext.*.so"))
    tag = f".cpython-{sys.version_info[0]}{sys.version_info[1]}-"  # a wheel's extension is built for one Python
    files = [f for f in built if tag in f.name or ".cpython-" not in f.name]
    if not files:
        names = ", ".join(f.name for f in built) or "no kt_kernel_ext extension"
        raise Unavailable(f"{pkg} holds {names}, none for this Python ({sys.version.split()[0]})")
    missing = missing_flags(cpu_flags() if flags is None else flags)
    if missing:
        raise Unavailable(f"its wheel is one AMX + AVX-512 build and this CPU lacks {', '.join(missing)}")
    ext_spec = importlib.util.spec_from_file_location("kt_kernel_ext", files[0])
    if ext_spec is None or ext_spec.loader is None:
        raise Unavailable(f"{files[0]} is not a loadable extension")
    try:
        ext = importlib.util.module_from_spec(ext_spec)
        ext_spec.loader.exec_module(ext)
    except (ImportError, OSError) as e:
        raise Unavailable(f"{files[0].name} does not load: {e}") from e
    absent = [m.cls for m in METHODS.values() if not hasattr(ext.moe, m.cls)]
    try:
        version = importlib.metadata.version("kt-kernel")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return ext, {"version": version, "extension": str(files[0]), "classes_absent": absent}


def numa_nodes(allowed: set[int]) -> list[int]:
    """NUMA nodes holding CPUs this process may use: kt-kernel runs one subpool of threads on each (its TP)."""
    nodes = []
    for d in sorted(Path("/sys/devices/system/node").glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpus: set[int] = set()
        with contextlib.suppress(OSError, ValueError):
            for part in (d / "cpulist").read_text().strip().split(","):
                lo, _, hi = part.partition("-")
                cpus.update(range(int(lo), int(hi or lo) + 1))
        if cpus & allowed:
            nodes.append(int(d.name[4:]))
    return nodes or [0]


@contextlib.contextmanager
def c_stdout_to_stderr() -> Iterator[None]:
    """kt-kernel printf()s per object and per load: to stderr, so stdout keeps the bench's table."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # C stdio's buffer, before fd 1 is the table's again
        os.dup2(saved, 1)
        os.close(saved)


_ALIVE: list[KtKernel] = []  # see KtKernel: nothing of kt-kernel's is freed before the process ends


class KtKernel:
    """One CPUInfer (kt-kernel's thread pool and task queue) and the MoE layers made on it. Every layer object and
    the tensors it points at stay alive until the process ends: kt-kernel's shared scratch buffer keeps a pointer
    setter per object and calls them all whenever it grows, so a freed object would be written to."""

    def __init__(self, ext: ModuleType, threads: int, nodes: list[int], max_len: int):
        self.ext, self.max_len, self.nodes = ext, max_len, nodes
        self.per_pool = [threads // len(nodes) + (i < threads % len(nodes)) for i in range(len(nodes))]
        cfg = ext.WorkerPoolConfig()
        cfg.subpool_count = len(nodes)
        cfg.subpool_numa_map = nodes
        cfg.subpool_thread_count = self.per_pool
        self.cpu_infer = ext.CPUInfer(cfg)
        self.keep: list[Any] = []
        self.bsz: dict[int, torch.Tensor] = {}
        _ALIVE.append(self)

    def layer(self, m: Method, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, k: int, idx: int) -> Any:
        """A layer quantized by kt-kernel from bf16 gate, up [E, I, H] and down [E, H, I] (its online path)."""
        e, i, h = gate.shape
        identity = torch.arange(e, dtype=torch.int64)  # physical -> logical expert ids
        cfg = self.ext.moe.MOEConfig(e, k, h, i, 0)  # 0 experts on a GPU
        cfg.layer_idx = idx
        cfg.pool = self.cpu_infer.backend_
        cfg.max_len = self.max_len  # scratch is sized for this many tokens per call
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = gate.data_ptr(), up.data_ptr(), down.data_ptr()
        cfg.gate_scale = 0  # no scales given: quantize the bf16 weights (and save nothing: cfg.save stays False)
        if m.group:
            cfg.quant_config.bits = m.bits
            cfg.quant_config.group_size = m.group
            cfg.quant_config.zero_point = not m.symmetric
        moe = getattr(self.ext.moe, m.cls)(cfg)
        self.cpu_infer.submit(moe.load_weights_task(identity.data_ptr()))
        self.cpu_infer.sync()
        self.keep += [moe, identity, gate, up, down]
        return moe

    def forward(self, moe: Any, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
        """out [T, H] bf16 = the layer for x [T, H] bf16, ids [T, k] int64, w [T, k] fp32 (all contiguous)."""
        t = x.shape[0]
        if t not in self.bsz:  # kt-kernel reads the token count through a pointer
            self.bsz[t] = torch.tensor([t], dtype=torch.int32)
        args = (self.bsz[t].data_ptr(), ids.shape[1], ids.data_ptr(), w.data_ptr(), x.data_ptr(), out.data_ptr())
        self.cpu_infer.submit(moe.forward_task(*args, False))  # False: write out, don't add to it
        self.cpu_infer.sync()


def reference(x, ids, w, gate, up, down, act: str = "silu") -> torch.Tensor:
    """fp32 layer output: per token, sum over its experts e of w * down_e(act(gate_e x) * up_e x)."""
    y = torch.zeros(x.shape[0], gate.shape[2])
    xf, fn = x.float(), act_fn(act)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = fn(xf[tok] @ gate[e].float().T) * (xf[tok] @ up[e].float().T)
        y.index_add_(0, tok, (h @ down[e].float().T) * w[tok, slot].float()[:, None])
    return y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item(), 7)


def selected(names: str, formats: list[str]) -> list[Method]:
    """The methods named (comma-separated; empty: all) whose cadenza format is measured, in --formats order."""
    wanted = [n for n in names.split(",") if n] or list(METHODS)
    unknown = [n for n in wanted if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown kt-kernel method {', '.join(unknown)}: use {', '.join(METHODS)}")
    return [METHODS[n] for f in formats for n in wanted if METHODS[n].fmt == f]


def run(bench: Any, timed: Callable, ext: ModuleType, facts: dict) -> dict:
    """Time kt-kernel on the bench's layer for every selected method and token count; rows go to bench.results.
    Returns what the JSON says about the peer."""
    a, sh = bench.args, bench.shape
    e, k, h, inter = sh["experts"], sh["k"], sh["hidden"], sh["intermediate"]
    if sh["act"] != "silu":
        raise Unavailable(f"kt-kernel's MoE computes silu(gate) * up, this layer uses {sh['act']}")
    methods = selected(a.kt_methods, [f for f in a.formats.split(",") if f])
    skipped = [m.name for m in methods if m.cls in facts["classes_absent"]]  # not in this build of the wheel
    methods = [m for m in methods if m.name not in skipped]
    every = list(dict.fromkeys(bench.tokens + ([bench.prefill] if bench.prefill else [])))
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    kt = KtKernel(ext, bench.threads, numa_nodes(allowed), max(every + [bench.err_input[0].shape[0]]))
    gate, up, down = bench.stacked()
    x64, ids64, w64 = (
        v.contiguous() for v in (bench.err_input[0], bench.err_input[1].long(), bench.err_input[2].float())
    )
    ref = reference(x64, ids64, w64, gate, up, down, sh["act"])
    errs: dict[str, dict] = {"cadenza": {n: rel(y, ref) for n, y in bench.outputs.items()}, SYSTEM: {}}
    info = {
        **facts,
        "threads": bench.threads,
        "numa_nodes": kt.nodes,
        "threads_per_subpool": kt.per_pool,
        "max_len": kt.max_len,
        "vec_mul_up_to_tokens": 4 * e // k,  # kt-kernel's mat_mul (AMX) above this many tokens
        "methods": {},
        "methods_not_in_this_build": skipped,
        "rel_err_vs_fp32": errs,
    }
    for m in methods:
        t0 = time.perf_counter()
        eb = m.expert_bytes(h, inter, len(kt.nodes))
        n_copies = max(1, math.ceil(a.rotate_gb * GB / (e * eb)))
        copies = [kt.layer(m, gate, up, down, k, j) for j in range(n_copies)]
        facts_m = {
            "quant": m.quant(),
            "expert_bytes": eb,
            "bytes_per_weight": round(eb / (3 * h * inter), 4),
            "rotation_gb": round(n_copies * e * eb / GB, 2),
            "pack_s": round(time.perf_counter() - t0, 1),
        }
        info["methods"][m.name] = {"class": m.cls, "format": m.fmt, **facts_m}
        y, y1 = torch.empty(x64.shape[0], h, dtype=torch.bfloat16), torch.empty(1, h, dtype=torch.bfloat16)
        kt.forward(copies[0], x64, ids64, w64, y)
        kt.forward(copies[0], x64[:1], ids64[:1], w64[:1], y1)  # one token: the other GEMM, same weights
        errs[SYSTEM][m.name] = {"t64": rel(y, ref), "t1": rel(y1, ref[:1])}
        for t in every:
            times = measure(kt, bench, timed, copies, t)
            gemm = f"{m.cls} {'mat_mul (AMX)' if t > 4 * e // k else 'vec_mul (AVX-512)'}"
            nbytes = bench.bytes_per_call(t, eb)
            bench.record(
                m.fmt,
                t,
                f"kt:{m.name}",
                times,
                nbytes,
                layout="kt",
                system=SYSTEM,
                method=m.name,
                backend=gemm,
                **facts_m,
            )
            print(f"  {SYSTEM} {m.name} T={t} done", file=sys.stderr)
    return info


def measure(kt: KtKernel, bench: Any, timed: Callable, copies: list[Any], t: int) -> list[float]:
    """Call times at t tokens, as cadenza's are taken: the bench's routings in turn, new weights every call (at one
    token the next k experts, a new copy of the layer once all were used); the prefill count: a couple of calls."""
    e, k = bench.shape["experts"], bench.shape["k"]
    rs = [(ids.long().contiguous(), w.float().contiguous()) for ids, w in bench.routes[t]]
    x, out = bench.xs[t].contiguous(), torch.empty(t, bench.shape["hidden"], dtype=torch.bfloat16)
    if t == bench.prefill and t not in bench.tokens:
        return timed(lambda n: kt.forward(copies[n % len(copies)], x, *rs[0], out), 0.0, 2, 2, warmup=1)

    def call(n: int) -> None:
        layer = copies[(n // max(1, e // k) if t == 1 else n) % len(copies)]
        kt.forward(layer, x, *rs[n % len(rs)], out)

    return timed(call, bench.args.seconds, 5, 10_000)


def compare(rows: list[dict], hidden: int, inter: int, peer: str = SYSTEM) -> list[dict]:
    """One entry per peer row: against cadenza's fastest row of its kernel routes at the same format, token count
    and threads, the GB/s of each (each over its own bytes), cadenza's GB/s over the peer's, and the peer's time
    over cadenza's (> 1: cadenza's call is faster)."""
    out = []
    for p in (r for r in rows if r.get("system") == peer):
        same = (p["format"], p["tokens"], p["threads"])
        mine = [
            r
            for r in rows
            if r.get("system", "cadenza") == "cadenza"
            and r["route"] in ROUTES
            and (r["format"], r["tokens"], r["threads"]) == same
        ]
        if not mine:
            continue
        c = min(mine, key=lambda r: r["ms_median"])
        bpw = c.get("expert_bytes", 0) / (3 * hidden * inter)
        out.append(
            {
                "format": p["format"],
                "tokens": p["tokens"],
                "threads": p["threads"],
                "cadenza_route": c["route"],
                "cadenza_layout": c["layout"],
                "cadenza_ms": c["ms_median"],
                "cadenza_gb_s": c["weight_gb_s"],
                "cadenza_bytes_per_weight": round(bpw, 4) or None,
                "peer": peer,
                "peer_method": p.get("method"),
                "peer_ms": p["ms_median"],
                "peer_gb_s": p["weight_gb_s"],
                "peer_bytes_per_weight": p.get("bytes_per_weight"),
                "gb_s_ratio": round(c["weight_gb_s"] / p["weight_gb_s"], 3) if p["weight_gb_s"] else None,
                "time_ratio": round(p["ms_median"] / c["ms_median"], 3) if c["ms_median"] else None,
            }
        )
    return out


def print_comparison(cmp: list[dict]) -> None:
    if not cmp:
        return
    print(
        f"{'format':7} {'T':>4} {'peer method':16} {'cadenza GB/s':>12} {'peer GB/s':>10} {'GB/s ratio':>10} "
        f"{'cadenza ms':>10} {'peer ms':>9} {'peer/cad t':>10}  B/weight cadenza / peer"
    )
    for c in cmp:
        print(
            f"{c['format']:7} {c['tokens']:>4} {c['peer_method']!s:16} {c['cadenza_gb_s']:>12.1f} "
            f"{c['peer_gb_s']:>10.1f} {c['gb_s_ratio']!s:>10} {c['cadenza_ms']:>10.3f} {c['peer_ms']:>9.3f} "
            f"{c['time_ratio']!s:>10}  {c['cadenza_bytes_per_weight']} / {c['peer_bytes_per_weight']}"
        )
