"""What a decode step launches on the GPU, by kernel name: the GPU's share of a G1 step at 24 GiB was 10 ms for
1436 kernels (45 a layer) in session 19, where reading its bytes takes ~2 ms; this names them.

Writes a Mixtral-8x7B (or MODEL's) Q4_K_M GGUF of LAYERS layers (default 4) into /dev/shm, loads it with every
expert on the GPU and then with every expert on the host (policy cpu), runs eager decode steps under
torch.profiler and prints, per configuration: kernels a step and a layer, the step's time with CUDA graphs and
without, and each kernel name's launches a layer and mean / total microseconds a step. Writes
$OUT/layer-kernels.txt.

python3 benchmarks/box/layer_kernels.py [LAYERS] [MODEL]   (~1 minute; MODEL: mixtral-8x7b, or qwen3-30b-a3b for G2's
shapes)"""

import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

FILE = Path("/dev/shm/cadenza-layer-kernels-Q4_K_M.gguf")
MODEL = sys.argv[2] if len(sys.argv) > 2 else "mixtral-8x7b"


def steps_ms(step, token: int, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        token = step(token)
    return (time.perf_counter() - t0) / n * 1e3


def profile(budget: str, policy: str, layers: int) -> list[str]:
    from cadenza import LLM

    llm = LLM(str(FILE), device="cuda", gpu_memory=budget, offload_policy=policy, max_context=256)
    engine = llm.engine
    cache = engine.cache_for(1, 200)
    prompt = list(range(1, 33))
    token = int(torch.argmax(engine.forward(prompt, cache, last_only=True, rows=[0])[-1]))

    def graphed(t: int) -> int:
        return int(torch.argmax(engine.decode([t], cache, [0])[0]))

    def eager(t: int) -> int:
        ids = torch.tensor([[t]], dtype=torch.long, device="cuda")
        return int(torch.argmax(engine.model(ids, cache, last_only=True, rows=[0])[:, -1][0]))

    steps_ms(graphed, token, 4)
    g = steps_ms(graphed, token, 16)
    e = steps_ms(eager, token, 16)
    n = 8
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            token = eager(token)
        torch.cuda.synchronize()
    by = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total > 0:
            copy = "memcpy" in ev.name.lower() or "memset" in ev.name.lower()
            name = "[copy] " + ev.name if copy else ev.name
            by[name][0] += 1
            by[name][1] += ev.device_time_total
    kernels = sum(c for k, (c, _) in by.items() if not k.startswith("[copy]")) / n
    busy = sum(t for _, t in by.values()) / n / 1e3
    lines = [
        f"## {MODEL}, {layers} layers, gpu_memory {budget}, policy {policy}: step {g:.2f} ms with graphs, "
        f"{e:.2f} eager; "
        f"{kernels:.0f} kernels a step ({kernels / layers:.1f} a layer incl. the step's own), GPU busy {busy:.2f} ms",
        f"{'launches/layer':>14} {'mean us':>8} {'us/step':>8}  name",
    ]
    for name, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{c / n / layers:14.2f} {t / c:8.1f} {t / n:8.1f}  {name[:150]}")
    llm.close()
    torch.cuda.empty_cache()
    return lines


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    from cadenza.bench.gguf_export import write_gguf
    from cadenza.bench.synthetic import SyntheticCheckpoint

    if not FILE.exists():
        write_gguf(SyntheticCheckpoint(MODEL, seed=0, layers=layers), FILE, "q4_k_m")
    out = []
    try:
        for budget, policy in (("80GiB", "auto"), ("0GiB", "cpu")):
            out += profile(budget, policy, layers) + [""]
            print("\n".join(out[-40:]), flush=True)
    finally:
        FILE.unlink(missing_ok=True)
    if os.environ.get("OUT"):
        name = "layer-kernels.txt" if MODEL == "mixtral-8x7b" else f"layer-kernels-{MODEL}.txt"
        Path(os.environ["OUT"], name).write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
