"""`python -m cadenza.bench.handoff`: what it costs a decode layer to hand its CPU share over through the stream.

A streamed layer (cadenza.moe.offload.streamed) puts on a side stream: its inputs into pinned memory, the CPU job
started from the stream, the result back; the main stream waits for it. This times that chain inside a CUDA graph of
`--layers` layers (as a decode step replays it), with one small GPU kernel per layer standing in for the layer's GPU
work, in variants that add one piece at a time. The host function (cuLaunchHostFunc, the fallback):

- kernels: the GPU work alone (the floor);
- copies: + the side stream's four copies and its two joins with the main stream;
- one_copy: + the host function, with only x copied down;
- full: the whole chain, with an empty job (no expert is the CPU's), then with 1 and with all experts on the CPU
  (a Qwen3-30B-A3B layer's shapes by default), at `--threads` threads and at one.

The handoff worker (cadenza.kernels.handoff: a spinning thread asked with cuStreamWriteValue32, awaited with
cuStreamWaitValue32), where the device supports it:

- worker_ops: the request and its answer alone (a job that does nothing, no data);
- worker: the whole chain as streamed.py runs it (x, ids, w written through the pinned block's mapping, the
  result back in one copy), empty job, 1 and all experts, at `--threads` threads and at one;
- worker_copies / worker_mapped: the empty job with one copy each way / everything through the mapping;
- worker_napping: the empty job with a worker that naps between requests (the first layer after a pause).

Per variant: microseconds per layer (replay time / layers) and the job's own time per call (its stats). The target
for the worker's empty job is 20 us per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from cadenza.kernels import cpu_moe, handoff

TARGET_US = 20.0


def _chain(variant: str, c: SimpleNamespace):
    x, ids, w = c.x, c.ids, c.w
    for _ in range(c.layers):
        x = x * 1.0001
        if variant == "kernels":
            continue
        main = torch.cuda.current_stream()
        c.side.wait_stream(main)
        y_cpu = None
        with torch.cuda.stream(c.side):
            if variant.startswith("worker"):
                if variant != "worker_ops":
                    c.block.put(x, ids, w)
                c.ops.request(c.side.cuda_stream, c.word, c.slot)
                if variant != "worker_ops":
                    y_cpu = c.block.fetch()
            else:
                c.x_h.copy_(x, non_blocking=True)
                if variant != "one_copy":
                    c.ids_h.copy_(ids, non_blocking=True)
                    c.w_h.copy_(w, non_blocking=True)
                if variant != "copies":
                    rc = c.launch(c.side.cuda_stream, c.fn, c.job)
                    if rc != 0:
                        raise RuntimeError(f"cuLaunchHostFunc failed ({rc})")
                c.y_dev.copy_(c.y_h, non_blocking=True)
                y_cpu = c.y_dev
        main.wait_stream(c.side)
        if y_cpu is not None:
            x = x + y_cpu.to(x.dtype)
    return x


def _time(variant: str, c: SimpleNamespace) -> float:
    """Microseconds per layer of the chain replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _chain(variant, c)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        _chain(variant, c)
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(c.replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / c.replays / c.layers * 1e6


def measure(
    hidden: int = 2048,
    inter: int = 768,
    experts: int = 8,
    k: int = 8,
    layers: int = 48,
    threads: int | None = None,
    replays: int = 30,
) -> list[dict]:
    """The variants' rows (see the module's docstring); needs CUDA and the fused CPU kernel."""
    from cadenza.moe.cpu import physical_cores
    from cadenza.moe.offload.streamed import MAPPED_IN, MAPPED_OUT, _driver

    if not torch.cuda.is_available() or not cpu_moe.available():
        raise SystemExit("the handoff benchmark needs a CUDA GPU and the fused CPU kernel")
    launch = _driver()
    if launch is None:
        raise SystemExit("cuLaunchHostFunc was not found in the CUDA driver")
    threads = threads or max(1, physical_cores() - 1)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(experts, inter, hidden, generator=g).bfloat16() for _ in range(2))
    down = torch.randn(experts, hidden, inter, generator=g).bfloat16()
    c = SimpleNamespace(
        layer=cpu_moe.plain_layer(gate, up, down),
        experts=experts,
        k=k,
        hidden=hidden,
        layers=layers,
        replays=replays,
        mapped=(MAPPED_IN, MAPPED_OUT),
        side=torch.cuda.Stream(),
        launch=launch,
        fn=cpu_moe.job_function(),
        y_dev=torch.zeros(1, hidden, device=dev),
        ops=handoff.memops(),
        x=torch.randn(1, hidden, device=dev, dtype=torch.bfloat16),
        w=torch.full((1, k), 0.1, device=dev),
        ids=torch.arange(k, device=dev).view(1, k) % experts,
    )
    plan = [("kernels", threads, 0), ("copies", threads, 0), ("one_copy", threads, 0), ("full", threads, 0),
            ("full", 1, 0), ("full", threads, 1), ("full", 1, 1), ("full", threads, experts)]  # fmt: skip
    workers: dict[str, handoff.Worker] = {}
    problem = handoff.probe(dev)
    if problem is None:
        plan += [("worker_ops", threads, 0), ("worker", threads, 0), ("worker", 1, 0), ("worker", threads, 1),
                 ("worker", 1, 1), ("worker", threads, experts), ("worker_copies", threads, 0),
                 ("worker_mapped", threads, 0), ("worker_napping", threads, 0)]  # fmt: skip
        napping = handoff.Worker(pinned=True, spin_s=0.0, deep_after_s=3600.0)  # (always the short naps)
        workers = {"spinning": handoff.Worker(pinned=True), "napping": napping}
    else:
        print(f"(no worker variants: {problem})", flush=True)
    rows = []
    try:
        for variant, th, on_cpu in plan:
            worker = workers.get("napping" if variant == "worker_napping" else "spinning")
            rows.append(_variant(variant, th, on_cpu, c, worker))
    finally:
        torch.cuda.synchronize()
        for worker in workers.values():
            worker.close()
    if problem is None:
        by = {(r["variant"], r["threads"], r["experts_on_cpu"]): r["us_per_layer"] for r in rows}
        host, worker_us = by[("full", threads, 0)], by[("worker", threads, 0)]
        verdict = "met" if worker_us <= TARGET_US else "missed"
        print(
            f"empty job, per layer: host function {host:.1f} us, worker {worker_us:.1f} us (target <= "
            f"{TARGET_US:.0f} us: {verdict})",
            flush=True,
        )
    return rows


