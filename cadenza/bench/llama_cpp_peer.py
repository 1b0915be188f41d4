"""llama.cpp as a peer of `cadenza bench --peer llama.cpp=PATH` (PATH: a built `llama-bench`).

For a scenario with quantized experts (D3/F3 int8 -> Q8_0, D4/F4 int4 -> Q4_0), after cadenza's configurations and
with cadenza's model freed: the same synthetic model is written as one GGUF file (cadenza.bench.gguf_export), each
of cadenza's configurations is measured with llama-bench, and the file is deleted; one GGUF on disk at a time.

Matching the GPU budget: llama.cpp puts every layer on the GPU (-ngl 99) and keeps the experts of the first N
layers in host memory (--n-cpu-moe N). N is the smallest whose estimated GPU memory fits the budget (budget 0: every
expert on the host, N = layers):
  estimate = the non-expert weights on the GPU (all but token_embd, which llama.cpp keeps on the host)
           + the experts of the last L - N layers
           + the KV cache (f16 K and V of the test's context, padded to 256 tokens as llama.cpp pads it)
           + a compute allowance: logits and activations of one micro-batch (min(512, context) tokens). No room
             for a host layer's experts: llama.cpp copies them to the GPU for big batches (its op offload), but
             not into a buffer sized for a whole layer (an allowance of one layer's experts had put N one layer
             too high, under the budget it was meant to fill: benchmarks/README.md).
Each row records the estimate and the buffer sizes llama.cpp itself reports (a separate `-v` run of the same
context size per budget: the log that -v turns on costs time per token, so the timed runs go without it).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cadenza.bench.gguf_export import EXPERT_QTYPE, GgufPlan, WrittenGguf, gguf_plan, import_gguf, write_gguf
from cadenza.bench.llama_bench import (
    BenchTest,
    bench_command,
    device_mib,
    find_test,
    parse_bench_json,
    parse_buffer_sizes,
    run_llama_bench,
)
from cadenza.bench.report import BenchResult, GiB, roofline_fraction
from cadenza.errors import CadenzaError

SYSTEM = "llama.cpp"
PEERS = ("llama.cpp",)  # names --peer accepts
BENCH_TIMEOUT_S = 600  # one llama-bench run: a model load and 1 + trials tests
DISK_MARGIN = GiB  # free space kept beyond the GGUF file
KV_PAD = 256  # llama.cpp pads the context (and so the KV cache) to a multiple of 256 tokens
MICRO_BATCH = 512  # llama-bench's default -ub
ESTIMATE_METHOD = (
    "smallest N with estimate <= budget (budget 0: N = layers); estimate = non-expert weights but token_embd + "
    "experts of layers N..L-1 + f16 KV cache of the context padded to 256 + compute allowance (4-byte logits and "
    "activations of min(512, context) tokens)"
)


@dataclass(frozen=True)
class Peer:
    name: str
    path: Path


def parse_peers(values: list[str] | None) -> list[Peer]:
    """`--peer NAME=PATH` values -> peers; a CadenzaError names the bad one and the fix."""
    out: list[Peer] = []
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise CadenzaError(f"--peer {value!r}: give NAME=PATH, e.g. --peer llama.cpp=/path/to/llama-bench.")
        if name not in PEERS:
            raise CadenzaError(f"--peer {name}: unknown peer. Known: {', '.join(PEERS)} (PATH: its llama-bench).")
        if any(p.name == name for p in out):
            raise CadenzaError(f"--peer {name} is given twice.")
        p = Path(path).expanduser()
        if not p.exists():
            raise CadenzaError(
                f"--peer {name}: {p} does not exist. Build llama-bench (../shared/peers/"
                "build-llama-bench.sh) and give its path."
            )
        if not p.is_file() or not os.access(p, os.X_OK):
            raise CadenzaError(f"--peer {name}: {p} is not an executable file (chmod +x it, or give llama-bench).")
        out.append(Peer(name, p.resolve()))
    return out


def peer_request(
    values: list[str], peer_dir: str | None, scenario: str, expert_format: str | None, ckpt, configs: list
) -> tuple[Peer, Path]:
    """(peer, GGUF folder) for `--peer` values, after every check that needs no measurement: the peer's name and
    binary, the scenario, the gguf package, the model family and the free disk."""
    [peer, *more] = parse_peers(values)
    if more:
        raise CadenzaError(f"--peer: one peer per run ({', '.join(p.name for p in (peer, *more))} were given).")
    if expert_format is None:
        raise CadenzaError(
            f"--peer {peer.name}: it is measured in the scenarios with quantized experts (D3, D4, F3, F4, G1, G2, O1, "
            f"Z1), not {scenario}."
        )
    if not configs:
        raise CadenzaError(f"--peer {peer.name}: --policies leaves no cadenza configuration to compare with.")
    import_gguf()
    folder = Path(peer_dir or tempfile.gettempdir()).expanduser()
    check_disk(folder, gguf_plan(ckpt, expert_format).file_bytes_bound())
    return peer, folder


# --- how many layers' experts stay on the host -----------------------------------------------------------------------


@dataclass(frozen=True)
class GpuEstimate:
    n_cpu_moe: int
    budget_bytes: int | None  # None: no limit
    weights_bytes: int  # non-expert weights on the GPU
    expert_bytes: int  # experts of the layers on the GPU
    kv_bytes: int
    compute_bytes: int
    fits: bool

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.expert_bytes + self.kv_bytes + self.compute_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_gib": round(self.total_bytes / GiB, 3), "method": ESTIMATE_METHOD}


def choose_n_cpu_moe(
    budget_bytes: int | None,
    expert_layer_bytes: list[int],
    weights_bytes: int,
    kv_bytes: int,
    compute_bytes: int,
) -> GpuEstimate:
    """The smallest N (experts of layers 0..N-1 on the host) whose GPU estimate fits `budget_bytes`; 0 means every
    expert on the host (N = layers), None no limit (N = 0). When nothing fits, N = layers and `fits` is False."""
    layers = len(expert_layer_bytes)

    def estimate(n: int) -> GpuEstimate:
        experts = sum(expert_layer_bytes[n:])
        total = weights_bytes + experts + kv_bytes + compute_bytes
        fits = budget_bytes is None or total <= budget_bytes
        return GpuEstimate(n, budget_bytes, weights_bytes, experts, kv_bytes, compute_bytes, fits)

    if budget_bytes is None:
        return estimate(0)
    if budget_bytes == 0:
        return estimate(layers)
    return next((e for e in map(estimate, range(layers + 1)) if e.fits), estimate(layers))


def kv_cache_bytes(config: dict, n_ctx: int) -> int:
    """llama.cpp's f16 KV cache for a context of `n_ctx` tokens, all layers."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    padded = -(-n_ctx // KV_PAD) * KV_PAD
    return int(config["num_hidden_layers"]) * padded * 2 * int(config["num_key_value_heads"]) * head_dim * 2


