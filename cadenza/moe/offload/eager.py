"""The host-deciding executor of one offloaded layer (prefill, and decode where nothing is streamed).

1. the router's top-k ids and weights, and the hidden states, are copied to the host: the layer's one GPU->host
   synchronisation;
2. `policy.split` divides the non-resident experts between the CPU and fetching;
3. the CPU worker starts on its experts at once; meanwhile the main thread queues the family's shared experts (the
   `shared` callable), the resident experts and the fetches (copy stream) and their products on the GPU;
4. the CPU's partial sum is copied back (asynchronously, from a pinned buffer) and added, then the shared part.

With the "GPU side" on the CPU (device cpu and a budget), the same code runs for tests: the emulated mode.
"""

from __future__ import annotations

import time

import torch

from cadenza.moe.experts import each_expert, expert_order, run_experts
from cadenza.moe.offload import policy
from cadenza.moe.trace import real_tokens


def offloaded(layer, x, topk_ids, topk_weights, shared, decode: bool) -> torch.Tensor:
    """The layer's experts with the host deciding: x [T, H], topk_ids / topk_weights [T, k] -> y [T, H]."""
    orch, k, index = layer.orch, topk_ids.shape[1], layer.index
    guess = orch.guess_next(index, x)  # the next layer's likely experts, for prefetch (or None)
    x_h, ids_h, w_h, guess_h = orch.to_host(x, topk_ids, topk_weights, guess, orch.counters)
    counts = torch.bincount(ids_h.reshape(-1), minlength=layer.experts.num_experts).tolist()
    real = real_tokens(ids_h)  # the live popularity counts a padded pass's real tokens only
    seen = counts if real is ids_h else torch.bincount(real.reshape(-1), minlength=len(counts)).tolist()
    orch.live.observe(index, seen, real.shape[0])
    active = [e for e, n in enumerate(counts) if n]
    resident = [e for e in active if e in layer.resident_rows]
    misses = [e for e in active if e not in layer.resident_rows]
    # experts already in a fetch slot (fetched lately, or prefetched) cost no copy: they go to the GPU
    cached = [e for e in misses if orch.cache is not None and (index, e) in orch.cache.where]
    fetch, on_cpu, shares = policy.split(
        orch.options,
        [e for e in misses if e not in cached],
        counts,
        orch.cost,
        orch.cache is not None,
        layer.layout.plain and layer.layout.kernel_math,  # rows split only for unbiased experts
    )
    fetch = cached + fetch
    orch.account_prefetch(index, misses)
    inter = layer.experts.intermediate_size
    # experts both sides work on: gate/up rows [0, r) and down cross PCIe, the CPU computes rows [r, I)
    split = policy.split_rows(shares, inter)

    job = None
    if on_cpu or split:
        out = layer.out_buffer(x_h.shape[0], x.dtype)
        job = orch.worker.submit(layer._cpu_job, x_h, k, w_h, ids_h, counts, on_cpu, out, bool(fetch or split), split)
    # the shared experts go to the GPU first, to run while the CPU computes its share
    y_shared = shared() if shared is not None else None
    # (token, slot) pairs grouped by expert on the GPU side; counts from the host slice it without a sync
    order = expert_order(topk_ids) if (resident or fetch) and not decode or split else None
    if decode and resident:  # one launch per matrix for all the layer's resident experts
        y = layer.decode_residents(x, topk_ids, topk_weights, counts)
    else:
        y = torch.zeros_like(x)
        if resident:
            layer.layout.run(x, k, topk_weights, order, counts, resident, layer.resident_weights, y)
    if fetch:
        _fetched(layer, x, k, topk_ids, topk_weights, order, counts, fetch, decode, y)
    halves = {}
    if split:  # the GPU's rows of the shared experts, while the CPU computes the others
        for e, pairs, tokens in each_expert(order, counts, split, k):
            r = split[e]
            slot = orch.cache.borrow()
            orch.cache.fill_rows(slot, layer.host_weights(e), r)
            h_gpu = None
            if r:
                gate, up, _ = orch.cache.weights(slot)
                xe = x[tokens]
                h_gpu = layer.experts.glu(xe @ gate[:r].T, xe @ up[:r].T)
            halves[e] = (slot, pairs, tokens, h_gpu)
    if guess_h is not None:  # this layer's needed copies are queued: start the next layer's likely ones
        orch.prefetch(index + 1, guess_h)
    else:  # (a big step: the next layer's experts, all wanted)
        orch.fetch_ahead(index, x.shape[0], k)
    if job is not None:
        t0 = time.perf_counter()
        y_cpu, h_cpu = job.result()
        orch.counters.cpu_wait_s += time.perf_counter() - t0
        if on_cpu:
            y += y_cpu.to(x.device, non_blocking=True) if x.device.type == "cuda" else y_cpu
        flat_w = topk_weights.reshape(-1)
        for e, (slot, pairs, tokens, h_gpu) in halves.items():
            rest = h_cpu[e].to(x.device, non_blocking=True)
            h = rest if h_gpu is None else torch.cat((h_gpu, rest), dim=1)
            ye = (h @ orch.cache.weights(slot)[2].T) * flat_w[pairs, None]
            y.index_add_(0, tokens, ye.to(y.dtype))
            orch.cache.give_back(slot)
    if y_shared is not None:
        y = y + y_shared

    c, eb = orch.counters, layer.expert_bytes
    c.gpu += sum(counts[e] for e in resident)
    c.fetched += sum(counts[e] for e in fetch)
    c.cpu += sum(counts[e] for e in on_cpu)
    c.split += sum(counts[e] for e in split)
    c.host_bytes += (len(fetch) + len(on_cpu) + len(split)) * eb
    c.gpu_bytes += (len(resident) + len(fetch)) * eb + sum((1 + 2 * r / inter) / 3 for r in split.values()) * eb
    return y


