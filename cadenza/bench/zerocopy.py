"""`python -m cadenza.bench.zerocopy`: the GPU decode kernel reading experts straight from pinned host memory.

A non-resident expert is computed today on the CPU, or copied into a GPU slot first. A third way: the GPU's decode
kernel (cadenza.kernels.gpu_moe) reads the expert's bytes through the pinned host block's device mapping, with no
copy, no slot and no host decision. This measures what that path reads, alone and while the fused CPU kernel
computes other experts of the same host memory at the same time (the split it would serve):

- zero-copy: one and two Mixtral-sized experts per call (int4 and int8 tiles), GB/s of weights read, and whether
  the result equals the same kernel's on device copies of the same bytes;
- concurrent: the same kernel on one expert per call while a CPU thread runs the fused CPU kernel on other experts,
  each side's GB/s; and the CPU alone in the same conditions.

Needs CUDA, the stream memory operations' driver entry points (cadenza.kernels.handoff) and, for the concurrent
part, the fused CPU kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from cadenza.bench.gpu_kernel import random_tiled
from cadenza.kernels import cpu_moe, handoff
from cadenza.kernels import gpu_moe as gm
from cadenza.kernels.layout import PackedExperts, _header_bytes

GB = 1e9


def _zero_copy(fmt, group, h, i, experts, geo, cfg, host, dev_copies, device) -> dict:
    out = {}
    per_expert = host[0][0].numel() + host[1][0].numel()
    for k in (1, 2):
        x = torch.randn(1, h, device=device).bfloat16()
        wts = torch.full((1, k), 0.5, device=device)
        ids = [[[(2 * c + j) % experts for j in range(k)]] for c in range(8)]  # a different expert every call
        calls = [torch.tensor(r, device=device, dtype=torch.int32) for r in ids]
        y = torch.empty(k, h, device=device)

        def run(mats, calls=calls, x=x, wts=wts, y=y):
            for rows in calls:
                gm._tiled_decode(x, rows, wts, mats, 0, fmt, group, geo, cfg, y)

        run(host)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            run(host)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        s = statistics.median(times) / len(calls)
        gm._tiled_decode(x, calls[0], wts, dev_copies, 0, fmt, group, geo, cfg, y)
        want = y.clone()
        gm._tiled_decode(x, calls[0], wts, host, 0, fmt, group, geo, cfg, y)
        out[f"experts_{k}"] = {"us": round(s * 1e6, 1), "gb_s": round(k * per_expert / s / GB, 1)}
        out[f"experts_{k}"]["equal_to_device_copy"] = bool(torch.equal(y, want))
    return out


def _concurrent(fmt, group, h, i, experts, geo, cfg, host, pinned, device, seconds: float) -> dict:
    headers = _header_bytes(fmt, group, geo.hp), _header_bytes(fmt, group, geo.ip)
    layer = PackedExperts(fmt, group, experts, h, i, pinned[0], pinned[1], *headers)
    per_expert = pinned[0][0].numel() + pinned[1][0].numel()
    half = experts // 2
    stop, done = threading.Event(), [0]

    def cpu_loop():
        xs = torch.randn(1, h).bfloat16()
        while not stop.is_set():  # the upper half of the experts: never the GPU's
            ids = torch.tensor([[half + done[0] % (experts - half)]])
            cpu_moe.moe_forward(layer, xs, ids, torch.ones(1, 1), prefetch=2048)
            done[0] += 1

    def cpu_rate(gpu: bool) -> tuple[float, float]:
        stop.clear()
        done[0] = 0
        th = threading.Thread(target=cpu_loop)
        th.start()
        time.sleep(0.3)
        x = torch.randn(1, h, device=device).bfloat16()
        wts = torch.full((1, 1), 0.5, device=device)
        y = torch.empty(1, h, device=device)
        n0, t0, gpu_calls = done[0], time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            if gpu:
                for e in range(half):
                    rows = torch.tensor([[e]], device=device, dtype=torch.int32)
                    gm._tiled_decode(x, rows, wts, host, 0, fmt, group, geo, cfg, y)
                torch.cuda.synchronize()
                gpu_calls += half
            else:
                time.sleep(0.01)
        dt, n1 = time.perf_counter() - t0, done[0]
        stop.set()
        th.join()
        return (n1 - n0) * per_expert / dt / GB, gpu_calls * per_expert / dt / GB

    cpu_with, gpu_with = cpu_rate(True)
    cpu_alone, _ = cpu_rate(False)
    return {"gpu_gb_s": round(gpu_with, 1), "cpu_gb_s": round(cpu_with, 1), "cpu_alone_gb_s": round(cpu_alone, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cadenza.bench.zerocopy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="int4,int8")
    ap.add_argument("--experts", type=int, default=16, help="Mixtral-sized experts in pinned host memory")
    ap.add_argument("--seconds", type=float, default=1.0, help="window of the concurrent measurement")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m cadenza.bench.zerocopy needs a CUDA GPU")
    ops = handoff.memops()
    if ops is None:
        raise SystemExit(f"the driver's host-mapping entry points are unavailable: {handoff.unavailable_reason()}")
    device = torch.device("cuda", torch.cuda.current_device())
    h, i = 4096, 14336
    results = {}
    for fmt in args.formats.split(","):
        group = {"int4": 64, "int8": 0}[fmt]
        dev_copies = random_tiled(args.experts, fmt, group, h, i, device)
        pinned = tuple(m.cpu().pin_memory() for m in dev_copies)
        host = tuple(handoff.device_view(ops, m, device) for m in pinned)
        geo = gm._tiled(*host, fmt, group, h, i)
        cfg = gm.default_blocks(fmt, h, i, 1)
        row = _zero_copy(fmt, group, h, i, args.experts, geo, cfg, host, dev_copies, device)
        if cpu_moe.available():
            both = (fmt, group, h, i, args.experts, geo, cfg, host, pinned, device, args.seconds)
            row["concurrent"] = _concurrent(*both)
        results[fmt] = row
        print(fmt, row, flush=True)
        del dev_copies, host, pinned
    if args.out:
        args.out.write_text(
            json.dumps(
                {"command": " ".join(["python -m cadenza.bench.zerocopy", *sys.argv[1:]]), "results": results}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
