"""Micro-benchmark of the GPU routed-expert kernels (cadenza.kernels.gpu_moe) at full-size layer shapes.

    python -m cadenza.bench.gpu_kernel [--out F.json]      # on a CUDA GPU, under ~2 minutes on an H200
    python -m cadenza.bench.gpu_kernel --smoke             # tiny shapes on the CPU (Triton's interpreter)

Decode: for each shape (Mixtral 8x7B: H 4096, I 14336; Qwen3-30B-A3B: H 2048, I 768), format (plain bf16
stacked tensors; tiled int8, int4) and token count (k = 2 slots), one CUDA graph holds 16 `moe_decode` calls,
each a different routing over stacked rows of random weights (several layers' worth, so L2 can't hold what the
next call reads); replays are timed with CUDA events. Weight bytes per second count each distinct expert a call
touches once, and are compared with a device-to-device copy's bandwidth (read + write) and a sum's read
bandwidth, both measured at the start. Every block-size configuration in CONFIGS (and `default_blocks`) is timed:
the table shows the best per case and the default, the JSON holds all. Prefill: one expert on 512 tokens,
`dequantize_into` + three bf16 matmuls (`expert_forward`), against the same matmuls on plain bf16 weights.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from cadenza.bench.machine import GB, git_commit, measure_gpu_copy_gb_s, measure_gpu_read_gb_s
from cadenza.kernels.layout import DEFAULT_GROUP, PAD, ROWS, _header_bytes, _tile_bytes

K_SLOTS = 2
CALLS = 16  # moe_decode calls per graph, each with its own routing
SHAPES = {  # H, I, experts per layer, stacked rows (whole layers; more than L2 holds between reuses)
    "mixtral": (4096, 14336, 8, 16),
    "qwen3": (2048, 768, 128, 128),
}
SMOKE_SHAPES = {"tiny": (256, 256, 4, 8)}
FORMATS = ("plain-bf16", "int8", "int4")
# (gate/up rows, down rows, bytes of each row per loop step, warps); columns = bytes / bytes per weight. int4's
# loop wants 1024 columns per warp (8 pieces x 4 rows = 32 threads, each tile's rows in one thread's registers)
CONFIGS = {
    "int4": [(16, 8, 512, 1), (8, 8, 512, 1), (4, 4, 512, 1), (16, 16, 512, 1), (8, 8, 1024, 2), (16, 4, 512, 1)],
    "other": [(16, 8, 512, 4), (8, 8, 512, 4), (4, 4, 512, 4), (16, 16, 1024, 8), (32, 16, 256, 4), (8, 4, 1024, 2)],
    # int4 with a tile's 4 rows in each thread (Blocks.int4_rows=1): a thread holds 4 words of BT tiles' rows
    "int4-rows": [  # the fastest first (benchmarks/README.md, 2026-12-02), then larger programs
        (32, 16, 256, 4),
        (32, 32, 256, 4),
        (8, 8, 512, 2),
        (16, 8, 256, 2),
        (64, 32, 256, 8),
        (64, 16, 256, 4),
        (32, 16, 512, 4),
        (64, 32, 512, 8),
    ],  # fmt: skip
}
BYTES_PER_COL = {"plain-bf16": 2.0, "int8": 1.0, "int4": 0.5}
ACT = "silu"


def random_plain(r: int, hidden: int, inter: int, device, seed: int = 0, dtype=torch.bfloat16):
    """Stacked gate, up [r, I, H] and down [r, H, I] of N(0, 1/fan_in) weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda *shape: (torch.randn(*shape, generator=g, device=device) * shape[-1] ** -0.5).to(dtype)
    return mk(r, inter, hidden), mk(r, inter, hidden), mk(r, hidden, inter)


