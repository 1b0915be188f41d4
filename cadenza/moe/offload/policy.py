"""The whole offload decision for one MoE layer, as pure functions of what is known when it is taken.

Where a routed expert is computed: resident on the GPU, on the CPU, or fetched into a GPU slot. The executors
(`layer.LayerOffload`, `eager`, `streamed`) carry these decisions out; nothing here touches a tensor on a device, so
tests read every decision without CUDA.

- `route`: how a layer's call runs (all on the GPU; the CPU's share queued on the stream; the host deciding, between
  two CUDA graphs or eagerly).
- `split`: which non-resident experts are fetched and which the CPU computes (and, for `auto` with split experts on,
  which experts both sides share by rows).
- `fetch_slots`, `prefetch_on`, `wants_guess`, `prefetch_picks`: the fetch cache and speculative prefetch;
  `fetch_ahead`: a big step's next layer copied ahead (no guess needed: it wants nearly every expert).
- `stream_unavailable`, `choose_launch`: whether decode layers hand the CPU its share from the stream, and how.
"""

from __future__ import annotations

from enum import Enum

from cadenza.moe.offload.options import OffloadOptions

# Beyond this many tokens in a layer, experts go through per-expert matrix products; up to it, through the indexed
# decode kernels (one launch per matrix for every (token, slot) pair).
DECODE_MAX_TOKENS = 8

# Beyond a few tokens a layer needs most of its experts anyway: no guessing.
PREFETCH_MAX_TOKENS = 8

# A step whose tokens leave each expert of a layer unused with at most this chance (even routing) wants the whole
# layer: its next layer's non-resident experts are copied ahead, into the fetch slots its own waves free, so the link
# works through the layer boundary (the routing's read-back, the attention) instead of waiting for it.
AHEAD_UNUSED = 0.05
FETCHING = ("fetch", "auto")  # the policies that fetch such steps' experts (`auto` does at these sizes)

# Such steps keep this many bytes of fetch slots beyond the usual (waves take half the slots each, and the next layer
# is copied ahead into the slots the first half frees). With 160 MiB (Mixtral's int4 experts, 96 MB: 4 slots) T1's
# decode step on the H200 (2026-12-04) took 442 ms for 370 ms of copies at the link's full rate: each layer's ~7
# fetched experts waited ~1.3 ms mid-layer for the first wave's products to free a slot and ~0.7 ms at the boundary
# for the last wave's, 16% of the step. 320 MiB holds a whole Mixtral int4 layer (8 slots, 4 residents fewer: ~7 ms
# more link a step); bf16 experts (352 MB) keep 2, small experts (Qwen3-30B's 2.5 MB) a layer's 128 as before.
# Measured with 8 (2026-12-04, session 26): the step stayed at 1.19x its roofline, the boundary's copies waiting for
# the last wave because the slots were paired by number, not release (cache.py, since 73d7de6): 8 against 4 is
# still to be measured with that fixed.
AHEAD_BYTES = 320 << 20

# Streaming a decode layer's CPU share fixes the split (everything non-resident on the CPU), so `auto` streams only
# where the CPU is not much slower than the link for one expert at one token; past this ratio it keeps deciding per
# layer on the host, where it can fetch.
STREAM_MAX_CPU_OVER_LINK = 2.0


class Route(Enum):
    GPU = "gpu"  # every routed expert of the call is resident: the decode kernels, no synchronisation
    STREAMED = "streamed"  # the CPU's share queued on the GPU's stream (streamed.StreamedCpu)
    BETWEEN_GRAPHS = "between_graphs"  # a graph is being captured: the host's part runs between two graphs
    HOST = "host"  # the host reads the routing back and splits the misses (eager.offloaded)


def uses_decode_kernels(tokens: int, decode_kernels: bool, grouped: bool = False) -> bool:
    """grouped: the layout computes any number of tokens in a fixed number of launches (gpu_side `grouped`)."""
    return decode_kernels and (tokens <= DECODE_MAX_TOKENS or grouped)


