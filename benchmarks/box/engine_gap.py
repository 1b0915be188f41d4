"""Why the CPU's share of a decode step was slower inside the engine than alone, and how long OpenMP's threads
should spin. Session 19 measured G1 (Mixtral Q4_K_M, every expert on the host) reading its experts at 51 GB/s inside
decode steps, while tile_memory.py ran the same kernel on the same kind of memory (repack.cpp's tiles, pinned) at
81.6 GB/s. Session 20's answer (with the kernel's guided runs, cb0c2c4): 85.6 in the engine against 85.4 alone, and
93.5 with GOMP_SPINCOUNT=0, now cadenza's default where a GPU is present (cadenza/__init__.py). Session 22's question:
G2 (Qwen3-30B-A3B Q4_K_M at 8 GiB) read its host experts at only 35-48 GB/s inside decode steps (Mixtral's 67-79):
its layer jobs are ~0.3-0.5 ms, and each of a job's start and ~3 barriers, with GOMP_SPINCOUNT=0, puts the threads
to sleep and wakes them again; llama.cpp under GOMP_SPINCOUNT=0 decoded that model ~30% slower (session 21).

This writes MODEL's Q4_K_M GGUF (LAYERS layers, default all) into /dev/shm once, then per variant, in a fresh process
(libgomp reads its environment at start): loads it at BUDGET with POLICY, decodes, and reports tok/s and the CPU
share's GB/s from the engine's counters; with every expert on the host also, in the same process with the engine
idle, the loaded layers' own tiles through the kernel alone (the engine's threads and prefetch), over all layers and
over two (the working set tile_memory.py had). VARIANTS=engine (default): the default; libgomp's spinning
(GOMP_SPINCOUNT=300000, libgomp's own default); OMP_WAIT_POLICY=passive; 14 CPU threads; CUDA graphs off.
VARIANTS=spin: GOMP_SPINCOUNT 0, 300, 1000, 3000, 10000, 300000 (a spin is a `pause`, ~40-140 cycles: ~20 us to
~20 ms). Writes $OUT/engine-gap[-TAG].txt.

MODEL=mixtral-8x7b BUDGET=0GiB POLICY=cpu VARIANTS=engine python3 benchmarks/box/engine_gap.py [LAYERS]
  (~3 minutes at 32 layers; ENGINE_GAP_DEVICE=cpu: a smoke test of the script on a machine without a GPU, the GPU
  side emulated)
MODEL=qwen3-30b-a3b BUDGET=8GiB POLICY=auto VARIANTS=spin TAG=g2-spin python3 benchmarks/box/engine_gap.py
  (G2's configuration, ~3-4 minutes)"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = os.environ.get("MODEL", "mixtral-8x7b")
BUDGET = os.environ.get("BUDGET", "0GiB")
POLICY = os.environ.get("POLICY", "cpu")
FILE = Path(f"/dev/shm/cadenza-engine-gap-{MODEL}-Q4_K_M.gguf")
VARIANTS = {
    "engine": [
        ("default", {}, []),
        ("libgomp's spinning", {"GOMP_SPINCOUNT": "300000"}, []),
        ("OMP_WAIT_POLICY=passive", {"OMP_WAIT_POLICY": "passive"}, []),
        ("14 threads", {}, ["--threads", "14"]),
        ("no CUDA graphs", {}, ["--no-graphs"]),
    ],
    "spin": [(f"GOMP_SPINCOUNT={n}", {"GOMP_SPINCOUNT": str(n)}, []) for n in (0, 300, 1000, 3000, 10000, 300000)],
}


def child(argv: list[str]) -> None:
    import numpy as np
    import torch

    from cadenza import LLM, SamplingParams
    from cadenza.kernels import cpu_moe

    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else None
    device = os.environ.get("ENGINE_GAP_DEVICE", "cuda")
    llm = LLM(
        str(FILE), device=device, gpu_memory=BUDGET, offload_policy=POLICY, max_context=256, cpu_threads=threads,
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
    out["threads"], out["prefetch"] = orch.worker.threads, orch.cpu_prefetch
    out["alone_gb_s"] = out["alone_2_layers_gb_s"] = None
    if orch.placement.resident_count:  # the layers' host tiles are only part of each layer: the engine's rate only
        print("RESULT " + json.dumps(out), flush=True)
        return
    layers = [layer.kernel_layer for layer in orch.layers]
    eb = orch.layers[0].expert_bytes
    rng = np.random.default_rng(0)
    x = torch.randn(1, layers[0].hidden).to(torch.bfloat16)
    k = llm.config.num_experts_per_tok
    w = torch.full((1, k), 1.0 / k)

    def alone(over: list) -> float:  # the kernel from this thread, the engine idle: GB/s
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 2.0 or n < 20:
            ids = torch.from_numpy(rng.choice(layers[0].num_experts, k, replace=False)).view(1, k)
            cpu_moe.moe_forward(
                over[n % len(over)], x, ids, w, None, "silu", orch.worker.threads, route="kernel",
                prefetch=orch.cpu_prefetch,
            )  # fmt: skip
            n += 1
        return round(n * k * eb / (time.perf_counter() - t0) / 1e9, 1)

    out["alone_gb_s"] = alone(layers)
    out["alone_2_layers_gb_s"] = alone(layers[:2])  # tile_memory.py's working set: what the page tables cost
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else None
    variants = VARIANTS[os.environ.get("VARIANTS", "engine")]
    from cadenza.bench.gguf_export import write_gguf
    from cadenza.bench.synthetic import SyntheticCheckpoint

    lines = [f"{MODEL} Q4_K_M, {layers or 'all'} layers, --gpu-memory {BUDGET}, policy {POLICY}"]
    if not FILE.exists():
        t0 = time.perf_counter()
        write_gguf(SyntheticCheckpoint(MODEL, seed=0, layers=layers), FILE, "q4_k_m")
        lines.append(f"wrote {FILE} ({FILE.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - t0:.0f} s")
        print(lines[-1], flush=True)
    try:
        for name, env, args in variants:
            run = subprocess.run(
                [sys.executable, __file__, "--child", *args], env={**os.environ, **env}, capture_output=True, text=True
            )
            got = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            if run.returncode or not got:
                lines.append(f"{name}: failed (rc {run.returncode}): {run.stderr.strip().splitlines()[-3:]}")
            else:
                r = json.loads(got[-1][7:])
                alone = (
                    f", the same tiles alone {r['alone_gb_s']:5.1f} GB/s "
                    f"(2 layers' alone {r['alone_2_layers_gb_s']:5.1f})"
                    if r["alone_gb_s"] is not None
                    else ""
                )
                lines.append(
                    f"{name:24s}: decode {r['decode_tok_s']:6.2f} tok/s, CPU share in the engine "
                    f"{r['engine_gb_s']:5.1f} GB/s{alone} ({r['threads']} threads, prefetch {r['prefetch']})"
                )
            print(lines[-1], flush=True)
    finally:
        FILE.unlink(missing_ok=True)
    if os.environ.get("OUT"):
        tag = os.environ.get("TAG")
        Path(os.environ["OUT"], f"engine-gap{'-' + tag if tag else ''}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    child(sys.argv[2:]) if sys.argv[1:2] == ["--child"] else main()
