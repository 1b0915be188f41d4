"""#23 on the single-GPU box: what a layer split costs a decode step, and what its CUDA graphs (one per GPU segment,
session 27) buy, where no machine with two GPUs is lent. The split runs its two blocks both on cuda:0
(`parse_devices` patched, as tests/moe/test_gpu_split.py does): each block's own orchestra, slots and streams, the
hidden state handed across with the graphs cut there, but no second link or second GPU's bandwidth. Batch-1 decode
tok/s of MODEL (synthetic, int4 experts, its first LAYERS layers) for each budget (every expert on the host: the same
CPU work either way; every expert resident: launch-bound, where graphs matter most) and each of: no split, the split,
and both again without graphs. Writes $OUT/split-one-gpu.json.

  source benchmarks/box/setup.sh; python3 benchmarks/box/split_one_gpu.py [LAYERS]   (default 8; ~3-4 minutes)
  SPLIT_DEVICE=cpu MODEL=mixtral-tiny python3 benchmarks/box/split_one_gpu.py 4   (a smoke test without a GPU)
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

import cadenza.layer_split as layer_split
from cadenza import LLM, SamplingParams
from cadenza.bench.synthetic import SyntheticCheckpoint

MODEL = os.environ.get("MODEL", "mixtral-8x7b")
DEVICE = os.environ.get("SPLIT_DEVICE", "cuda")
RESIDENT = "40GiB"  # (per block where split: each holds its own layers)
PROMPT, NEW = list(range(3, 67)), 64


def decode_tok_s(llm: LLM) -> tuple[float, dict]:
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(PROMPT, greedy)  # warm: calibration, kernels, the graphs captured
    stats = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)).stats
    graphs = llm.engine.graphs
    segments = [len(step.segments) for step in graphs.graphs.values()]
    return stats.decode_tok_s, {"graphs": graphs.describe(), "segments_a_step": sorted(set(segments))}


def host_budgets(ckpt, device) -> list[int]:
    """Each block's budget for the split with every expert on the host: what its layers need beyond experts (a
    split refuses a budget of 0)."""
    probe = LLM(checkpoint=ckpt, device=str(device), dtype="bfloat16", experts="int4", max_context=256,
                devices=[0, 1], gpu_memory=[RESIDENT, RESIDENT], offload_policy="cpu")  # fmt: skip
    shares = probe.orchestra.shares
    probe.close()
    return [s.placement.always_bytes + s.placement.kv_bytes + s.placement.workspace_bytes for s in shares]


def main() -> int:
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    out = Path(os.environ.get("OUT", "."))
    device = torch.device(f"{DEVICE}:0" if DEVICE == "cuda" else DEVICE)
    layer_split.parse_devices = lambda devices: [device, device]  # both blocks on the one device
    t0 = time.perf_counter()
    ckpt = SyntheticCheckpoint(MODEL, layers=layers)
    rows = []
    budgets = {"host": ("0GiB", host_budgets(ckpt, device)), "resident": (RESIDENT, [RESIDENT] * 2)}
    for name, (one, two) in budgets.items():
        for split in (False, True):
            for graphs in (True, False):
                kw = {"devices": [0, 1], "gpu_memory": two} if split else {"gpu_memory": one}
                llm = LLM(checkpoint=ckpt, device=str(device), dtype="bfloat16", experts="int4", max_context=256,
                          offload_policy="cpu", cuda_graphs=graphs, **kw)  # fmt: skip
                try:
                    tok_s, facts = decode_tok_s(llm)
                    p = llm.placement
                    row = {"budget": name, "split": split, "cuda_graphs": graphs, "decode_tok_s": round(tok_s, 2),
                           "resident": f"{p.resident_count}/{p.total_experts}", **facts}  # fmt: skip
                finally:
                    llm.close()
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"model": f"{MODEL}[:{layers}]", "experts": "int4", "device": str(device), "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "split-one-gpu.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['budget']:>9} split={r['split']!s:5} graphs={r['cuda_graphs']!s:5} {r['decode_tok_s']:8.2f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