def _variant(variant: str, th: int, on_cpu: int, c: SimpleNamespace, worker: handoff.Worker | None) -> dict:
    mask = torch.zeros(c.experts, dtype=torch.uint8)
    mask[:on_cpu] = 1
    stats = torch.zeros(8 + c.experts + 2, dtype=torch.int64)
    row = {"variant": variant, "threads": th, "experts_on_cpu": on_cpu}
    job = None
    if variant == "worker_ops":
        c.slot, c.word = worker.add(handoff.noop_function(), 0), c.ops.device_pointer(worker.state)
    elif variant.startswith("worker"):
        mapped = {"worker_copies": (False, False), "worker_mapped": (True, True)}.get(variant, c.mapped)
        c.block = b = handoff.Block(1, c.k, c.hidden, torch.bfloat16, c.x.device, c.ops, *mapped)
        job = cpu_moe.job_new(c.layer, b.x, b.ids, b.w, mask, "silu", th, b.y, stats, 1)
        c.slot, c.word = worker.add(c.fn, job), c.ops.device_pointer(worker.state)
        row.update(mapped_in=b.mapped_in, mapped_out=b.mapped_out)
    elif variant != "kernels":
        pin = dict(pin_memory=True)
        c.x_h = torch.zeros(1, c.hidden, dtype=torch.bfloat16, **pin)
        c.ids_h, c.w_h = torch.zeros(1, c.k, dtype=torch.int64, **pin), torch.zeros(1, c.k, **pin)
        c.y_h = torch.zeros(1, c.hidden, **pin)
        job = c.job = cpu_moe.job_new(c.layer, c.x_h, c.ids_h, c.w_h, mask, "silu", th, c.y_h, stats, 1)
    try:
        calls0, busy0 = int(stats[0]), int(stats[5])
        us = _time(variant, c)
        calls = int(stats[0]) - calls0
        busy = (int(stats[5]) - busy0) / max(calls, 1) / 1e3
    finally:
        torch.cuda.synchronize()
        if job is not None:
            cpu_moe.job_free(job)  # (a worker's slot for it stays, never asked for again)
    row.update(us_per_layer=round(us, 1), job_us_per_call=round(busy, 1) if calls else None)
    print(
        f"{variant:14s} threads={th:2d} experts on the CPU={on_cpu}: {us:7.1f} us/layer"
        + (f" (job {busy:.1f} us/call)" if calls else ""),
        flush=True,
    )
    return row


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
        out = {
            "command": f"python -m cadenza.bench.handoff {line}",
            "commit": git_commit(),
            "args": vars(args),
            "machine": machine_info(torch.device("cuda")),
            "results": rows,
        }
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