def compute_bytes(config: dict, n_ctx: int) -> int:
    """Compute-buffer allowance without the op-offload copy: float32 logits of a micro-batch, a few hidden-sized
    activations and the routed experts' intermediates (gate, up, their product)."""
    tokens = min(MICRO_BATCH, n_ctx)
    n_ff = int(config.get("moe_intermediate_size") or config["intermediate_size"])
    k = int(config["num_experts_per_tok"])
    per_token = int(config["vocab_size"]) + 8 * int(config["hidden_size"]) + 3 * k * n_ff
    return 4 * tokens * per_token


def estimate_for(plan: GgufPlan, budget: float | str | None, n_ctx: int) -> GpuEstimate:
    budget_bytes = None if budget in (None, "all") else int(float(budget) * GiB)
    weights = plan.bytes_where(lambda t: not t.is_expert and t.name != "token_embd.weight")
    return choose_n_cpu_moe(
        budget_bytes,
        plan.expert_bytes_per_layer(),
        weights,
        kv_cache_bytes(plan.config, n_ctx),
        compute_bytes(plan.config, n_ctx),
    )


# --- the runs ------------------------------------------------------------------------------------------------------


def peer_test(prompt_tokens: int, new_tokens: int) -> BenchTest:
    """cadenza's (prompt -> new tokens) as a llama-bench test: a prefill (new = 1) is a pp test of the prompt; a
    decode is a tg test of the new tokens after a context of the prompt's length (-d)."""
    return BenchTest(prompt_tokens, 0, 0) if new_tokens <= 1 else BenchTest(0, new_tokens, prompt_tokens)


