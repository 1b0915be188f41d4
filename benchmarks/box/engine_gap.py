"""Why the CPU's share of a decode step was slower inside the engine than alone. Session 19 measured G1 (Mixtral
Q4_K_M, every expert on the host) reading its experts at 51 GB/s inside decode steps, while tile_memory.py ran the
same kernel on the same kind of memory (repack.cpp's tiles, pinned) at 81.6 GB/s. Session 20's answer (with the
kernel's guided runs, cb0c2c4): 85.6 in the engine against 85.4 alone, and 93.5 with GOMP_SPINCOUNT=0, now
cadenza's default where a GPU is present (cadenza/__init__.py); the variant "libgomp's spinning" is the old default.

This writes a Mixtral-8x7B Q4_K_M GGUF (LAYERS layers, default all 32: the engine's working set, 30 GB of tiles)
into /dev/shm once, then per variant, in a fresh process (libgomp reads its environment at start): loads it with
every expert on the host (policy cpu), decodes, and reports tok/s and the CPU share's GB/s from the engine's
counters; then, in the same process with the engine idle, the loaded layers' own tiles through the kernel alone
(the engine's threads and prefetch), over all layers and over two (the working set tile_memory.py had). Variants:
the default; libgomp's spinning (GOMP_SPINCOUNT=300000, libgomp's own default); OMP_WAIT_POLICY=passive; 14 CPU
threads; CUDA graphs off. Writes $OUT/engine-gap.txt.

python3 benchmarks/box/engine_gap.py [LAYERS]   (~3 minutes at 32 layers; ENGINE_GAP_DEVICE=cpu: a smoke test of the
script on a machine without a GPU, the GPU side emulated)"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

FILE = Path("/dev/shm/cadenza-engine-gap-Q4_K_M.gguf")
VARIANTS = [
    ("default", {}, []),
    ("libgomp's spinning", {"GOMP_SPINCOUNT": "300000"}, []),
    ("OMP_WAIT_POLICY=passive", {"OMP_WAIT_POLICY": "passive"}, []),
    ("14 threads", {}, ["--threads", "14"]),
    ("no CUDA graphs", {}, ["--no-graphs"]),
]


def child(argv: list[str]) -> None:
    import numpy as np
    import torch

    from cadenza import LLM, SamplingParams
    from cadenza.kernels import cpu_moe

    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else None
    device = os.environ.get("ENGINE_GAP_DEVICE", "cuda")
    llm = LLM(
        str(FILE), device=device, gpu_memory="0GiB", offload_policy="cpu", max_context=256, cpu_threads=threads,
        cuda_graphs="--no-graphs" not in argv,
    )  # fmt: skip
    prompt = list(range(1, 65))
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm.generate(prompt, greedy)  # warm: the graphs captured, the calibration done
    r = llm.generate(prompt, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
    s = r.stats
    cpu_s = s.decode_breakdown["cpu_experts_s"]
    engine = s.decode_host_bytes / cpu_s / 1e9 if cpu_s else float("nan")
    out = {"decode_tok_s": round(s.decode_tok_s, 2), "engine_gb_s": round(engine, 1)}
    orch = llm.orchestra
    layers = [layer.kernel_layer for layer in orch.layers]
    eb = orch.layers[0].expert_bytes
    rng = np.random.default_rng(0)
    x = torch.randn(1, layers[0].hidden).to(torch.bfloat16)
    w = torch.full((1, 2), 0.5)

    def alone(over: list) -> float:  # the kernel from this thread, the engine idle: GB/s
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0 or n < 20:
            ids = torch.from_numpy(rng.choice(layers[0].num_experts, 2, replace=False)).view(1, 2)
            cpu_moe.moe_forward(
                over[n % len(over)], x, ids, w, None, "silu", orch.worker.threads, route="kernel",
                prefetch=orch.cpu_prefetch,
            )  # fmt: skip
            n += 1
        return round(n * 2 * eb / (time.perf_counter() - t0) / 1e9, 1)

    out["alone_gb_s"] = alone(layers)
    out["alone_2_layers_gb_s"] = alone(layers[:2])  # tile_memory.py's working set: what the page tables cost
    out["threads"], out["prefetch"] = orch.worker.threads, orch.cpu_prefetch
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    from cadenza.bench.gguf_export import write_gguf
    from cadenza.bench.synthetic import SyntheticCheckpoint

    lines = []
    if not FILE.exists():
        t0 = time.perf_counter()
        write_gguf(SyntheticCheckpoint("mixtral-8x7b", seed=0, layers=layers), FILE, "q4_k_m")
        lines.append(f"wrote {FILE} ({FILE.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - t0:.0f} s")
        print(lines[-1], flush=True)
    try:
        for name, env, args in VARIANTS:
            run = subprocess.run(
                [sys.executable, __file__, "--child", *args], env={**os.environ, **env}, capture_output=True, text=True
            )
            got = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            if run.returncode or not got:
                lines.append(f"{name}: failed (rc {run.returncode}): {run.stderr.strip().splitlines()[-3:]}")
            else:
                r = json.loads(got[-1][7:])
                lines.append(
                    f"{name:24s}: decode {r['decode_tok_s']:6.2f} tok/s, CPU share in the engine "
                    f"{r['engine_gb_s']:5.1f} GB/s, the same tiles alone {r['alone_gb_s']:5.1f} GB/s "
                    f"(2 layers' alone {r['alone_2_layers_gb_s']:5.1f}) "
                    f"({r['threads']} threads, prefetch {r['prefetch']})"
                )
            print(lines[-1], flush=True)
    finally:
        FILE.unlink(missing_ok=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "engine-gap.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    child(sys.argv[2:]) if sys.argv[1:2] == ["--child"] else main()