def _fetched(layer, x, k, topk_ids, topk_weights, order, counts, fetch: list[int], decode: bool, y) -> None:
    """y += the fetched experts' share, copied into fetch slots in waves of at most the cache's slots. A call of
    many tokens takes waves of half the slots: a slot's copy waits for the last product that read it, so with waves
    of all the slots each wave's copies wait for the previous wave's products (copy, compute, copy, ...), while
    with halves the next wave copies into the other half as this one computes. A few tokens' products are short
    next to a copy: there one wave of all the slots saves the launches."""
    orch = layer.orch
    cache = orch.cache
    hits0, misses0 = cache.hits, cache.misses
    size = cache.num_slots if x.shape[0] <= policy.DECODE_MAX_TOKENS else max(1, cache.num_slots // 2)
    for i in range(0, len(fetch), size):
        wave = fetch[i : i + size]
        slots = cache.get_many(layer.index, wave, layer.host_weights, layer.stacked)
        if decode:
            # the expert -> slot table built where x is, a fill a run of experts in consecutive slots: a table
            # copied from pageable host memory synchronises the stream first, and a wave's sync left the GPU idle
            # for the next wave's Python
            lut = torch.full((layer.experts.num_experts,), -1, dtype=torch.int32, device=x.device)
            for e, slot, n in _runs(slots):
                if n == 1:
                    lut.narrow(0, e, 1).fill_(slot)
                else:
                    torch.arange(slot, slot + n, dtype=torch.int32, device=x.device, out=lut.narrow(0, e, n))
            rows = lut[topk_ids]
            row_counts = None
            if layer.takes_counts(x.shape[0]):  # (host-known: the grouped product sizes its work by them)
                row_counts = [0] * cache.num_slots
                for e, slot in slots.items():
                    row_counts[slot] = counts[e]
            y += layer.decode_rows(x, rows, topk_weights, cache.shaped(layer.parts), row_counts)
        else:
            weights = lambda e, s=slots: cache.weights(s[e], layer.parts)  # noqa: E731
            layer.layout.run(x, k, topk_weights, order, counts, wave, weights, y)
        cache.release_many(slots.values())
    orch.counters.cache_hits += cache.hits - hits0
    orch.counters.cache_misses += cache.misses - misses0


def _runs(slots: dict[int, int]) -> list[tuple[int, int, int]]:
    """(first expert, its slot, n) for each run of `slots` (expert -> slot) in which both go up by one."""
    runs: list[list[int]] = []
    for e, s in sorted(slots.items()):
        if runs and e == runs[-1][0] + runs[-1][2] and s == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([e, s, 1])
    return [tuple(r) for r in runs]


@torch.inference_mode()  # grad mode is per thread: the worker needs its own
def cpu_job(layer, x_h, k, w_h, ids_h, counts, experts, out, shared: bool, split=None):
    """The CPU's share, on the worker: the whole of `experts` summed into `out`, and for each split expert e the
    activations of its gate/up rows [r, I) for its tokens (in the order the GPU side groups them)."""
    orch = layer.orch
    t0 = time.perf_counter()
    h_cpu = {}
    use_kernel = layer.kernel_layer is not None
    order = expert_order(ids_h) if split or (experts and not use_kernel) else None
    if split:
        for e, _, tokens in each_expert(order, counts, split, k):
            xe = x_h[tokens]
            gate, up, _ = layer.host_weights(e)
            r = split[e]
            h_cpu[e] = layer.experts.glu(xe @ gate[r:].T, xe @ up[r:].T)
    if experts and use_kernel:  # all of the layer's CPU experts in one parallel pass
        from cadenza.kernels.cpu_moe import moe_forward

        pf = policy.cpu_prefetch_for(x_h.shape[0], orch.cpu_prefetch)
        act, threads = layer.experts.hidden_act, orch.worker.threads
        biases = layer.experts.kernel_biases()
        y = moe_forward(
            layer.kernel_layer, x_h, ids_h, w_h, experts, act, threads, prefetch=pf, biases=biases,
            activations=orch.options.cpu_activations,
        )  # fmt: skip
        out.copy_(y)
    elif experts:
        out.zero_()
        run_experts(x_h, k, w_h, order, counts, experts, layer.host_weights, layer.experts.glu, out)
    busy = time.perf_counter() - t0
    orch.counters.cpu_busy_s += busy
    inter = layer.experts.intermediate_size
    if orch.cost is not None:  # the cost model learns the CPU's speed inside real steps
        work = len(experts) + sum(2 * (inter - r) / (3 * inter) for r in (split or {}).values())
        tokens = sum(counts[e] for e in experts) + sum(counts[e] for e in (split or {}))
        orch.cost.observe_cpu(work, tokens, busy, shared)
    return out, h_cpu
