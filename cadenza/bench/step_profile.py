"""`cadenza bench --profile-step`: the time of one decode step split into GPU kernels, transfers, CPU experts and
the rest (overhead), per decoder layer and in total, so that a regression shows where it is.

`profile_decode(llm, prompt_ids)` prefills the prompt, runs `warmup` greedy decode steps, times `steps` steps
without the profiler (`unprofiled_step_ms`), then runs `steps` more under `torch.profiler.profile` and reads the
raw Kineto events (`prof.profiler.kineto_results.events()`: start/end in ns on one clock for host and device
events, with correlation ids). Each step is wrapped in `record_function("cadenza.step")` and each decoder layer
in `record_function("cadenza.layer.<i>")` (a temporary forward pre-hook / hook pair, removed afterwards).

How each category is measured (all in ms; every table entry is the median over the profiled steps):

- wall: the host-side time range of the step's (layer's) record_function.
- gpu_kernels: |union| of the CUDA kernel intervals (device events of kind "kernel"; copies and memsets are not
  kernels) attributed to the step (layer). A kernel is attributed by its *launch* time: its runtime launch event
  (cudaLaunchKernel etc.) shares the kernel's CUPTI correlation id; failing that, the CPU op whose correlation id
  the kernel links to (`linked_correlation_id`). The step (layer) whose host range holds that time gets it, so a
  layer's GPU time counts even when its kernels run after its host code has returned.
- transfers: the same for memcpy / memset device intervals.
- cpu_experts: the CPU worker's intervals in `LayerOffload._cpu_job`, which runs on the Orchestra's worker
  thread, or, where the CPU's share is launched from the stream (cadenza.moe.offload.streamed), the jobs' own start and
  end times (perf_counter's clock, read from their stats; the driver's callback thread is never traced). The
  profiler records only the thread that started it, unless started with
  `_ExperimentalConfig(profile_all_threads=True)` (PyTorch >= 2.7): then `_cpu_job`, wrapped for the profiled
  steps with `record_function("cadenza.cpu_experts")`, shows up in the trace on the worker's thread. Without it
  (or with all_threads=False) the wrapper's own `perf_counter_ns` intervals are moved onto the profiler's clock:
  around each step's `record_function` enter the host reads perf_counter_ns before and after; the trace's step
  start lies between them, and the median over steps of (trace start - midpoint) is the offset (error: half the
  enter's duration, a few microseconds). An interval belongs to the layer whose host range holds its start.
- overhead: wall - |union(gpu_kernels, transfers, cpu_experts) within the wall range|: host time in which
  neither the GPU (any kernel or copy, whichever layer launched it) nor the CPU experts did anything: Python,
  launches, synchronisation latency, bookkeeping.
- overhead_simple: the issue's definition, wall - gpu_kernels - cpu_experts (the target: <= 1.5 ms per decode
  step for Mixtral-8x7B). It goes negative where the GPU and the CPU experts overlap, and counts copies as
  overhead; `overhead` is the one that stays within [0, wall].
- syncs, sync_wait_ms: deltas of the Orchestra's counters (GPU->host synchronisations and the host's wait in
  them) over the step / layer; None without offloading.
- kernels / launches: device kernels run, and host runtime calls that launch (…Launch…: kernels and CUDA graphs);
  None without CUDA.
- the "outside" row: the step's time outside every decoder layer (embedding, attention metadata, final norm,
  lm_head, argmax and the token's copy to the host); its overhead counts busy time in those gaps only.

On a CPU-only model (device="cpu", with or without gpu_memory's emulated GPU side) there are no device events:
gpu_kernels and transfers are 0, kernels/launches None, and the "GPU side" work done on the CPU by the main thread
simply counts as overhead. The numbers then say little about a real GPU; the tests use this mode.

The profiler costs time: every op and launch is recorded (record_shapes, with_stack, memory and flops stay off).
Compare `step.wall_ms` (profiled) with `unprofiled_step_ms`; `profiler_slowdown` is their ratio. The cost is a
few microseconds per recorded op and launch (CUPTI adds its own per kernel on a GPU), so it grows with the
launches a step makes, not with its length. Profiling every thread also records the CPU worker's ops.

The trace is read and attributed in cadenza.bench.step_attribution; the results (JSON, table) are
cadenza.bench.step_report's.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from cadenza.bench.step_attribution import CPU_EXPERTS_NAME, LAYER_PREFIX, STEP_NAME, Interval, _read_trace, _rows
from cadenza.bench.step_report import Row, StepProfile, median_row
from cadenza.errors import CadenzaError

# --- driving the steps --------------------------------------------------------------------------------------


def _all_threads_config():
    """An experimental config that records every thread's ops (PyTorch >= 2.7), or None."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        return None


