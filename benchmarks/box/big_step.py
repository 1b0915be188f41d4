"""A big step's routed experts on the GPU, one layer, both ways gpu_grouped has: the grouped kernel (counts unknown:
a weight dequantized per block of 16-32 pairs) against dequantize-first (counts known on the host: a chunk of
experts dequantized once, then cuBLAS / torch._grouped_mm). Shapes: T1's Mixtral int4 layer (8 experts) at 512
decode rows and a ~2150-token mixed pass; T2's Qwen3-30B-A3B int4 layer (128 experts, 8 a token) at 171, 1024 and
2000 tokens; a Mixtral Q4_K/Q6_K layer at a 512-token prefill. Random tiles made on the GPU
(bench.gpu_kernel.random_tiled), bf16 x, every expert resident. Prints ms a call (CUDA events, median of 7), the
effective TFLOPS and the peak memory beyond the inputs; writes $OUT/big-step.json.

source benchmarks/box/setup.sh; python3 benchmarks/box/big_step.py  (~30 s)"""

import json
import os
import statistics
from pathlib import Path

import torch

from cadenza.bench.gpu_kernel import random_tiled
from cadenza.bench.machine import cuda_times
from cadenza.kernels import gpu_grouped

CASES = [  # (name, fmt, group, H, I, experts, k, tokens)
    ("T1 Mixtral int4, decode rows", "int4", 64, 4096, 14336, 8, 2, 512),
    ("T1 Mixtral int4, mixed pass", "int4", 64, 4096, 14336, 8, 2, 2150),
    ("T2 Qwen3 int4, decode rows", "int4", 64, 2048, 768, 128, 8, 171),
    ("T2 Qwen3 int4, mixed pass", "int4", 64, 2048, 768, 128, 8, 1024),
    ("T2 Qwen3 int4, mixed pass", "int4", 64, 2048, 768, 128, 8, 2000),
    ("G1 Mixtral Q4_K_M, prefill", "q4_k+q6_k", 0, 4096, 14336, 8, 2, 512),
]


def layer(fmt, group, h, i, r):
    """((gate_up, down) on the GPU, the layout's group)."""
    if "+" not in fmt:
        return random_tiled(r, fmt, group, h, i, "cuda"), group
    from tests.kernels.test_gpu_moe import block_layer  # random GGUF blocks (the tests' helper; needs the checkout)

    p = block_layer(fmt, r, h, i)
    return (p.gate_up.cuda(), p.down.cuda()), p.group


def timed(fn, repeat: int = 7) -> float:
    """ms a call: the median of `repeat` (the recorded numbers are medians; machine_info keeps the best)."""
    return statistics.median(cuda_times(fn, torch.device("cuda"), repeat)) * 1e3


def case(name, fmt, group, h, i, r, k, t) -> dict:
    """One shape: both ways timed, their peak memory beyond the inputs, and how far apart their outputs are."""
    mats, group = layer(fmt, group, h, i, r)
    g = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, h, device="cuda", generator=g).bfloat16() * 0.1
    ids = torch.rand(t, r, device="cuda", generator=g).topk(k, dim=1).indices.int()
    w = torch.rand(t, k, device="cuda", generator=g)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=r).tolist()
    kw = dict(fmt=fmt, group=group, hidden=h, intermediate=i)
    flops = 2 * 3 * h * i * t * k
    row = {"case": name, "fmt": fmt, "tokens": t, "experts": r, "k": k}
    os.environ[gpu_grouped.DEQUANT_ENV] = "1"
    outs = []
    for way, extra in (("grouped kernel", {}), ("dequantize first", {"row_counts": counts})):

        def fn(extra=extra):
            return gpu_grouped.moe_grouped(x, ids, w, mats, "silu", **kw, **extra)

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = timed(fn)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        row[way] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "peak_mib": round(peak, 1)}
        outs.append(fn().float())
    row["rel_diff"] = round(((outs[0] - outs[1]).norm() / outs[0].norm()).item(), 5)
    return row


def main() -> None:
    out = Path(os.environ.get("OUT", "."))
    rows = []
    for c in CASES:
        row = case(*c)
        rows.append(row)
        a, b = row["grouped kernel"], row["dequantize first"]
        way = lambda d: f"{d['ms']:8.3f} ms ({d['tflops']:6.1f} TFLOPS, +{d['peak_mib']:.0f} MiB)"  # noqa: E731
        print(f"{row['case']:30s} {row['tokens']:5d} tokens: grouped kernel {way(a)}, dequantize first {way(b)}: "
              f"x{a['ms'] / b['ms']:.2f}, rel diff {row['rel_diff']}", flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    (out / "big-step.json").write_text(json.dumps({"machine": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
