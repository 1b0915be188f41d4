"""Does the memory the expert tiles live in change the CPU kernel's speed? One-token layer steps (Mixtral-8x7B's
Q4_K_M shapes: Q4_K gate/up, Q6_K down, int8 activations) on the same tiles in differently made memory:

- repack16: torch.empty, filled by repack.cpp on 16 threads (how a GGUF loads since session 18);
- clone: a torch clone of it (how `cadenza.bench.cpu_kernel` makes its copies);
- hugepage: the same in an anonymous mapping advised MADV_HUGEPAGE (2 MB pages) before repack.cpp fills it;
- pinned: repack16's memory registered with cudaHostRegister (what the engine does to host experts);

each at 15 and 16 threads, software prefetch 0 and 2048 bytes, alone and beside one spinning thread (the engine's
main thread waiting on the GPU). G1's engine read its host experts at 51 GB/s (all on the host), cpu_kernel's bench
at 70. Writes $OUT/tile-memory.txt (stdout without $OUT).

python3 benchmarks/box/tile_memory.py [LAYERS]"""

import mmap
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cadenza.kernels import cpu_moe, repack
from cadenza.kernels.layout import empty_packed
from cadenza.moe.offload.host_memory import pin_host_memory

E, K, H, INTER = 8, 2, 4096, 14336
PER = {"Q4_K": 144, "Q6_K": 210}


def blocks(gguf_type: str, rows: int, k: int, seed: int) -> np.ndarray:
    out = np.random.default_rng(seed).integers(0, 256, (rows, k // 256 * PER[gguf_type]), dtype=np.uint8)
    # sane scales: a K-quant's fp16 d / dmin with a small exponent (random bytes give inf / nan as often as not)
    d = {"Q4_K": slice(0, 4), "Q6_K": slice(208, 210)}[gguf_type]
    view = out.reshape(rows, -1, PER[gguf_type])
    view[..., d] = np.frombuffer(np.float16(0.01).tobytes() * ((d.stop - d.start) // 2), np.uint8)
    return out


def huge_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised uint8 tensor of t's shape in a mapping advised MADV_HUGEPAGE, starting on a 2 MB boundary."""
    huge = 2 << 20
    m = mmap.mmap(-1, t.numel() + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(m, dtype=torch.uint8)  # its storage holds the mapping until freed
    skip = (-raw.data_ptr()) % huge
    return raw[skip : skip + t.numel()].view(t.shape)


def huge_share(t: torch.Tensor) -> str:
    """Of the mapping holding t, the share in huge pages (AnonHugePages / Rss of its smaps entry)."""
    p = t.data_ptr()
    rss = huge = None
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) > 1 and not head[0].endswith(":"):
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                inside = lo <= p < hi
            elif inside and head[0] == "Rss:":
                rss = int(head[1])
            elif inside and head[0] == "AnonHugePages:":
                huge = int(head[1])
                break
    return f"{huge / rss:.2f}" if rss and huge is not None else "?"


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    lines = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    try:
        say("THP: " + Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip())
        say("THP defrag: " + Path("/sys/kernel/mm/transparent_hugepage/defrag").read_text().strip())
    except OSError:
        pass
    mats = [("Q4_K", blocks("Q4_K", E * INTER, H, s), H) for s in (1, 2)]
    mats.append(("Q6_K", blocks("Q6_K", E * H, INTER, 3), INTER))

    def made(kind: str):
        out = empty_packed("q4_k+q6_k", None, E, H, INTER)
        if kind == "hugepage":
            out = replace(out, gate_up=huge_like(out.gate_up), down=huge_like(out.down))
        repack.repack_layer(out, mats, 16)
        if kind == "clone":
            out = replace(out, gate_up=out.gate_up.clone(), down=out.down.clone())
        if kind == "pinned":
            pinned = pin_host_memory(out.gate_up) and pin_host_memory(out.down)
            if not pinned:
                return None
        return out

    rng = np.random.default_rng(0)
    routes = [rng.choice(E, K, replace=False) for _ in range(64)]
    x = torch.randn(1, H).to(torch.bfloat16)
    w = torch.full((1, K), 0.5)
    os.environ[cpu_moe.ACTIVATIONS_ENV] = "int8"
    seconds = float(os.environ.get("SECONDS_EACH", "1.5"))
    best: dict[tuple[str, int], float] = {}  # (kind, threads) -> the best rate alone (either prefetch)
    for kind in ("repack16", "clone", "hugepage", "pinned"):
        t0 = time.perf_counter()
        copies = [made(kind) for _ in range(layers)]
        if copies[0] is None:
            say(f"{kind}: not made here (no CUDA)")
            continue
        eb = copies[0].expert_bytes
        say(
            f"{kind}: {layers} layers of {copies[0].nbytes / 1e9:.2f} GB made in {time.perf_counter() - t0:.1f} s, "
            f"huge-page share {huge_share(copies[0].gate_up)} / {huge_share(copies[0].down)}"
        )
        for busy in (False, True):
            if busy:  # another process, so the spinning holds no GIL of ours
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for threads in (15, 16):
                for pf in (0, 2048):
                    n, t_end, t_start = 0, None, time.perf_counter()
                    while True:
                        layer = copies[n % layers]
                        ids = torch.from_numpy(routes[n % len(routes)]).view(1, K)
                        cpu_moe.moe_forward(layer, x, ids, w, None, "silu", threads, route="kernel", prefetch=pf)
                        n += 1
                        t_end = time.perf_counter()
                        if t_end - t_start > seconds and n >= 20:
                            break
                    rate = n * K * eb / (t_end - t_start) / 1e9
                    if not busy:
                        best[kind, threads] = max(best.get((kind, threads), 0.0), rate)
                    say(
                        f"  {kind:9s} threads {threads} prefetch {pf:4d} {'+spinner' if busy else '        '}: "
                        f"{rate:6.1f} GB/s ({(t_end - t_start) / n * 1e3:.2f} ms a layer step)"
                    )
            if busy:
                spinner.kill()
                spinner.wait()
        del copies
    # the choice a later command in the same call can take (`source $OUT/tile-verdict.sh`: CADENZA_HUGE_PAGES is
    # what an allocator switch would read, none exists: 2026-12-03 measured no gain): huge pages where they gain 3%
    # or more over the loader's memory, 16 threads where they gain 2% over 15
    plain = max(best.get(("repack16", t), 0.0) for t in (15, 16))
    huge = max(best.get(("hugepage", t), 0.0) for t in (15, 16)) > 1.03 * plain
    kind = "hugepage" if huge else "repack16"
    threads = 16 if best.get((kind, 16), 0.0) > 1.02 * best.get((kind, 15), 0.0) else 15
    say(f"verdict: CADENZA_HUGE_PAGES={int(huge)} threads={threads}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tile-memory.txt").write_text("\n".join(lines) + "\n")
        Path(os.environ["OUT"], "tile-verdict.sh").write_text(
            f"export CADENZA_HUGE_PAGES={int(huge)}\nCPU_THREADS={threads}\n"
        )


if __name__ == "__main__":
    main()
