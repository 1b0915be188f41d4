"""`python -m cadenza.bench.handoff`: what it costs a decode layer to hand its CPU share over through the stream.

A streamed layer (cadenza.moe.streamed) puts on a side stream: copies of x, ids and weights to pinned buffers, the
CPU job as a host function, the result's copy back; the main stream waits for it. This times that chain inside a
CUDA graph of `--layers` layers (as a decode step replays it), with one small GPU kernel per layer standing in for
the layer's GPU work, in variants that add one piece at a time:

- kernels: the GPU work alone (the floor);
- copies: + the side stream's four copies and its two joins with the main stream;
- one_copy: + the host function, with only x copied down;
- full: the whole chain, with an empty job (no expert is the CPU's), then with 1 and with all experts on the CPU
  (a Qwen3-30B-A3B layer's shapes by default), at `--threads` threads and at one.

Per variant: microseconds per layer (replay time / layers) and the job's own time per call (its stats).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cadenza.kernels import cpu_moe


def _chain(variant: str, x, ids, w, y_dev, bufs, side, launch, fn, layers: int):
    x_h, ids_h, w_h, y_h, job = bufs
    for _ in range(layers):
        x = x * 1.0001
        if variant == "kernels":
            continue
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            x_h.copy_(x, non_blocking=True)
            if variant != "one_copy":
                ids_h.copy_(ids, non_blocking=True)
                w_h.copy_(w, non_blocking=True)
            if variant != "copies":
                rc = launch(side.cuda_stream, fn, job)
                if rc != 0:
                    raise RuntimeError(f"cuLaunchHostFunc failed ({rc})")
            y_dev.copy_(y_h, non_blocking=True)
        main.wait_stream(side)
        x = x + y_dev.to(x.dtype)
    return x


def measure(
    hidden: int = 2048, inter: int = 768, experts: int = 8, k: int = 8, layers: int = 48, threads: int | None = None,
    replays: int = 30,
) -> list[dict]:  # fmt: skip
    """The variants' rows (see the module's docstring); needs CUDA and the fused CPU kernel."""
    from cadenza.moe.cpu import physical_cores
    from cadenza.moe.streamed import _driver

    if not torch.cuda.is_available() or not cpu_moe.available():
        raise SystemExit("the handoff benchmark needs a CUDA GPU and the fused CPU kernel")
    launch, fn = _driver(), cpu_moe.job_function()
    if launch is None:
        raise SystemExit("cuLaunchHostFunc was not found in the CUDA driver")
    threads = threads or max(1, physical_cores() - 1)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(experts, inter, hidden, generator=g).bfloat16() for _ in range(2))
    down = torch.randn(experts, hidden, inter, generator=g).bfloat16()
    layer = cpu_moe.plain_layer(gate, up, down)
    side = torch.cuda.Stream()
    x = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
    ids = torch.arange(k, device=dev).view(1, k) % experts
    w = torch.full((1, k), 0.1, device=dev)
    y_dev = torch.zeros(1, hidden, device=dev)
    rows = []
    plan = [("kernels", threads, 0), ("copies", threads, 0), ("one_copy", threads, 0), ("full", threads, 0),
            ("full", 1, 0), ("full", threads, 1), ("full", 1, 1), ("full", threads, experts)]  # fmt: skip
    for variant, th, on_cpu in plan:
        pin = dict(pin_memory=True)
        x_h = torch.zeros(1, hidden, dtype=torch.bfloat16, **pin)
        ids_h, w_h = torch.zeros(1, k, dtype=torch.int64, **pin), torch.zeros(1, k, **pin)
        y_h = torch.zeros(1, hidden, **pin)
        mask = torch.zeros(experts, dtype=torch.uint8)
        mask[:on_cpu] = 1
        stats = torch.zeros(8 + experts + 2, dtype=torch.int64)
        job = cpu_moe.job_new(layer, x_h, ids_h, w_h, mask, "silu", th, y_h, stats, 1)
        bufs = (x_h, ids_h, w_h, y_h, job)
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                _chain(variant, x, ids, w, y_dev, bufs, side, launch, fn, layers)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin()
                _chain(variant, x, ids, w, y_dev, bufs, side, launch, fn, layers)
                graph.capture_end()
            torch.cuda.current_stream().wait_stream(s)
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
            calls0, busy0 = int(stats[0]), int(stats[5])
            t0 = time.perf_counter()
            for _ in range(replays):
                graph.replay()
            torch.cuda.synchronize()
            us = (time.perf_counter() - t0) / replays / layers * 1e6
            calls = int(stats[0]) - calls0
            busy = (int(stats[5]) - busy0) / max(calls, 1) / 1e3
        finally:
            torch.cuda.synchronize()
            cpu_moe.job_free(job)
        rows.append({"variant": variant, "threads": th, "experts_on_cpu": on_cpu, "us_per_layer": round(us, 1),
                     "job_us_per_call": round(busy, 1) if calls else None})  # fmt: skip
        print(f"{variant:9s} threads={th:2d} experts on the CPU={on_cpu}: {us:7.1f} us/layer"
              + (f" (job {busy:.1f} us/call)" if calls else ""), flush=True)  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cadenza.bench.handoff", description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None, help="the job's threads (default: physical cores - 1)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    rows = measure(args.hidden, args.inter, args.experts, layers=args.layers, threads=args.threads)
    if args.out:
        from cadenza.bench.machine import git_commit, machine_info

        line = " ".join(sys.argv[1:] if argv is None else argv)
        out = {"command": f"python -m cadenza.bench.handoff {line}", "commit": git_commit(), "args": vars(args),
               "machine": machine_info(torch.device("cuda")), "results": rows}  # fmt: skip
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
