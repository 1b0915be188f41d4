"""How fast a GGUF's expert blocks move into the kernels' tiles: repack.cpp (the loader's path since session 18)
against numpy's (blocks.from_gguf + layout.write_block_expert, before), on one Mixtral-8x7B layer's Q4_K_M shapes
(2 experts of Q4_K gate/up and Q6_K down: ~230 MB of blocks), into fresh pages (as a load: each page faulted on
first write) and into touched ones (the copy alone), at 1, 4, 8 and 16 threads. Session 17's G1 load spent 16 s
of 31.2 moving 28 GB this way. Writes $OUT/repack-speed.txt (stdout without $OUT).

python3 benchmarks/box/repack_speed.py"""

import os
import time
from pathlib import Path

import numpy as np

from cadenza.kernels import repack
from cadenza.kernels.blocks import from_gguf
from cadenza.kernels.layout import empty_packed, write_block_expert

HIDDEN, INTER, EXPERTS = 4096, 14336, 2
PER = {"Q4_K": 144, "Q6_K": 210}


def blocks(gguf_type: str, rows: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, k // 256 * PER[gguf_type]), dtype=np.uint8)


def main() -> None:
    gate_up = [("Q4_K", blocks("Q4_K", EXPERTS * INTER, HIDDEN, seed), HIDDEN) for seed in (1, 2)]
    mats = [*gate_up, ("Q6_K", blocks("Q6_K", EXPERTS * HIDDEN, INTER, 3), INTER)]
    total = sum(m[1].nbytes for m in mats)
    lines = [f"one Mixtral layer's 2 experts, Q4_K gate/up + Q6_K down: {total / 1e6:.0f} MB of blocks"]
    t0 = time.perf_counter()
    out = empty_packed("q4_k+q6_k", None, EXPERTS, HIDDEN, INTER)
    write_block_expert(out, 0, *(from_gguf(t, raw, k) for t, raw, k in mats))
    lines.append(f"numpy (before), fresh pages: {total / 1e9 / (time.perf_counter() - t0):.2f} GB/s")
    for threads in (1, 4, 8, 16):
        for fresh in (True, False):
            out = empty_packed("q4_k+q6_k", None, EXPERTS, HIDDEN, INTER)
            if not fresh:
                out.gate_up.fill_(1)
                out.down.fill_(1)
            t0 = time.perf_counter()
            repack.repack_layer(out, mats, threads)
            rate = total / 1e9 / (time.perf_counter() - t0)
            lines.append(f"repack.cpp {threads:2d} threads, {'fresh' if fresh else 'touched'} pages: {rate:.2f} GB/s")
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "repack-speed.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
