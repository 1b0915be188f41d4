"""llama.cpp's `llama-batched-bench` as T1 / T2's peer (`cadenza bench --scenario T1 --experts int4 --peer
llama.cpp=PATH`, PATH: a built llama-batched-bench): the job's shape (P prompt tokens -> M new tokens a sequence)
at several numbers of parallel sequences, on the same synthetic model written as a GGUF with Q4_0 experts.

Flags (tools/batched-bench of the llama.cpp in ../shared/peers): `-npp P -ntg M -npl B` (B sequences, each its own
prompt of P tokens, then M tokens each, all B at a time), `-c` the KV cache's tokens (at least B (P + M)), `-b` /
`-ub` the batch and micro-batch, `-ngl 99 --n-cpu-moe N` as llama-bench's, `--output-format jsonl`: one JSON line per
(P, M, B) with t_pp, t_tg, t (seconds) and speeds. Its `speed` counts prompt tokens too; a row here reports generated
tokens over the whole time, B M / t, as cadenza's `throughput_tok_s` does. N is chosen per B, as for llama-bench
(`llama_cpp_peer.estimate_for`), with the KV cache of B (P + M) tokens in the estimate: more sequences leave fewer
layers' experts on the GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cadenza.bench.gguf_export import WrittenGguf
from cadenza.bench.llama_bench import run_llama_bench
from cadenza.bench.llama_cpp_peer import SYSTEM, estimate_for
from cadenza.errors import CadenzaError

PARALLEL = (16, 32, 64, 128, 256)  # sequences at a time tried (its best is the peer's number)


def parse_parallel(text: str | None) -> tuple[int, ...]:
    """--peer-parallel 16,64 -> (16, 64); None: every PARALLEL setting. A CadenzaError names a bad entry."""
    if text is None:
        return PARALLEL
    try:
        out = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise CadenzaError(f"--peer-parallel {text!r}: give whole numbers of at least 1, comma-separated (e.g. 16,64).")
    return out


BATCH, MICRO_BATCH = 2048, 512
TIMEOUT_S = 540


def batched_command(binary, model, n_ctx: int, prompt: int, new: int, parallel: int, n_cpu_moe: int, threads: int):
    return [
        str(binary), "-m", str(model), "-c", str(n_ctx), "-b", str(BATCH), "-ub", str(MICRO_BATCH),
        "-npp", str(prompt), "-ntg", str(new), "-npl", str(parallel), "-ngl", "99", "--n-cpu-moe", str(n_cpu_moe),
        "-t", str(threads), "--output-format", "jsonl",
    ]  # fmt: skip


def parse_batched_jsonl(stdout: str) -> list[dict]:
    """Its JSONL lines (other lines, such as a log on stdout, are skipped); a CadenzaError when there are none."""
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if {"pl", "tg", "t"} <= row.keys():
                out.append(row)
    if not out:
        raise CadenzaError(f"llama-batched-bench printed no JSONL result; its stdout began: {stdout[:300]!r}")
    return out


def measure(
    binary: Path,
    written: WrittenGguf,
    scenario: str,
    budget_gib: float,
    prompt: int,
    new: int,
    threads: int,
    add: Callable[[str, dict], None],
    log: Callable[[str], None],
    parallel: tuple[int, ...] = PARALLEL,
) -> None:
    """One row per number of parallel sequences, then a `best` row (the most generated tokens per second); a
    failure marks its row skipped with llama-batched-bench's stderr and goes on with the next."""
    best = None
    for b in parallel:
        n_ctx = b * (prompt + new)
        est = estimate_for(written.plan, budget_gib, n_ctx)
        row = {"scenario": scenario, "system": SYSTEM, "tool": "llama-batched-bench", "parallel": b, "prompts": b,
               "prompt_tokens": prompt, "new_tokens": new, "gpu_budget_gib": budget_gib,
               "expert_types": written.plan.expert_qtype, "n_cpu_moe": est.n_cpu_moe,
               "gpu_estimate": est.as_dict()}  # fmt: skip
        if not est.fits:
            add(scenario, {**row, "skipped": f"{b} sequences' KV cache does not fit {budget_gib} GiB with any N"})
            continue
        argv = batched_command(binary, written.path, n_ctx, prompt, new, b, est.n_cpu_moe, threads)
        log(f"{scenario} {SYSTEM} {b} sequences, --n-cpu-moe {est.n_cpu_moe}")
        try:
            run = run_llama_bench(argv, TIMEOUT_S)
            result = parse_batched_jsonl(run.stdout)[-1]
        except CadenzaError as e:
            add(scenario, {**row, "skipped": str(e)})
            continue
        rate = result["pl"] * result["tg"] / result["t"]
        speeds = {"decode_tok_s": result.get("speed_tg"), "prefill_tok_s": result.get("speed_pp")}
        row |= {"command": run.command, "throughput_tok_s": round(rate, 2), "seconds": result["t"], **speeds}
        row["raw"] = result
        add(scenario, row)
        if best is None or rate > best["throughput_tok_s"]:
            best = row
    if best is not None:  # (a summary: the rows above hold the measurements)
        add(scenario, {"scenario": scenario, "system": SYSTEM, "summary": "best", "parallel": best["parallel"],
                       "throughput_tok_s": best["throughput_tok_s"], "of_parallel": list(parallel)})  # fmt: skip