def gguf_name(plan: GgufPlan) -> str:
    return f"cadenza-{plan.model}-{plan.expert_qtype}.gguf"


def write_peer_gguf(folder: Path, ckpt, expert_format: str, what: str, log: Callable[[str], None]) -> WrittenGguf:
    """Writes `ckpt` as a GGUF with `expert_format` experts into `folder` after checking its free disk; frees
    `ckpt`'s pools. The caller deletes the file (gguf_name)."""
    plan = gguf_plan(ckpt, expert_format)
    check_disk(folder, plan.file_bytes_bound())
    path = folder / gguf_name(plan)
    log(f"{what}: writing {path} ({plan.tensor_bytes / GiB:.1f} GiB) ...")
    try:
        written = write_gguf(ckpt, path, expert_format, log=log)
    except OSError as e:
        raise CadenzaError(f"Writing the GGUF {path} failed: {e}") from e
    rate = written.nbytes / max(written.seconds, 1e-9) / 1e9
    log(f"  wrote {written.nbytes / GiB:.2f} GiB in {written.seconds:.1f} s ({rate:.2f} GB/s)")
    return written


def check_disk(folder: Path, need_bytes: int) -> None:
    """Refuses to start a GGUF that would not fit, saying how much it needs."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need_bytes + DISK_MARGIN:
        raise CadenzaError(
            f"The llama.cpp peer's GGUF needs {need_bytes / GiB:.1f} GiB in {folder} (+{DISK_MARGIN / GiB:.0f} GiB "
            f"spare) and {free / GiB:.1f} GiB are free. Free some, or give --peer-dir on a larger disk."
        )


@dataclass
class LlamaCppPeer:
    """Measures one scenario's configurations with llama-bench on a GGUF of `ckpt` (see the module's doc)."""

    peer: Peer
    folder: Path
    threads: int
    trials: int
    machine: dict
    log: Callable[[str], None]
    timeout_s: float = BENCH_TIMEOUT_S

    def run(self, scenario: str, ckpt, expert_format: str, configs: list, add: Callable[[str, dict], None]) -> None:
        """Writes the GGUF, measures every (budget, prompt, new tokens) of `configs` and hands `add` one row each;
        deletes the GGUF whatever happens. A llama-bench failure leaves rows marked skipped, then raises."""
        try:
            written = write_peer_gguf(self.folder, ckpt, expert_format, f"{scenario} {SYSTEM}", self.log)
            self.measure_file(scenario, written, configs, add)
        finally:
            path = self.folder / gguf_name(gguf_plan(ckpt, expert_format))
            path.unlink(missing_ok=True)
            self.log(f"  deleted {path}")

    def measure_file(
        self, scenario: str, written: WrittenGguf, configs: list, add: Callable[[str, dict], None]
    ) -> None:
        """Measures every (budget, prompt, new tokens) of `configs` on the GGUF `written` (left in place: the
        caller deletes it) and hands `add` one row each. A llama-bench failure leaves rows marked skipped, then
        raises."""
        path, plan = written.path, written.plan
        runs = list(dict.fromkeys((c.budget, c.prompt_tokens, c.new_tokens) for c in configs))
        failure: CadenzaError | None = None
        setups: dict[float | str, tuple[GpuEstimate, dict]] = {}
        for budget, prompt, new in runs:
            row = self._row(scenario, plan, budget, prompt, new, written.nbytes, written.seconds)
            if failure is not None:
                add(scenario, row.skip(f"llama-bench failed earlier: {failure}").as_dict())
                continue
            try:
                if budget not in setups:  # one --n-cpu-moe per budget, for its largest context
                    n_ctx = max(peer_test(p, n).n_ctx for b, p, n in runs if b == budget)
                    setups[budget] = self._setup(path, plan, budget, n_ctx)
                add(scenario, self._measure(path, plan, row, *setups[budget]))
            except CadenzaError as e:
                failure = e
                self.log(f"  {e}")
                add(scenario, row.skip(str(e)).as_dict())
        if failure is not None:
            raise CadenzaError(f"{SYSTEM} peer of {scenario}: {failure}")

    def _row(self, scenario, plan: GgufPlan, budget, prompt: int, new: int, nbytes: int, write_s: float) -> BenchResult:
        fmt = next(f for f, q in EXPERT_QTYPE.items() if q == plan.expert_qtype)
        r = BenchResult(
            scenario=scenario,
            system=SYSTEM,
            model=plan.model,
            dtype="f16",
            cpu_experts=fmt,
            policy=None,
            gpu_budget_gib=budget,
            prompt_tokens=prompt,
            new_tokens=new,
            trials=self.trials,
            model_bytes=nbytes,
        )
        types = "/".join(dict.fromkeys(t.qtype for t in plan.tensors if t.is_expert))
        weights = (
            "random blocks of the synthetic weights' scale for the experts, the seeded weights for the rest; the "
            "file cadenza loaded"
            if any(t.is_random for t in plan.tensors)
            else "the same seeded weights as cadenza's model"
        )
        r.notes.append(
            f"GGUF written in {write_s:.1f} s: experts {plan.expert_qtype} ({types}), norms and routers F32, "
            f"the other matrices F16; {weights}"
        )
        return r

    def _setup(self, path: Path, plan: GgufPlan, budget, n_ctx: int) -> tuple[GpuEstimate, dict]:
        """--n-cpu-moe for this budget (its tests' largest context), and llama.cpp's own buffer sizes with it, from
        a -v run of one token after n_ctx - 1 (the same weights, KV cache and compute buffer as the timed tests)."""
        est = estimate_for(plan, budget, n_ctx)
        argv = bench_command(self.peer.path, path, BenchTest(0, 1, n_ctx - 1), est.n_cpu_moe, self.threads, 1, True)
        self.log(
            f"  budget {budget} GiB: --n-cpu-moe {est.n_cpu_moe} (estimate {est.total_bytes / GiB:.2f} GiB); "
            "buffer sizes from a -v run ..."
        )
        run = run_llama_bench(argv, self.timeout_s)
        sizes = parse_buffer_sizes(run.stderr)
        reported = {"mib": sizes, "gpu_mib": device_mib(sizes), "n_ctx": n_ctx, "command": run.command}
        if not sizes:
            reported["note"] = "llama.cpp's -v log had no buffer-size lines"
        self.log(f"  llama.cpp reports {reported['gpu_mib']['total'] / 1024:.2f} GiB on the GPU {reported['gpu_mib']}")
        return est, reported

    def _measure(self, path: Path, plan: GgufPlan, r: BenchResult, est: GpuEstimate, reported: dict) -> dict:
        test = peer_test(r.prompt_tokens, r.new_tokens)
        argv = bench_command(self.peer.path, path, test, est.n_cpu_moe, self.threads, self.trials)
        self.log(f"{r.scenario} {SYSTEM} budget={r.gpu_budget_gib} GiB --n-cpu-moe {est.n_cpu_moe}: {test.label}")
        run = run_llama_bench(argv, self.timeout_s)
        t = find_test(parse_bench_json(run.stdout), test)
        seconds = [ns / 1e9 for ns in t["samples_ns"]]
        r.trials, r.trial_times_s, r.max_context = len(seconds), seconds, test.n_ctx
        r.device = "cuda" if "CUDA" in t.get("backends", "") else None
        if test.gen:
            r.decode_tok_s_trials = [float(x) for x in t["samples_ts"]]
            r.decode_tok_s = statistics.median(r.decode_tok_s_trials)
            r.notes.append(
                f"decode: llama-bench {test.label}, {test.gen} tokens after a {test.depth}-token context, "
                "random ids, no sampling; median of its repetitions"
            )
            self._roofline(r, plan, est.n_cpu_moe)
        else:
            r.prefill_tok_s = statistics.median(float(x) for x in t["samples_ts"])
            r.ttft_s = statistics.median(seconds)
            r.notes.append(f"prefill: llama-bench {test.label}, one batch; ttft_s is its time (no sampling)")
        r.placement = _placement(plan.config, est.n_cpu_moe)
        gpu_total = reported["gpu_mib"]["total"]
        if gpu_total:
            r.peak_gpu_mem_gib = gpu_total / 1024
            r.notes.append("peak_gpu_mem_gib: llama.cpp's own GPU buffers (model + KV + compute), from its -v log")
            if isinstance(r.gpu_budget_gib, int | float) and r.gpu_budget_gib and r.peak_gpu_mem_gib > r.gpu_budget_gib:
                r.notes.append(f"llama.cpp's GPU buffers {r.peak_gpu_mem_gib:.2f} GiB are above the budget")
        return {
            **r.as_dict(),
            "gguf_type": plan.expert_qtype,
            "n_cpu_moe": est.n_cpu_moe,
            "gpu_estimate": est.as_dict(),
            "gpu_buffers_reported": reported,
            "command": run.command,
            "llama_bench": {**{k: t[k] for k in _KEPT_FIELDS if k in t}, "test": test.label, "wall_s": run.seconds},
        }

    def _roofline(self, r: BenchResult, plan: GgufPlan, n_cpu_moe: int) -> None:
        """Bytes a decode token reads (k experts per layer, from where they live, plus the GPU's other weights)."""
        per_layer = plan.expert_bytes_per_layer()
        experts, k = _num_experts(plan.config), int(plan.config["num_experts_per_tok"])
        host = sum(b * k // experts for b in per_layer[:n_cpu_moe])
        gpu = sum(b * k // experts for b in per_layer[n_cpu_moe:])
        gpu += plan.other_bytes()
        gpu_bw = self.machine.get("gpu_mem_bw_gb_s")
        if gpu_bw is None:  # a run without CUDA: llama.cpp read everything from host memory (as cadenza's rows say)
            host, gpu = host + gpu, 0
        r.host_bytes_per_token, r.gpu_bytes_per_token = float(host), float(gpu)
        r.roofline_fraction = roofline_fraction(
            host, gpu, self.machine.get("dram_read_gb_s"), gpu_bw, 1.0 / r.decode_tok_s if r.decode_tok_s else None
        )


# llama-bench's own fields kept in a row: its build, the box as it saw it, and what it ran with
_KEPT_FIELDS = (
    "build_commit",
    "build_number",
    "backends",
    "gpu_info",
    "cpu_info",
    "n_threads",
    "n_gpu_layers",
    "n_cpu_moe",
    "flash_attn",
    "n_batch",
    "n_ubatch",
    "type_k",
    "avg_ts",
    "stddev_ts",
)


def _placement(config: dict, n_cpu_moe: int) -> dict:
    layers, experts = int(config["num_hidden_layers"]), _num_experts(config)
    where = f"experts of layers 0-{n_cpu_moe - 1} on the host, of the other {layers - n_cpu_moe} on the GPU"
    return {
        "summary": where if n_cpu_moe else "every expert on the GPU",
        "resident_per_layer": [0] * n_cpu_moe + [experts] * (layers - n_cpu_moe),
    }


def _num_experts(config: dict) -> int:
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)
