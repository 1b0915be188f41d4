"""Whether the CPU decode attention of `--kv-cache host` (cadenza/kernels/cpu_attention.cpp) reads the host KV cache
at memory speed on this machine: one layer's decode step at the offline job's shapes (T1: Mixtral, 32 query / 8 KV
heads; T2: Qwen3-30B-A3B, 32 / 4; gpt-oss, 64 / 8 of 64 columns) and batches, bf16 cache, against a plain read of
the same bytes (torch's sum over a buffer of that size), at 16 and 15 threads. Session 23's T2 timeline had the
attention at ~2.6 ms a layer with the q copy's wait for the GPU inside it; the kernel alone on the development
machine's 2 cores computed at its multiply-add limit (Qwen3's heads 9 GB/s, memory 50). Writes
$OUT/cpu-attention.txt (stdout without $OUT).

source benchmarks/box/setup.sh; python3 benchmarks/box/cpu_attention.py  (~30 s; THREADS=1,2 on another machine)"""

import os
import time
from pathlib import Path

import torch

from cadenza.kernels import cpu_attention

SHAPES = {  # name: (query heads, KV heads, head dim, batch, positions)
    "T1 Mixtral": (32, 8, 128, 512, 192),
    "T2 Qwen3-30B-A3B": (32, 4, 128, 171, 192),
    "gpt-oss": (64, 8, 64, 256, 192),
}


def timed(fn, repeat: int = 10) -> float:
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    lines = []
    if not cpu_attention.available():
        raise SystemExit("the CPU attention kernel does not build on this machine")
    for threads in (int(t) for t in os.environ.get("THREADS", "16,15").split(",")):
        torch.set_num_threads(threads)
        for name, (n, kv, d, b, s) in SHAPES.items():
            k = torch.randn(b, kv, s, d).to(torch.bfloat16)
            v = torch.randn(b, kv, s, d).to(torch.bfloat16)
            q = torch.randn(b, n, 1, d)
            nbytes = k.nbytes + v.nbytes
            att = timed(lambda q=q, k=k, v=v, d=d: cpu_attention.decode(q, k, v, None, d**-0.5))
            flat = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
            read = timed(flat.sum)
            lines.append(
                f"{threads:2d} threads  {name:18s} batch {b:3d} x {s} positions, {nbytes / 1e6:6.1f} MB: attention "
                f"{att * 1e3:6.3f} ms ({nbytes / att / 1e9:5.1f} GB/s), plain read {nbytes / read / 1e9:5.1f} GB/s"
            )
            print(lines[-1], flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "cpu-attention.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
