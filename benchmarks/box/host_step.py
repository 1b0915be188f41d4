"""Where a decode step of a big batch goes with the KV cache on the GPU (eager and graphs) and on the host: a
synthetic full-width Mixtral cut to LAYERS layers, int4 experts all resident (no link traffic: the step is the GPU's
work, the CPU attention and the orchestration between them), B sequences, then the top ops of one profiled step.
Usage: python3 benchmarks/box/host_step.py [LAYERS] [BATCH] [MICRO] (on the box: after `source setup.sh`).
GROUPED="off;16,128,8;8,128,4" runs the jobs once per setting of the grouped expert kernel (off, or its blocks
TILES,COLUMNS,WARPS) in this one process, so the checkpoint is built once."""

import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cadenza.bench.synthetic import SyntheticCheckpoint
from cadenza.bench.throughput_job import job_prompts
from cadenza.llm import LLM
from cadenza.sampling import SamplingParams

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 128
micro = int(sys.argv[3]) if len(sys.argv) > 3 else 2
device = "cuda" if torch.cuda.is_available() else "cpu"
ckpt = SyntheticCheckpoint("mixtral-8x7b", layers=layers)
budget = "40GiB" if device == "cuda" else "4GiB"
t0 = time.perf_counter()
llm = LLM(checkpoint=ckpt, device=device, gpu_memory=budget, experts="int4", max_context=256, max_batch=batch)
print(f"built {ckpt.name} in {time.perf_counter() - t0:.0f} s; {llm.placement.summary() if llm.placement else ''}")
all_prompts = job_prompts(4 * batch, 128, ckpt.config["vocab_size"], 0)
NEW = int(os.environ.get("NEW", "24"))
if os.environ.get("DECODE_MAX_TOKENS"):  # the decode kernels (no host sync, one launch a matrix) up to this many
    from cadenza.moe.offload import policy

    policy.DECODE_MAX_TOKENS = int(os.environ["DECODE_MAX_TOKENS"])


def job(label: str, kv: str, micro_batches: int = 1, graphs: bool = True, rows: int = batch, tables: bool = True):
    prompts = all_prompts[:rows]
    llm.replan(budget, max_batch=rows, kv_cache=kv, micro_batches=micro_batches)
    if not graphs:
        llm.engine.graphs.reason = "turned off for this probe"
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), mode="throughput")
    times = {}
    for new in (2, NEW):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True), mode="throughput")
        if device == "cuda":
            torch.cuda.synchronize()
        times[new] = time.perf_counter() - t
    step = (times[NEW] - times[2]) / (NEW - 2)
    print(
        f"\n== {label}: prefill+2 {times[2]:.2f} s; decode step {step * 1e3:.1f} ms "
        f"({step * 1e3 / layers:.2f} ms a layer, {rows / step:.0f} tok/s); graphs: {llm.engine.graphs.describe()}"
    )
    if not tables:
        return
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), mode="throughput")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
    if device == "cuda":
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    if not graphs:
        llm.engine.graphs.reason = None


def jobs(tag: str) -> None:
    tables = not os.environ.get("NO_TABLES")
    job(f"{tag}GPU cache, graphs", "gpu", tables=tables)
    if tables:
        job(f"{tag}GPU cache, eager", "gpu", graphs=False)
    job(f"{tag}host cache", "host", tables=tables)
    if micro > 1:
        job(f"{tag}host cache, {micro} micro-batches", "host", micro, tables=tables)
    job(f"{tag}GPU cache, graphs, {4 * batch} rows", "gpu", rows=4 * batch, tables=False)
    job(f"{tag}host cache, {4 * batch} rows", "host", rows=4 * batch, tables=False)
    if micro > 1:
        job(f"{tag}host cache, {micro} micro-batches, {4 * batch} rows", "host", micro, rows=4 * batch, tables=False)


if os.environ.get("GROUPED"):
    from cadenza.kernels import gpu_grouped

    for setting in os.environ["GROUPED"].split(";"):
        os.environ[gpu_grouped.ENV] = "0" if setting == "off" else "1"
        if setting != "off":
            os.environ[gpu_grouped.BLOCKS_ENV] = setting
        for layer in llm.orchestra.layers:  # as LayerOffload's init decides it
            layer.grouped = layer.layout.grouped(torch.device(device))
        jobs(f"grouped {setting}: ")
else:
    jobs("")