def route(
    tokens: int, decode_kernels: bool, all_resident: bool, streamed: bool, capturing: bool, grouped: bool = False
) -> Route:
    """How a layer's call of `tokens` tokens runs. streamed: the orchestra streams decode layers; capturing: a CUDA
    graph is being captured; grouped: as in `uses_decode_kernels`."""
    if uses_decode_kernels(tokens, decode_kernels, grouped) and all_resident:
        return Route.GPU
    if streamed and tokens <= DECODE_MAX_TOKENS:
        return Route.STREAMED
    return Route.BETWEEN_GRAPHS if capturing else Route.HOST


def split(
    options: OffloadOptions, misses: list[int], counts: list[int], cost, have_cache: bool, plain: bool
) -> tuple[list[int], list[int], dict[int, float]]:
    """Non-resident experts with tokens -> (fetch, compute on the CPU, {expert: share of its gate/up rows fetched}
    for experts both sides work on). cost: the CostModel (None before calibration); have_cache: fetch slots exist;
    plain: experts stored unquantized (only those can be split by rows)."""
    if not misses or not have_cache or options.policy == "cpu":
        return [], list(misses), {}
    if options.policy == "fetch" or cost is None:
        return list(misses), [], {}
    fetch, on_cpu = cost.split(misses, counts)
    if not options.split_experts or not plain:
        return fetch, on_cpu, {}
    return cost.split_expert(fetch, on_cpu, counts)


