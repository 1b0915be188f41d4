"""The server's numbers in Prometheus' text format (GET /metrics), without a client library.

The engine thread and the HTTP handlers both write; one lock keeps each update and each rendering whole.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

# seconds: time to first token spans queueing and prefill; inter-token latency is one decode step
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, math.inf), self.counts, strict=True):
            total += count
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {self.sum!r}", f"{name}_count {total}"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Everything GET /metrics reports; `render()` is the response body."""

    def __init__(
        self, model_name: str, max_batch: int, max_queue: int, fingerprint: str, version: str, prefill_chunk=None
    ):
        self.lock = threading.Lock()
        self.info = {"model": model_name, "version": version, "system_fingerprint": fingerprint}
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk = prefill_chunk  # --prefill-chunk (None: whole prompts)
        self.max_prefill_step = 0  # the most prompt tokens one step prefilled: what a stream waited for at most
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.finished: dict[str, int] = defaultdict(int)  # sequences by finish reason (stop, length, abort, error)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.running = 0
        self.waiting = 0
        self.decode_steps = 0  # forward passes that advanced running sequences one token each
        self.decode_step_sequences = 0  # their sequences, summed: / decode_steps = the mean batch
        self.max_batch_seen = 0
        self.expert_work: dict[str, int] | None = None  # offloading only: gpu / cpu / fetched (token, expert) pairs
        self.cache_hits: int | None = None  # the fetch slot cache (policies that fetch)
        self.cache_misses: int | None = None
        self.prefetch: tuple[int, int, int, int] | None = None  # speculative prefetch: issued, guessed, used, needed
        self.experts_swapped = 0  # adaptive placement

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1

    def render(self) -> str:
        with self.lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help: str, samples: list[str]) -> None:
                lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", *samples])

            def one(name: str, kind: str, help: str, value) -> None:
                metric(name, kind, help, [f"{name} {value}"])

            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in self.info.items())
            metric(
                "cadenza_info", "gauge", "The served model and the server's version.", [f"cadenza_info{{{labels}}} 1"]
            )
            metric(
                "cadenza_requests_total",
                "counter",
                "HTTP requests answered, by endpoint and status code.",
                [
                    f'cadenza_requests_total{{endpoint="{_escape(e)}",status="{s}"}} {c}'
                    for (e, s), c in sorted(self.requests.items())
                ],
            )
            metric(
                "cadenza_sequences_finished_total",
                "counter",
                "Sequences that ended, by reason: stop, length, abort (client gone or shutdown), error.",
                [f'cadenza_sequences_finished_total{{reason="{r}"}} {c}' for r, c in sorted(self.finished.items())],
            )
            one(
                "cadenza_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled (each of n samples prefills its prompt).",
                self.prompt_tokens,
            )
            one("cadenza_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
            metric(
                "cadenza_time_to_first_token_seconds",
                "histogram",
                "From a request's arrival to its first token (queueing and prefill), per sequence.",
                self.ttft.lines("cadenza_time_to_first_token_seconds"),
            )
            metric(
                "cadenza_inter_token_latency_seconds",
                "histogram",
                "Between a sequence's consecutive tokens.",
                self.itl.lines("cadenza_inter_token_latency_seconds"),
            )
            metric(
                "cadenza_e2e_request_latency_seconds",
                "histogram",
                "From arrival to the last token, per sequence.",
                self.e2e.lines("cadenza_e2e_request_latency_seconds"),
            )
            one("cadenza_running_sequences", "gauge", "Sequences holding a cache slot (decoding).", self.running)
            one("cadenza_waiting_sequences", "gauge", "Sequences queued for a free slot.", self.waiting)
            one(
                "cadenza_max_batch",
                "gauge",
                "Cache slots: sequences decoded together at most (--max-batch).",
                self.max_batch,
            )
            one(
                "cadenza_prefill_chunk_tokens",
                "gauge",
                "Prompt tokens prefilled per step between decode steps (--prefill-chunk; 0: whole prompts).",
                self.prefill_chunk or 0,
            )
            one(
                "cadenza_max_prefill_step_tokens",
                "gauge",
                "The most prompt tokens one step prefilled so far: the longest a running stream waited on a prompt.",
                self.max_prefill_step,
            )
            one(
                "cadenza_max_queue",
                "gauge",
                "Waiting sequences before requests are refused with 429 (--max-queue).",
                self.max_queue,
            )
            one(
                "cadenza_decode_steps_total",
                "counter",
                "Decode forward passes (each advances every running sequence by one token).",
                self.decode_steps,
            )
            one(
                "cadenza_decode_step_sequences_total",
                "counter",
                "Sequences advanced by decode passes, summed (divided by cadenza_decode_steps_total: the mean batch).",
                self.decode_step_sequences,
            )
            one(
                "cadenza_batch_size_max",
                "gauge",
                "Most sequences decoded together in one pass since start.",
                self.max_batch_seen,
            )
            if self.expert_work is not None:
                metric(
                    "cadenza_expert_work_total",
                    "counter",
                    "Routed-expert work, in (token, expert) pairs, by where it ran: gpu (resident), cpu, fetched.",
                    [f'cadenza_expert_work_total{{side="{k}"}} {v}' for k, v in self.expert_work.items()],
                )
            if self.cache_hits is not None:
                one(
                    "cadenza_fetch_cache_hits_total",
                    "counter",
                    "Fetched experts found in the GPU slot cache.",
                    self.cache_hits,
                )
                one(
                    "cadenza_fetch_cache_misses_total",
                    "counter",
                    "Fetched experts copied to the GPU slot cache.",
                    self.cache_misses,
                )
                total = self.cache_hits + self.cache_misses
                one(
                    "cadenza_fetch_cache_hit_rate",
                    "gauge",
                    "Hits / (hits + misses) of the fetch slot cache.",
                    f"{self.cache_hits / total:.6f}" if total else "0",
                )
            if self.prefetch is not None:
                issued, guessed, used, needed = self.prefetch
                one("cadenza_prefetch_issued_total", "counter", "Experts copied ahead on a guess.", issued)
                one(
                    "cadenza_prefetch_guessed_total",
                    "counter",
                    "Non-resident experts guessed for the next layer (copied then, or already in a slot).",
                    guessed,
                )
                one("cadenza_prefetch_used_total", "counter", "Prefetched experts the next layer used.", used)
                one(
                    "cadenza_prefetch_precision",
                    "gauge",
                    "Guessed experts that the next layer used / guessed experts.",
                    f"{used / guessed:.6f}" if guessed else "0",
                )
                one(
                    "cadenza_prefetch_recall",
                    "gauge",
                    "Needed non-resident experts that had been prefetched / needed non-resident experts.",
                    f"{used / needed:.6f}" if needed else "0",
                )
            one(
                "cadenza_experts_swapped_total",
                "counter",
                "Resident experts exchanged for more popular ones by adaptive placement.",
                self.experts_swapped,
            )
            return "\n".join(lines) + "\n"
