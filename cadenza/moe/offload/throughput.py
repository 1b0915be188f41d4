"""The batch size of an offline job (`cadenza batch`, `generate(mode="throughput")`): a roofline of one decode step.

With many sequences decoding together, every layer's non-resident experts are wanted by some token at nearly every
step, so a step moves them over the link once (the fetch path, whatever the batch) and the tokens per second grow
with the batch until the link time is shared by enough tokens. The GPU's memory is split between the KV cache of the
batch (each sequence's whole context) and resident experts (fewer bytes over the link): `plan_throughput` weighs
every batch size, each with the residents its leftover memory holds, by

    step(b) = link bytes(b) / link bandwidth + per-step time + b x per-token time,
    link bytes(b) = sum over layers of non-resident experts x P(an expert is wanted by one of b tokens),

P = 1 - (1 - k / E)^b under even routing, and picks the batch with the most tokens per second. A job of N prompts
(`prompts`) of one length runs in ceil(N / b) rounds of full steps, the last one part-full: its rate is
N / (rounds x step(b)), so of the batches needing the same rounds the smallest wins (its KV cache leaves the most
memory to residents), e.g. 512 rather than 644 for 1024 prompts. The per-step time
is what a step costs whatever its batch (reading the resident weights, launches); the per-token time what each row
adds (its KV reads, expert products, sampling); both given by the caller (measured or assumed: the plan says
which).

With the KV cache in host memory (`kv_on_host`, `--kv-cache host`: attention on the CPU, as MoE-Lightning runs it)
the batch costs the GPU nothing, every batch gets the same residents, and each step adds the CPU's read of every
sequence's KV cache, b x context x KV bytes a token / DRAM bandwidth, after the GPU's part (link, GPU time), or
beside it with micro-batches (`micro_batches`: the larger part plus the smaller's share of one micro-batch, the
pipeline's fill); the batch is bounded by host memory instead. `host_kv_batch` says, for the
GPU-cache plan, how large a batch that schedule could run in the same step time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from cadenza.errors import CadenzaError
from cadenza.moe.offload import policy
from cadenza.moe.placement import ModelSizes, format_size

MAX_BATCH = 4096  # batches weighed at most (a decode step of more rows is a prefill-sized chunk)
ASSUMED_H2D_GB_S = 25.0  # PCIe 4.0 x16's pinned copy rate, where no cost model was measured here
ASSUMED_TOKEN_S = 1e-4  # a decode token's GPU and host work beside the transfers, where none was measured
ASSUMED_STEP_S = 1e-2  # a decode step's cost whatever its batch (resident weights read, launches)
ASSUMED_DRAM_GB_S = 80.0


@dataclass(frozen=True)
class StepRates:
    """What `plan_throughput` is given about the machine: the link, a decode step's fixed and per-token GPU time,
    the host's read bandwidth, and where they came from."""

    h2d_gb_s: float = ASSUMED_H2D_GB_S
    per_token_s: float = ASSUMED_TOKEN_S
    per_step_s: float = ASSUMED_STEP_S
    dram_gb_s: float = ASSUMED_DRAM_GB_S
    source: str = "assumed: no cost model measured on this machine"


HOST_MARGIN = 8 * 2**30  # host memory a host KV cache leaves to everything else (activations, the OS, buffers)


def host_kv_room(sizes: ModelSizes, loaded: bool = False) -> int:
    """Host memory a host KV cache may plan on: what is available now, less every routed expert unless the model
    is `loaded` (each then lives once in host memory already), less a margin; 0 where the available memory cannot be
    read (no bound)."""
    from cadenza.moe.offload.host_memory import available_host_bytes

    available = available_host_bytes()
    if not available:
        return 0
    experts = 0 if loaded else sum(sizes.layer_bytes()) * sizes.num_experts
    return max(1, available - experts - HOST_MARGIN)


def step_rates(cost_models, top_k: int, moe_layers: int) -> StepRates:
    """The rates of the first usable cost model among `cost_models` ((key, CostModel) pairs): per token the
    largest-batch slope of its GPU expert time, per step its one-token time, each times top-k and the MoE layers;
    else the assumed rates, said so."""
    for key, cm in cost_models:
        if cm.h2d_gb_s > 1e-6 and len(cm.gpu_points) >= 2:
            (n0, t0), (n1, t1) = cm.gpu_points[-2:]
            per_token = max(0.0, (t1 - t0) / (n1 - n0)) * top_k * moe_layers
            per_step = cm.gpu_time(1) * top_k * moe_layers
            return StepRates(cm.h2d_gb_s, per_token, per_step, ASSUMED_DRAM_GB_S, f"measured: {key}")
    return StepRates()