def split_rows(shares: dict[int, float], intermediate: int) -> dict[int, int]:
    """{expert: r}: the GPU computes gate/up rows [0, r) (a multiple of 16), the CPU rows [r, I)."""
    return {e: min(intermediate, int(g * intermediate) // 16 * 16) for e, g in shares.items()}


def fetch_slots(
    policy: str, top_k: int, layer_experts: int = 0, batch: int = 0, experts: int = 0, expert_bytes: int = 0
) -> int:
    """GPU slots kept for fetched experts: none under `cpu` (nothing is fetched), else at least one token's experts;
    `layer_experts` (micro-batches): a whole layer's, so the second micro-batch finds the first one's fetches in
    their slots instead of moving the layer over the link again. Steps of `batch` tokens that want every one of a
    layer's `experts` (wants_all) under a fetching policy: 2 x AHEAD_BYTES of `expert_bytes` slots, at most a
    layer's (a boundary copies ahead only the next layer's)."""
    if policy == "cpu":
        return 0
    slots = max(2, top_k, layer_experts)
    if policy in FETCHING and expert_bytes > 0 and wants_all(batch, top_k, experts):
        slots = max(slots, min(experts, 2 * -(-AHEAD_BYTES // expert_bytes)))
    return slots


def wants_all(tokens: int, top_k: int, experts: int) -> bool:
    """Whether a step of `tokens` leaves each of a layer's `experts` unused with at most AHEAD_UNUSED chance (even
    routing): then the whole layer is wanted, and only how its copies overlap matters."""
    if experts < 1 or tokens < 1:
        return False
    return (1.0 - min(top_k, experts) / experts) ** tokens <= AHEAD_UNUSED


def placement_fill(policy: str, batch: int, top_k: int, experts: int) -> str:
    """Where residents go without a popularity matrix (placement.plan's `fill`): "spread" over the layers when
    full steps of `batch` want every expert and the policy fetches them (every layer then has copies, so the link
    never idles through a layer of residents; the T1 timeline showed 18 ms a step idle over Mixtral's 5 whole
    resident layers), else "layers" (a whole resident layer skips its host decision at small batches)."""
    return "spread" if policy in FETCHING and wants_all(batch, top_k, experts) else "layers"


def zero_copy_share(cpu_s: float, direct_s: float) -> float:
    """The share of a token's host experts the GPU should compute reading host memory (the rest on the CPU) so both
    finish together: n s direct_s = n (1 - s) cpu_s, from one expert's time on each side at one token."""
    if cpu_s <= 0 or direct_s <= 0:
        return 0.0
    return cpu_s / (cpu_s + direct_s)


def prefetch_on(options: OffloadOptions) -> bool:
    """Speculative prefetch: as asked, by default with the fetch policy only (auto and cpu compute most misses on
    the CPU, where a guessed copy is wasted link time)."""
    return options.prefetch if options.prefetch is not None else options.policy == "fetch"


def wants_guess(
    on: bool, have_cache: bool, next_layer_exists: bool, next_has_router: bool, tokens: int, next_all_resident: bool
) -> bool:
    """Whether a layer computes the next layer's likely experts (for prefetch) with its hidden states."""
    if not on or not have_cache or not next_layer_exists or not next_has_router:
        return False
    return tokens <= PREFETCH_MAX_TOKENS and not next_all_resident


def fetch_ahead(
    options: OffloadOptions, have_cache: bool, next_layer_exists: bool, next_all_resident: bool, tokens: int,
    top_k: int, experts: int,
) -> bool:  # fmt: skip
    """Whether a layer, once its own copies are queued, starts copying the next layer's non-resident experts
    (AHEAD_UNUSED): the policies that fetch (`fetch`, and `auto`, which fetches at such sizes), unless prefetch is
    turned off."""
    if options.prefetch is False or options.policy not in FETCHING or not have_cache:
        return False
    if not next_layer_exists or next_all_resident:
        return False
    return wants_all(tokens, top_k, experts)


def prefetch_picks(counts: list[int], resident: set[int] | dict, num_slots: int) -> list[int]:
    """The guessed non-resident experts to copy, most often guessed first, at most half the slots (so a wrong guess
    cannot flush the cache)."""
    wanted = sorted((e for e, n in enumerate(counts) if n and e not in resident), key=lambda e: -counts[e])
    return wanted[: max(1, num_slots // 2)]


def stream_unavailable(
    options: OffloadOptions, cpu_kernel: bool, cuda: bool, driver: bool, cost, cpu_one_s: float | None
) -> str | None:
    """Why decode layers keep the per-layer synchronisation instead of streaming the CPU's share, or None.
    cpu_kernel: the fused CPU kernel computes these experts; driver: the CUDA driver's cuLaunchHostFunc was found;
    cost: the CostModel (None before calibration); cpu_one_s: one expert at one token on the CPU, measured."""
    if options.stream_cpu == "off":
        return "turned off by CADENZA_STREAM_CPU=0"
    if not cpu_kernel:
        return "the fused CPU kernel is not in use for these experts"
    if cuda and not driver:
        return "the CUDA driver's cuLaunchHostFunc was not found"
    if options.policy == "fetch":
        return "the fetch policy copies each missing expert to the GPU, decided per layer on the host"
    if options.policy == "auto":
        if prefetch_on(options):
            return "speculative prefetch is on: auto fetches, deciding per layer on the host"
        if cost is None:
            return "the auto policy has no cost model yet"
        cpu = cpu_one_s if cpu_one_s is not None else cost.cpu_time(1)
        ratio = cpu / max(cost.fetch_time(1), 1e-12)
        if ratio > STREAM_MAX_CPU_OVER_LINK:
            return (
                f"the CPU takes {ratio:.1f}x the link's time per expert: auto splits each layer's misses between "
                "them, deciding per layer on the host"
            )
    return None


def choose_launch(cuda: bool, forced_host: bool, worker_problem: str | None) -> tuple[str, str]:
    """How a streamed layer's CPU job is started, and why: "worker" (a spinning CPU thread), "host_function"
    (cuLaunchHostFunc) or "inline" (no CUDA stream: on the calling thread). forced_host: CADENZA_STREAM_CPU=host;
    worker_problem: why the handoff worker cannot run on the device, or None."""
    if not cuda:
        return "inline", "no CUDA stream (the emulated GPU side): the job runs on the calling thread"
    if forced_host:
        return "host_function", "cuLaunchHostFunc, forced by CADENZA_STREAM_CPU=host"
    if worker_problem is not None:
        return "host_function", f"cuLaunchHostFunc: the handoff worker cannot be used ({worker_problem})"
    return "worker", "a spinning CPU thread, asked with cuStreamWriteValue32 and awaited with cuStreamWaitValue32"


def cpu_prefetch_for(tokens: int, distance: int) -> int:
    """The CPU kernel's software prefetch distance for a call of `tokens` tokens: tuned for a few, off beyond."""
    return distance if tokens <= DECODE_MAX_TOKENS else 0


def host_seconds_per_expert(policy: str, cost) -> float:
    """What one non-resident expert at one token costs under the policy (for exchanging residents)."""
    if policy == "fetch":
        return cost.fetch_time(1)
    if policy == "auto":
        return min(cost.cpu_time(1), cost.fetch_time(1))
    return cost.cpu_time(1)