def random_tiled(r: int, fmt: str, group: int, hidden: int, inter: int, device, seed: int = 0):
    """r rows of random tiled experts (gate_up [r, Ip/2, bytes], down [r, Hp/4, bytes]) made on the device in
    the layout's byte format directly (packing full-size experts on the CPU takes minutes): random bodies, valid
    scales (int8 fp32, int4 bf16 around 0.01) and int4 zero points; bf16 bodies are N(0, 1) values."""
    g = torch.Generator(device=device).manual_seed(seed)
    hp, ip = -(-hidden // PAD) * PAD, -(-inter // PAD) * PAD

    def tiles(n_tiles, k):
        tb, hb = _tile_bytes(fmt, group, k), _header_bytes(fmt, group, k)
        if fmt == "bf16":
            out = torch.randn(r, n_tiles, tb // 2, generator=g, device=device).to(torch.bfloat16).view(torch.uint8)
            return out.reshape(r, n_tiles, tb)
        out = torch.randint(0, 256, (r, n_tiles, tb), generator=g, device=device, dtype=torch.uint8)
        out[:, :, :hb] = 0
        ng = ROWS * (k // group if group else 1)
        scale = torch.rand(r, n_tiles, ng, generator=g, device=device) * 0.01 + 0.005
        if fmt == "int8":
            out[:, :, : 4 * ng] = scale.view(torch.uint8).view(r, n_tiles, 4 * ng)
        else:
            out[:, :, : 2 * ng] = scale.to(torch.bfloat16).view(torch.uint8).view(r, n_tiles, 2 * ng)
            out[:, :, 2 * ng : 3 * ng] = torch.randint(0, 16, (r, n_tiles, ng), generator=g, device=device)
        return out

    return tiles(ip // 2, hp), tiles(hp // ROWS, ip)


def routings(calls: int, t: int, k: int, per_layer: int, rows: int, device, seed: int = 0):
    """Per call: (rows [t, k] int32, weights [t, k]): each call uses the next layer's rows, k distinct experts
    of that layer per token; and the number of distinct rows it touches."""
    g = torch.Generator().manual_seed(seed + t)
    out = []
    for c in range(calls):
        base = (c % (rows // per_layer)) * per_layer
        ids = torch.stack([torch.randperm(per_layer, generator=g)[:k] for _ in range(t)]) + base
        w = torch.softmax(torch.randn(t, k, generator=g), -1)
        out.append((ids.int().to(device), w.to(device), len(torch.unique(ids))))
    return out


class Timer:
    """Seconds per call of fn over `n` calls: CUDA events around graph replays on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, budget_s: float):
        self.device, self.budget_s = device, budget_s

    def __call__(self, fn, n: int, graph: bool = True) -> float:
        if self.device.type != "cuda":
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) / n
        fn()  # compile, warm up
        torch.cuda.synchronize()
        run = fn
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        run()
        torch.cuda.synchronize()
        times, spent = [], 0.0
        while len(times) < 3 or (spent < self.budget_s and len(times) < 200):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            spent += times[-1]
        return statistics.median(times) / n


def _is_block(fmt: str) -> bool:
    from cadenza.bench.cpu_kernel import _block_format

    return fmt not in FORMATS and _block_format(fmt)


def block_tiles(r: int, fmt: str, hidden: int, inter: int, device, seed: int = 0):
    """r rows of a block-format layer (a file's blocks, "q4_k+q6_k" for a pair) from random GGUF blocks, packed on
    the CPU (cadenza.bench.cpu_kernel.block_layer) and moved to the device; its kernel arguments."""
    from cadenza.bench.cpu_kernel import block_layer

    p = block_layer(fmt, {"experts": r, "hidden": hidden, "intermediate": inter}, seed)
    kw = {"fmt": fmt, "group": p.group, "hidden": hidden, "intermediate": inter}
    return (p.gate_up.to(device), p.down.to(device)), kw


def configs_for(fmt: str, gm) -> list:
    bpc = BYTES_PER_COL.get(fmt) or gm._BYTES_PER_COL[fmt.partition("+")[0]]
    cols = lambda b: max(128, int(b / bpc))
    out = [gm.Blocks(gu, cols(b), dn, cols(b), w) for gu, dn, b, w in CONFIGS["int4" if fmt == "int4" else "other"]]
    if fmt == "int4":
        out += [gm.Blocks(gu, cols(b), dn, cols(b), w, int4_rows=1) for gu, dn, b, w in CONFIGS["int4-rows"]]
    return out


def bench_decode(gm, shape: str, fmt: str, dims, tokens: list[int], timer: Timer, device, smoke: bool) -> list[dict]:
    h, i, per_layer, n_rows = dims
    if fmt == "plain-bf16":
        mats, kw = random_plain(n_rows, h, i, device), {}
        expert_bytes = 3 * h * i * 2
    elif _is_block(fmt):
        mats, kw = block_tiles(n_rows, fmt, h, i, device)
        expert_bytes = (mats[0][0].numel() + mats[1][0].numel()) * mats[0].element_size()
    else:
        group = DEFAULT_GROUP[fmt]
        mats = random_tiled(n_rows, fmt, group, h, i, device)
        kw = {"fmt": fmt, "group": group, "hidden": h, "intermediate": i}
        expert_bytes = (mats[0][0].numel() + mats[1][0].numel()) * mats[0].element_size()
    out = []
    for t in tokens:
        calls = routings(CALLS if not smoke else 2, t, K_SLOTS, per_layer, n_rows, device)
        xs = [torch.randn(t, h, device=device).to(torch.bfloat16) for _ in calls]
        nbytes = statistics.mean(c[2] for c in calls) * expert_bytes
        default = gm.default_blocks(kw.get("fmt"), h, i, t * K_SLOTS)
        cands = [gm.Blocks(128, 256, 128, 256)] if smoke else list(dict.fromkeys([default, *configs_for(fmt, gm)]))
        ref = gm.moe_decode(xs[0], calls[0][0], calls[0][1], mats, ACT, route="torch", **kw).float()
        for cfg in cands:
            y = gm.moe_decode(xs[0], calls[0][0], calls[0][1], mats, ACT, blocks=cfg, **kw).float()
            err = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()

            def fn(cfg=cfg, calls=calls, xs=xs):
                for (rows, w, _), x in zip(calls, xs, strict=True):
                    gm.moe_decode(x, rows, w, mats, ACT, blocks=cfg, **kw)

            sec = timer(fn, len(calls))
            row = {"shape": shape, "format": fmt, "tokens": t, "k": K_SLOTS, "blocks": cfg.__dict__.copy()}
            row.update(default=cfg == default, us=round(sec * 1e6, 2), weight_bytes=int(nbytes))
            row.update(weight_gb_s=round(nbytes / sec / GB, 1), rel_err_vs_torch=float(f"{err:.2e}"))
            if device.type == "cuda" and cfg == default and t == 1:
                row["eager_us"] = round(timer(fn, len(calls), graph=False) * 1e6, 2)
            out.append(row)
        print(f"  {shape} {fmt} T={t}: {len(cands)} configs", file=sys.stderr)
    return out


def bench_prefill(gm, shape: str, fmt: str, dims, n: int, timer: Timer, device) -> dict:
    h, i = dims[0], dims[1]
    r = 4
    x = (torch.randn(n, h, device=device) * 0.5).to(torch.bfloat16)
    flops = 2 * n * 3 * h * i
    if fmt == "plain-bf16":
        gate, up, down = random_plain(r, h, i, device)
        act, j = torch.nn.functional.silu, [0]

        def mm():
            j[0] += 1  # the next expert each call
            e = j[0] % r
            return (act(x @ gate[e].T) * (x @ up[e].T)) @ down[e].T

        sec = timer(mm, 1, graph=False)
        return {"shape": shape, "format": fmt, "tokens": n, "us": round(sec * 1e6, 1), "tflop_s": flops / sec / 1e12}
    if _is_block(fmt):
        (gu, dn), kw = block_tiles(r, fmt, h, i, device)
        group = kw["group"]
    else:
        group = DEFAULT_GROUP[fmt]
        gu, dn = random_tiled(r, fmt, group, h, i, device)
    ws = (torch.empty(i, h, dtype=x.dtype, device=device), torch.empty(i, h, dtype=x.dtype, device=device))
    ws += (torch.empty(h, i, dtype=x.dtype, device=device),)
    j = [0]

    def deq():
        j[0] += 1
        gm.dequantize_into(gu[j[0] % r], dn[j[0] % r], fmt, group, h, i, *ws)

    def fwd():
        j[0] += 1
        gm.expert_forward(x, gu[j[0] % r], dn[j[0] % r], fmt, group, h, i, ACT, ws)

    t_deq, t_fwd = timer(deq, 1, graph=False), timer(fwd, 1, graph=False)
    moved = gu[0].numel() + dn[0].numel() + 3 * h * i * x.element_size()
    return {
        "shape": shape,
        "format": fmt,
        "tokens": n,
        "dequant_us": round(t_deq * 1e6, 1),
        "dequant_gb_s": round(moved / t_deq / GB, 1),
        "us": round(t_fwd * 1e6, 1),
        "tflop_s": flops / t_fwd / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cadenza.bench.gpu_kernel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one configuration (runs on the CPU)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--tokens", default=None, help="tokens per call (default 1,2,4,8; smoke 1,2)")
    ap.add_argument("--prefill-tokens", type=int, default=None, help="tokens of the prefill measurement (0: skip)")
    ap.add_argument("--seconds", type=float, default=0.02, help="replay time per measurement")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        ap.error("needs a CUDA GPU; on the CPU run --smoke (tiny shapes, Triton's interpreter)")
    if not cuda:  # before the kernels are defined: the interpreter runs them on CPU tensors
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from cadenza.kernels import gpu_moe as gm

    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = {s: shapes[s] for s in args.shapes.split(",") if s}
    formats = [f for f in args.formats.split(",") if f]
    bad = [f for f in formats if f not in FORMATS and not _is_block(f)]
    if bad:
        ap.error(f"unknown format {bad[0]!r}: use {', '.join(FORMATS)} or block formats (q4_k+q6_k, mxfp4, ...)")
    tokens = [int(t) for t in (args.tokens or ("1,2" if args.smoke else "1,2,4,8")).split(",") if t]
    n_prefill = args.prefill_tokens if args.prefill_tokens is not None else (16 if args.smoke else 512)

    t_start = time.perf_counter()
    device = torch.device("cuda" if cuda else "cpu")
    machine = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    machine["triton_path"] = gm.available(device)
    try:
        import triton

        machine["triton"] = triton.__version__
    except ImportError:
        machine["triton"] = None
    if cuda:
        print("measuring HBM copy and read bandwidth ...", file=sys.stderr)
        machine["copy_gb_s"] = round(measure_gpu_copy_gb_s(device), 1)
        machine["read_gb_s"] = round(measure_gpu_read_gb_s(device), 1)
        torch.cuda.empty_cache()
    timer = Timer(device, args.seconds)
    decode, prefill = [], []
    for shape, dims in shapes.items():
        for fmt in formats:
            print(f"{shape} {fmt}: decode ...", file=sys.stderr)
            decode += bench_decode(gm, shape, fmt, dims, tokens, timer, device, args.smoke)
            if n_prefill:
                prefill.append(bench_prefill(gm, shape, fmt, dims, n_prefill, timer, device))
            if cuda:
                torch.cuda.empty_cache()
    for r in decode:
        for key in ("copy_gb_s", "read_gb_s"):
            if machine.get(key):
                r[f"of_{key[:-5]}"] = round(r["weight_gb_s"] / machine[key], 3)
    out = {
        "command": "python -m cadenza.bench.gpu_kernel " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": git_commit(),
        "machine": machine,
        "act": ACT,
        "k": K_SLOTS,
        "best": best_per_case(decode),
        "decode": decode,
        "prefill": prefill,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print_table(out)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def best_per_case(decode: list[dict]) -> list[dict]:
    """Per (shape, format, tokens): the fastest configuration and the default's time."""
    cases: dict[tuple, list[dict]] = {}
    for r in decode:
        cases.setdefault((r["shape"], r["format"], r["tokens"]), []).append(r)
    out = []
    for (shape, fmt, t), rs in cases.items():
        best = min(rs, key=lambda r: r["us"])
        dflt = next((r for r in rs if r["default"]), best)
        row = {"shape": shape, "format": fmt, "tokens": t, "best_blocks": best["blocks"], "best_us": best["us"]}
        row.update(best_gb_s=best["weight_gb_s"], best_of_copy=best.get("of_copy"), default_us=dflt["us"])
        row.update(default_gb_s=dflt["weight_gb_s"], max_rel_err=max(r["rel_err_vs_torch"] for r in rs))
        out.append(row)
    return out


def print_table(out: dict) -> None:
    m = out["machine"]
    bw = f"copy {m.get('copy_gb_s')} GB/s, read {m.get('read_gb_s')} GB/s" if m.get("copy_gb_s") else "no GPU"
    print(f"{m['device']}: {bw}; triton {m['triton']} ({'kernels' if m['triton_path'] else 'torch fallback'})")
    print(
        f"{'shape':8} {'format':10} {'T':>3} {'best us':>9} {'GB/s':>7} {'of copy':>8}  {'default us':>10}  best blocks"
    )
    for r in out["best"]:
        b = r["best_blocks"]
        blocks = f"gu {b['gu_rows']}x{b['gu_cols']} dn {b['dn_rows']}x{b['dn_cols']} w{b['warps']}"
        blocks += " rows-in-thread" if b.get("int4_rows") else ""
        of = f"{r['best_of_copy']:.2f}" if r["best_of_copy"] is not None else "-"
        print(
            f"{r['shape']:8} {r['format']:10} {r['tokens']:>3} {r['best_us']:>9.1f} {r['best_gb_s']:>7.1f} {of:>8}  "
            f"{r['default_us']:>10.1f}  {blocks}  (err {r['max_rel_err']:.1e})"
        )
    for p in out["prefill"]:
        deq = f", dequantize {p['dequant_us']} us ({p['dequant_gb_s']} GB/s)" if "dequant_us" in p else ""
        print(f"prefill {p['shape']} {p['format']} {p['tokens']} tokens: {p['us']} us, {p['tflop_s']:.1f} TFLOP/s{deq}")
    print(f"wall {out['wall_s']} s")


if __name__ == "__main__":
    sys.exit(main())