def _counts(orchestra) -> tuple[int, float] | None:
    if orchestra is None:
        return None
    c = orchestra.counters
    return c.syncs, c.sync_wait_s


@torch.inference_mode()
def profile_decode(
    llm,
    prompt_ids: list[int],
    steps: int = 8,
    warmup: int = 2,
    all_threads: bool | None = None,
    eager: bool = False,
) -> StepProfile:
    """Profiles greedy decode steps of `llm` (a cadenza.LLM) after prefilling `prompt_ids` -> StepProfile.

    warmup steps run first without the profiler, then `steps` steps are timed without it and `steps` more under
    it. A step is what the engine runs for one token (`Engine.decode` where the engine has it, which may replay
    CUDA graphs, else the model's forward of one token with the cache), then the argmax read back to the host.
    eager: call the model's forward directly even where the engine would replay a CUDA graph: decoder layers
    inside a replayed graph never call their hooks, so only an eager step has per-layer rows
    (`StepProfile.layers_traced`). all_threads: trace the CPU worker thread through the profiler (None: when
    this torch can; False: measure it with perf_counter and move the intervals onto the profiler's clock)."""
    if not isinstance(steps, int) or steps < 1:
        raise CadenzaError(f"steps={steps!r}: profile at least one decode step.")
    if not isinstance(warmup, int) or warmup < 0:
        raise CadenzaError(f"warmup={warmup!r}: give a whole number of warm-up steps, 0 or more.")
    engine = llm.engine
    engine.check_prompt(prompt_ids)
    length = len(prompt_ids) + warmup + 2 * steps + 1
    if length > engine.max_context:
        raise CadenzaError(
            f"A prompt of {len(prompt_ids)} tokens and {warmup} + 2 x {steps} decode steps need {length} positions; "
            f"the context holds {engine.max_context}. Use a shorter prompt or fewer steps."
        )
    model, device, orch = engine.model, engine.device, engine.orchestra
    cuda = device.type == "cuda"
    cache = engine.cache_for(1, length)
    token = int(torch.argmax(engine.forward(list(prompt_ids), cache, last_only=True, rows=[0])[-1]))

    decode = None if eager else getattr(engine, "decode", None)

    def step(token: int) -> int:
        if decode is not None:
            logits = decode([token], cache, [0])
        else:
            ids = torch.tensor([[token]], dtype=torch.long, device=device)
            logits = model(ids, cache, last_only=True, rows=[0])[:, -1]
        return int(torch.argmax(logits[0]))

    for _ in range(warmup):
        token = step(token)
    plain = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        token = step(token)
        plain.append((time.perf_counter_ns() - t0) * 1e-6)

    # per-layer record_function ranges and counter deltas, through hooks removed afterwards
    decoder_layers = list(model.model.layers)
    open_ranges: dict[int, tuple] = {}
    counters: list[dict] = []

    def pre_hook(i, module, args):
        rf = record_function(f"{LAYER_PREFIX}{i}")
        rf.__enter__()
        open_ranges[i] = (rf, _counts(orch))

    def post_hook(i, module, args, output):
        rf, before = open_ranges.pop(i)
        rf.__exit__(None, None, None)
        after = _counts(orch)
        if before is not None and counters:
            counters[-1]["layers"][i] = {
                "syncs": float(after[0] - before[0]),
                "sync_wait_ms": (after[1] - before[1]) * 1e3,
            }

    # the CPU worker's jobs: a record_function (traced when the profiler records every thread) and perf_counter
    # intervals (the fallback), per instance so that only this model's layers change
    worker_ns: list[Interval] = []
    patched = []
    if orch is not None:
        for layer in orch.layers:
            original = layer._cpu_job

            @functools.wraps(original)
            def job(*args, _original=original, **kwargs):
                t0 = time.perf_counter_ns()
                try:
                    with record_function(CPU_EXPERTS_NAME):
                        return _original(*args, **kwargs)
                finally:
                    worker_ns.append((t0, time.perf_counter_ns()))

            layer._cpu_job = job
            patched.append(layer)

    config = _all_threads_config() if all_threads is not False else None
    if all_threads and config is None:
        raise CadenzaError("This PyTorch cannot profile every thread (profile_all_threads needs PyTorch >= 2.7).")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    anchors = []  # perf_counter_ns before and after each step's record_function enter
    handles = []
    try:
        for i, layer in enumerate(decoder_layers):
            handles.append(layer.register_forward_pre_hook(functools.partial(pre_hook, i)))
            handles.append(layer.register_forward_hook(functools.partial(post_hook, i)))
        if cuda:
            torch.cuda.synchronize(device)
        kw = {"experimental_config": config} if config is not None else {}
        t_profiled = time.perf_counter_ns()
        with profile(
            activities=activities,
            record_shapes=False,
            with_stack=False,
            profile_memory=False,
            with_flops=False,
            with_modules=False,
            **kw,
        ) as prof:
            for _ in range(steps):
                before = _counts(orch)
                counters.append({"layers": {}})
                t0 = time.perf_counter_ns()
                with record_function(STEP_NAME):
                    t1 = time.perf_counter_ns()
                    token = step(token)
                anchors.append((t0, t1))
                after = _counts(orch)
                if before is not None:
                    counters[-1]["syncs"] = float(after[0] - before[0])
                    counters[-1]["sync_wait_ms"] = (after[1] - before[1]) * 1e3
    finally:
        for h in handles:
            h.remove()
        for rf, _ in open_ranges.values():  # a layer that raised
            rf.__exit__(None, None, None)
        for layer in patched:
            del layer._cpu_job

    streamed = getattr(orch, "streamed", None)
    if streamed is not None:  # jobs the CUDA stream ran on the driver's thread: their own perf_counter times
        worker_ns += [iv for iv in streamed.intervals() if iv[0] >= t_profiled]
    trace = _read_trace(prof.profiler.kineto_results)
    if len(trace.steps) != steps:
        raise CadenzaError(f"The profiler recorded {len(trace.steps)} of {steps} steps; cannot split the step.")
    source = "none"
    if trace.cpu_experts:
        source = "profiler"
    elif worker_ns:
        offset = int(statistics.median(s - (a + b) // 2 for (s, _), (a, b) in zip(trace.steps, anchors, strict=True)))
        trace.cpu_experts = [(a + offset, b + offset) for a, b in worker_ns]
        source = "perf_counter"
    totals, per_layer, outside = _rows(trace, len(decoder_layers), counters, cuda)
    return StepProfile(
        step=median_row(totals),
        layers=[median_row([layers[i] for layers in per_layer]) for i in range(len(decoder_layers))],
        outside=median_row(outside),
        steps=totals,
        unprofiled_step_ms=float(statistics.median(plain)),
        device=str(device),
        cuda=cuda,
        cpu_experts_source=source,
        layers_traced=bool(trace.layers),
        prompt_tokens=len(prompt_ids),
        warmup=warmup,
        layer_steps=per_layer,
    )


__all__ = ["Row", "StepProfile", "profile_decode"]
