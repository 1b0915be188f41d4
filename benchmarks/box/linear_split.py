"""The decode product of a dense layer kept in GGUF blocks (cadenza.kernels.gpu_linear.BlockLinear) at one token,
by how many programs a launch aims for (K split to reach them; 1: never split, session 19's kernel): microseconds a
call and GB/s of its tiles, at Mixtral-8x7B's attention and head shapes. Random tile bytes (the timing does not
depend on the values). Writes $OUT/linear-split.txt and $OUT/linear-verdict.sh (the choice that makes a Mixtral
layer's four projections fastest, for CADENZA_LINEAR_PROGRAMS).

python3 benchmarks/box/linear_split.py   (~20 s)"""

import os
from pathlib import Path

import torch

from cadenza.kernels import blocks
from cadenza.kernels.gpu_linear import PROGRAMS, BlockLinear
from cadenza.kernels.layout import PAD, ROWS, _tile_bytes

SHAPES = [  # (name, GGUF type, out, in)
    ("q_proj / o_proj", "Q4_K", 4096, 4096),
    ("k_proj", "Q4_K", 1024, 4096),
    ("v_proj", "Q6_K", 1024, 4096),
    ("lm_head", "Q6_K", 32000, 4096),
]
CALLS = 64
CHOICES = sorted({1, 512, 1024, PROGRAMS, 4096, 8192})


def timed_us(layers: list[BlockLinear], x: torch.Tensor, programs: int) -> float:
    layers[0]._decode(x, torch.bfloat16, programs)  # compile
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(CALLS):
            layers[i % len(layers)]._decode(x, torch.bfloat16, programs)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / CALLS)
    return best


def main() -> None:
    times = []
    lines = [f"{'shape':16s} {'type':5s} {'programs':>8s} {'us':>7s} {'GB/s':>7s}"]
    for name, gtype, n, k in SHAPES:
        fmt = gtype.lower()
        kp = -(-k // PAD) * PAD
        shape = (-(-n // ROWS), _tile_bytes(fmt, blocks.BLOCK_FORMATS[fmt].group, kp))
        # copies rotated through the calls: the GPU's 60 MB L2 would hold one small layer between calls
        copies = max(1, int(4e8 // (shape[0] * shape[1])))
        tiles = [torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda") for _ in range(copies)]
        layers = [BlockLinear(fmt, k, n, t) for t in tiles]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for programs in CHOICES:
            us = timed_us(layers, x, programs)
            times.append((name, programs, us))
            gb = shape[0] * shape[1] / us / 1e3
            lines.append(f"{name:16s} {gtype:5s} {programs:8d} {us:7.1f} {gb:7.0f}")
            print(lines[-1], flush=True)
    # a Mixtral layer's launches (q, k, v, o) and a 32nd of the head, by choice: the verdict for the runs after
    weight = {"q_proj / o_proj": 2, "k_proj": 1, "v_proj": 1, "lm_head": 1 / 32}
    per_layer = {p: sum(weight[name] * us for name, p2, us in times if p2 == p) for p in CHOICES}
    best = min(per_layer, key=per_layer.get)
    lines.append("a layer's projections, us: " + ", ".join(f"{p}: {us:.1f}" for p, us in per_layer.items()))
    lines.append(f"best: {best}")
    print("\n".join(lines[-2:]), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "linear-split.txt").write_text("\n".join(lines) + "\n")
        Path(os.environ["OUT"], "linear-verdict.sh").write_text(f"export CADENZA_LINEAR_PROGRAMS={best}\n")


if __name__ == "__main__":
    main()
