"""Why the box packs int4 experts at 0.67 GB/s with 16 threads (the load's timing line: 4.22 s a Mixtral layer)
when one thread of the development machine packs ~1.1 GB/s: `layout.pack_layer` on one Mixtral-shaped layer of 2
experts (700 MB bf16) and one Qwen3-30B-shaped layer of 128 experts (1.2 GB), at 1-16 threads and three chunk
sizes. If the rate stops growing past ~3 threads whatever the chunk, the Python threads queue on the GIL (~15-30
torch calls a chunk); if larger chunks help, per-call overhead is the limit. Last, 16 threads again while another
thread copies expert-sized tensors with torch's default intra-op team, as the loader's reader does: if that alone
halves the rate, the reader's OpenMP team (spinning between its copies) takes the packers' cores.
Writes $OUT/pack-speed.txt."""

import os
import threading
import time
from pathlib import Path

import torch

from cadenza.kernels import layout


def rate(mats, threads: int) -> float:
    t0 = time.perf_counter()
    layout.pack_layer(*mats, "int4", 64, threads=threads)
    return sum(m.numel() * 2 for m in mats) / 1e9 / (time.perf_counter() - t0)


def reader(src, dst, stop: threading.Event, copies: list[int]) -> None:
    """One expert matrix at a time, as the loader fills a layer's stacks."""
    while not stop.is_set():
        dst.copy_(src)
        copies[0] += 1


def main() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"mixtral": (2, 14336, 4096), "qwen3": (128, 768, 2048)}
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs"]
    for name, (e, i, h) in shapes.items():
        mats = [torch.randn(e, i, h, generator=g).to(torch.bfloat16) for _ in range(2)]
        mats.append(torch.randn(e, h, i, generator=g).to(torch.bfloat16))
        rate(mats, 4)  # warm: the buffers' first pages
        for chunk in (1 << 18, 1 << 19, 1 << 21):
            layout._CHUNK_ELEMENTS = chunk
            got = [f"{t}: {rate(mats, t):.2f}" for t in (1, 2, 4, 8, 16)]
            lines.append(f"{name} chunk {chunk}: GB/s by threads " + ", ".join(got))
            print(lines[-1], flush=True)
        layout._CHUNK_ELEMENTS = 1 << 19
        src, dst = torch.randn(h * i).to(torch.bfloat16), torch.empty(h * i, dtype=torch.bfloat16)
        stop, copies = threading.Event(), [0]
        t = threading.Thread(target=reader, args=(src, dst, stop, copies))
        t.start()
        got = f"{rate(mats, 16):.2f}"
        stop.set()
        t.join()
        lines.append(f"{name} chunk {1 << 19}, 16 threads beside a copying reader: {got} GB/s ({copies[0]} copies)")
        print(lines[-1], flush=True)
    (Path(os.environ.get("OUT", "/tmp")) / "pack-speed.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