@dataclass(frozen=True)
class ThroughputPlan:
    max_batch: int
    resident_experts: int
    total_experts: int
    kv_bytes: int  # the batch's KV cache on the GPU
    link_bytes_per_step: int
    step_s: float
    tok_s: float  # modeled, generated tokens per second over the job's decode
    link_bound_share: float  # of the step, the link's
    h2d_gb_s: float
    per_token_s: float
    per_step_s: float
    source: str  # where the bandwidth and times came from
    host_kv_batch: int  # the batch a host-KV schedule could run at the same step time (the CPU reads the KV)
    kv_on_host: bool = False  # the plan is for --kv-cache host (kv_bytes then in host memory)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"batch {self.max_batch} (KV cache {format_size(self.kv_bytes)}"
            f"{' in host memory' if self.kv_on_host else ''}), resident {self.resident_experts}/"
            f"{self.total_experts} experts; a step moves {format_size(self.link_bytes_per_step)} over the link at "
            f"{self.h2d_gb_s:.1f} GB/s ({self.source}): ~{self.step_s * 1e3:.0f} ms, ~{self.tok_s:.0f} tok/s "
            f"(link {self.link_bound_share:.0%} of the step)"
        )


def plan_throughput(
    sizes: ModelSizes,
    budget_bytes: int,
    workspace_bytes: int,
    context_tokens: int,
    top_k: int,
    h2d_gb_s: float,
    per_token_s: float,
    fetch_slots: int,
    source: str = "given",
    dram_gb_s: float = 0.0,
    per_step_s: float = 0.0,
    kv_on_host: bool = False,
    host_bytes: int = 0,
    micro_batches: int = 1,
    prompts: int = 0,
) -> ThroughputPlan:
    """The batch with the most modeled tokens per second (module doc) for sequences of `context_tokens` (prompt +
    new tokens) in a GPU budget of `budget_bytes`, of which `workspace_bytes` go to activations and `fetch_slots`
    experts' bytes to fetch slots. dram_gb_s: the host's read bandwidth, for `host_kv_batch` (0: not given).
    kv_on_host: the KV cache in host memory, `host_bytes` of it at most (0: no bound), read by the CPU each step
    (dram_gb_s needed). prompts: the job's sequences (0: as many as any batch holds), which bound the batch and
    count its rounds."""
    if context_tokens < 1 or top_k < 1 or h2d_gb_s <= 0 or per_token_s < 0 or per_step_s < 0:
        raise ValueError("plan_throughput needs context_tokens, top_k >= 1, h2d_gb_s > 0, per-token/step times >= 0")
    if kv_on_host and dram_gb_s <= 0:
        raise ValueError("plan_throughput with the KV cache on the host needs dram_gb_s > 0")
    per_layer = sizes.layer_bytes()
    total = sizes.num_experts * sizes.num_moe_layers
    fixed = sizes.always_bytes + workspace_bytes + fetch_slots * sizes.expert_bytes
    per_seq = context_tokens * sizes.kv_bytes_per_token + sizes.kv_bytes_per_sequence
    gpu_seq = 0 if kv_on_host else per_seq  # what a sequence takes of the GPU budget
    attn_s = per_seq / (dram_gb_s * 1e9) if kv_on_host else 0.0  # the CPU reading one sequence's cache, a step
    if prompts < 0:
        raise ValueError("plan_throughput: prompts is a count (0: unbounded)")
    most = min(MAX_BATCH, prompts) if prompts else MAX_BATCH
    if kv_on_host and host_bytes > 0:
        most = min(most, host_bytes // per_seq) if per_seq else most
        if most < 1:
            raise CadenzaError(
                f"Host memory ({format_size(host_bytes)} available) cannot hold the KV cache of one sequence of "
                f"{context_tokens} tokens ({format_size(per_seq)}). Shorten the prompts / max_tokens, or free memory."
            )
    if budget_bytes - fixed < gpu_seq or budget_bytes < fixed:
        need = fixed + gpu_seq
        raise CadenzaError(
            f"--gpu-memory {format_size(budget_bytes)} is too small for one sequence of {context_tokens} tokens: the "
            f"parts that must be on the GPU need {format_size(need)} (weights {format_size(sizes.always_bytes)}, "
            f"workspace {format_size(workspace_bytes)}, fetch slots {format_size(fetch_slots * sizes.expert_bytes)}, "
            f"KV cache {format_size(gpu_seq)}). Raise the budget or shorten the prompts / max_tokens."
        )
    e, k = sizes.num_experts, min(top_k, sizes.num_experts)
    best = None
    for b in range(1, most + 1):
        # (more slots where steps of b want every expert: policy.AHEAD_BYTES, as the engine's placement gets them)
        more = max(0, policy.fetch_slots("fetch", top_k, 0, b, e, sizes.expert_bytes) - fetch_slots)
        room = budget_bytes - fixed - more * sizes.expert_bytes - b * gpu_seq
        if room < 0:
            break
        residents = _even_residents(room, per_layer, e)
        link = link_bytes(per_layer, residents, e, k, b)
        gpu_s = link / (h2d_gb_s * 1e9) + per_step_s + b * per_token_s
        step = gpu_s + b * attn_s
        if micro_batches > 1 and kv_on_host:  # one micro-batch's CPU attention beside another's GPU work
            cpu_s = b * attn_s
            step = max(gpu_s, cpu_s) + min(gpu_s, cpu_s) / micro_batches
        rate = b / step if step > 0 else float("inf")
        if prompts:  # the job's rate: ceil(N / b) rounds of full steps, N sequences' tokens
            rate = prompts / (-(-prompts // b) * step) if step > 0 else float("inf")
        if best is None or rate > best[0] * 1.001:  # (the smallest batch within 0.1% of the best)
            best = (rate, b, sum(residents), link, step)
    rate, b, resident, link, step = best
    link_s = link / (h2d_gb_s * 1e9)
    host_b = b
    if not kv_on_host and dram_gb_s > 0 and per_seq > 0:  # attention on the CPU: each step reads each KV once
        host_b = max(b, int(link_s * dram_gb_s * 1e9 // per_seq))
    return ThroughputPlan(
        max_batch=b,
        resident_experts=resident,
        total_experts=total,
        kv_bytes=b * per_seq,
        link_bytes_per_step=int(link),
        step_s=step,
        tok_s=rate,
        link_bound_share=link_s / step if step > 0 else 0.0,
        h2d_gb_s=h2d_gb_s,
        per_token_s=per_token_s,
        per_step_s=per_step_s,
        source=source,
        host_kv_batch=host_b,
        kv_on_host=kv_on_host,
    )


def link_bytes(per_layer: list[int], residents: list[int], experts: int, top_k: int, batch: int) -> float:
    """Bytes a decode step of `batch` tokens moves over the link (module doc): per layer, its non-resident experts
    (per_layer: an expert's bytes there) times the chance that one of the batch's tokens wants one."""
    if not experts:
        return 0.0
    wanted = 1.0 - (1.0 - min(top_k, experts) / experts) ** batch
    return sum((experts - r) * size for r, size in zip(residents, per_layer, strict=True)) * wanted


def _even_residents(room: int, per_layer: list[int], experts: int) -> list[int]:
    """Residents per layer when `room` bytes are spread evenly: whole rounds over the layers, then the first
    layers one more each while the room lasts."""
    out = [0] * len(per_layer)
    round_bytes = sum(per_layer)
    if round_bytes == 0:
        return out
    full = min(experts, room // round_bytes)
    out = [full] * len(per_layer)
    room -= full * round_bytes
    if full < experts:
        for i, size in enumerate(per_layer):
            if size > room:
                break
            out[i] += 1
            room -= size
    return out


def plan_job(
    sizes: ModelSizes,
    config,
    dtype,
    budget_bytes: int,
    prompt_tokens: int,
    max_tokens: int,
    rates: StepRates,
    kv_cache: str = "gpu",
    micro_batches: int = 1,
    host_bytes: int = 0,
    prompts: int = 0,
    chunk: int | None = None,
) -> ThroughputPlan:
    """`plan_throughput` for a job of `prompts` prompts (0: unknown, many) of `prompt_tokens` generating
    `max_tokens`: the workspace of such a sequence and passes of `chunk` tokens (None: the default), the fetch slots
    the fetch path keeps (a whole layer's with micro-batches), the given rates. The one planning call of `cadenza
    info --throughput`, `cadenza batch --max-batch auto` and the bench's T1 / T2."""
    from cadenza.llm import PREFILL_CHUNK
    from cadenza.moe.offload.planning import CUDA_MARGIN, workspace_bytes

    k = getattr(config, "num_experts_per_tok", 2)
    context = prompt_tokens + max_tokens
    return plan_throughput(
        sizes,
        budget_bytes,
        workspace_bytes(config, dtype, context, chunk or PREFILL_CHUNK, CUDA_MARGIN, sizes.num_experts),
        context,
        k,
        rates.h2d_gb_s,
        rates.per_token_s,
        policy.fetch_slots("fetch", k, sizes.num_experts if micro_batches > 1 else 0),
        rates.source,
        rates.dram_gb_s,
        rates.per_step_s,
        kv_on_host=kv_cache == "host",
        host_bytes=host_bytes,
        micro_batches=micro_batches,
        prompts=prompts,
    )


def plan_for(
    llm,
    prompt_tokens: int,
    max_tokens: int,
    kv_cache: str,
    budget_bytes: int,
    dram_gb_s: float = 0.0,
    micro: int = 1,
    prompts: int = 0,
) -> ThroughputPlan:
    """`plan_job` for a loaded LLM: its calibrated cost model (else assumed rates), the host memory left now (its
    experts already in it); dram_gb_s: a measured host read rate (0: assumed); prompts: the job's count (0: many)."""
    sizes = llm.sizes
    k = getattr(llm.config, "num_experts_per_tok", 2)
    cost = llm.orchestra.cost if llm.orchestra is not None else None
    rates = step_rates([] if cost is None else [(cost.key, cost)], k, sizes.num_moe_layers)
    if dram_gb_s:
        rates = replace(rates, dram_gb_s=dram_gb_s)
    room = host_kv_room(sizes, loaded=True)
    return plan_job(
        sizes, llm.config, llm.dtype, budget_bytes, prompt_tokens, max_tokens, rates, kv_cache, micro, room, prompts,
        llm.prefill_chunk,
    )  # fmt: skip
