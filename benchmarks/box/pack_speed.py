"""(Since session 21 `layout.pack_layer` quantizes fp32 / bf16 experts in pack.cpp, OpenMP threads without Python's
GIL: this probe now times that path; set the torch path's question aside unless it is slow again.)

Why the box packs int4 experts at 0.67 GB/s with 16 threads (the load's timing line: 4.22 s a Mixtral layer)
when one thread of the development machine packs ~1.1 GB/s: `layout.pack_layer` on one Mixtral-shaped layer of 2
experts (700 MB bf16) and one Qwen3-30B-shaped layer of 128 experts (1.2 GB), at 1-16 threads and three chunk
sizes. If the rate stops growing past ~3 threads whatever the chunk, the Python threads queue on the GIL (~15-30
torch calls a chunk); if larger chunks help, per-call overhead is the limit. Last, 16 threads again while another
thread copies expert-sized tensors with torch's default intra-op team, as the loader's reader does: if that alone
halves the rate, the reader's OpenMP team (spinning between its copies) takes the packers' cores. And the reader's
own rate (T2's build read 235 MB/s while waiting only 71 of 258 s for packing): one synthetic Qwen3 layer's 384
expert tensors copied into fresh stacks, then into the same stacks again (page faults against copies), then again
while 16 threads pack a layer beside it, with the reader's default intra-op team and with one thread (a team
of 16 on 16 busy cores waits at every 3 MB copy's barrier for its slowest thread to be scheduled: if so, the loader
should read on one thread while it packs). Writes $OUT/pack-speed.txt."""

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
    for line in reader_rate(mats):
        lines.append(line)
        print(line, flush=True)
    (Path(os.environ.get("OUT", "/tmp")) / "pack-speed.txt").write_text("\n".join(lines) + "\n")


def reader_rate(pack_mats) -> list[str]:
    """The reader's GB/s copying one synthetic Qwen3 layer's experts into stacks, alone and beside packing."""
    from cadenza.bench.synthetic import SyntheticCheckpoint

    ck = SyntheticCheckpoint("qwen3-30b-a3b", layers=1)
    names = [n for n in ck.tensors if ck.is_routed_expert(n)]
    ck.tensor(names[0])  # the random pools
    stacks: dict[str, torch.Tensor] = {}

    def read() -> float:
        t0, n = time.perf_counter(), 0
        for name in names:
            x = ck.tensor(name)
            kind = name.rsplit(".", 2)[-2]
            e = int(name.split(".experts.")[1].split(".")[0])
            if kind not in stacks:
                stacks[kind] = torch.empty(128, *x.shape, dtype=x.dtype)
            stacks[kind][e].copy_(x)
            n += x.numel() * 2
        return n / 1e9 / (time.perf_counter() - t0)

    out = [f"reader alone, one Qwen3 layer into stacks: fresh {read():.2f} GB/s, recycled {read():.2f} GB/s"]
    before = torch.get_num_threads()
    for threads in (before, 1):
        torch.set_num_threads(threads)
        packing = threading.Thread(target=layout.pack_layer, args=(*pack_mats, "int4", 64), kwargs={"threads": 16})
        packing.start()
        got = read()
        packing.join()
        out.append(f"reader with {threads} intra-op threads beside 16 packing threads: {got:.2f} GB/s")
    torch.set_num_threads(before)
    return out


if __name__ == "__main__":
    main()
