"""Where bf16 activations with quantized experts part from fp32, on each side: the CPU side, and the GPU side with
the grouped products off and on, on the 1- and 3-layer test models (tests/moe/test_quantized_hybrid.py's). A single
token's logits too (the decode kernels, no grouped products). Writes $OUT/bf16-sides.txt."""

import os
import tempfile
from pathlib import Path

from cadenza import LLM
from tests.conftest import make_mixtral

PROMPT = list(range(3, 23))


def rel(a, ref) -> float:
    return ((a.float().cpu() - ref).norm() / ref.norm()).item()


def main() -> None:
    lines = []
    for layers in (1, 3):
        path = make_mixtral(Path(tempfile.mkdtemp()), num_local_experts=8, num_hidden_layers=layers)[0]
        for fmt in ("int8", "int4"):
            exact = LLM(path, device="cpu", dtype="float32", experts=fmt, expert_cache=False)
            ref = exact.score(PROMPT).float()
            exact.close()
            cpu = LLM(path, device="cpu", dtype="bfloat16", experts=fmt, expert_cache=False)
            row = [f"layers={layers} {fmt}: cpu-bf16 {rel(cpu.score(PROMPT), ref):.4f}"]
            cpu.close()
            for flag in ("0", "1"):
                os.environ["CADENZA_GROUPED_EXPERTS"] = flag
                for dt in ("bfloat16", "float32"):
                    gpu = LLM(path, device="cuda", dtype=dt, experts=fmt, expert_cache=False, gpu_memory="8GiB")
                    whole, one = gpu.score(PROMPT), gpu.score(PROMPT[:1])
                    gpu.close()
                    row.append(f"grouped={flag} {dt} {rel(whole, ref):.4f} first-token {rel(one[0], ref[0]):.4f}")
            lines.append(" | ".join(row))
            print(lines[-1], flush=True)
    (Path(os.environ.get("OUT", "/tmp")) / "bf16-sides.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
