"""Prefill, then decode with the KV cache: the one token generator that the API, the CLI, chat, the server and
the bench consume. Nothing else re-implements the decode loop.

Sequences run in a `Batch` (cadenza.batch: continuous batching in one slot cache); the Engine runs its passes:
chunked and grouped prefill, decode steps (as CUDA graphs where possible) and mixed passes, in which an offline job
with offloaded experts prefills prompts inside a decode step (`Engine.mixed`). A single `generate` is a batch of
one. Beam search runs its beams as the rows of one batch and reorders the cache rows as beams are kept or dropped
(`beam_search`).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from cadenza.batch import Batch
from cadenza.errors import CadenzaError
from cadenza.generation import Generation, GenerationStats, Step
from cadenza.micro_batches import MicroBatches
from cadenza.moe.trace import padded
from cadenza.sampling import SamplingParams

if TYPE_CHECKING:
    from cadenza.text import Tokenizer


DECODE_SPAN = "cadenza.decode"  # a decode step, for profiles and timelines


class Passes:
    """How many passes of each kind ("prefill", "decode", "mixed") the engine's batches ran and the seconds their
    steps took (host clock; each kind's step ends in a read-back): where an offline job's time goes."""

    def __init__(self):
        self.count: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def add(self, kind: str, seconds: float) -> None:
        self.count[kind] = self.count.get(kind, 0) + 1
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds

    def snapshot(self) -> dict[str, tuple[int, float]]:
        return {k: (n, self.seconds[k]) for k, n in self.count.items()}

    def since(self, before: dict[str, tuple[int, float]]) -> dict[str, dict]:
        """{kind: {"passes": n, "seconds": s}} of the passes after `before` (a snapshot)."""
        out = {}
        for k, n in self.count.items():
            n0, s0 = before.get(k, (0, 0.0))
            if n > n0:
                out[k] = {"passes": n - n0, "seconds": round(self.seconds[k] - s0, 3)}
        return out


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        device: torch.device,
        dtype: torch.dtype,
        max_context: int,
        eos_token_ids: set[int],
        orchestra=None,
        prefill_chunk: int = 2048,
        max_batch: int = 1,
        cuda_graphs: bool = True,
        context_source: str = "",
        context_fix: str = "",
        kv_cache: str = "gpu",
        micro_batches: int = 1,
    ):
        self.model, self.tokenizer = model, tokenizer
        # "host": every KV cache in host memory, decode attention on the CPU by cadenza's kernel (on a GPU: batches
        # past the GPU's memory; no graphs)
        self.kv_host = kv_cache == "host"
        self.device, self.dtype = device, dtype
        self.max_context = max_context
        # for messages: where max_context comes from (the user's --max-context, the model's config) and how to
        # raise it ("" when it cannot be raised)
        self.context_source, self.context_fix = context_source, context_fix
        self.eos_token_ids = eos_token_ids
        self.orchestra = orchestra  # cadenza.moe.offload.orchestra.Orchestra when experts are offloaded
        self.prefill_chunk = prefill_chunk  # bounds the activation workspace of long prompts
        self.max_batch = max_batch  # sequences whose cache is reserved on the GPU
        self.step_hook = None  # called before each decode step (a profiler's `step`: cadenza.bench.timeline)
        self.passes = Passes()
        self._cache = None
        from cadenza.graphs import StepGraphs

        self.graphs = StepGraphs(model, device, orchestra, cuda_graphs, self.kv_host)  # decode steps, or why not
        self.micro = MicroBatches(micro_batches, device, orchestra)  # a host cache's decode steps, overlapped
        # While a decode step's CPU experts run, this thread would wait for the logits spinning in CUDA's default
        # wait, on a core the expert kernel's threads could use: it sleeps in a blocking event instead (tens of
        # microseconds to wake, against steps of tens of milliseconds).
        self._step_done = torch.cuda.Event(blocking=True) if orchestra is not None and device.type == "cuda" else None

    def set_batch(self, max_batch: int, kv_cache: str, micro_batches: int = 1) -> None:
        """Another batch size and KV cache place between requests: the reserved GPU cache is dropped (the next
        request reserves the new size, or none with the cache on the host) and the graphs follow."""
        self.max_batch = max_batch
        self.kv_host = kv_cache == "host"
        self._cache = None
        self.graphs.set_kv_host(self.kv_host)
        if micro_batches != self.micro.count:
            self.micro.close()
            self.micro = MicroBatches(micro_batches, self.device, self.orchestra)

    def _new_cache(self, length: int, slots: int):
        """A cache on the model's device, or each layer's part on its GPU where the layers are split."""
        from cadenza.layer_split import layer_devices

        cache = self.model.new_cache(length, self.dtype, self.device, batch=slots)
        devices = layer_devices(self.model)
        return cache.place_layers(devices) if devices is not None else cache

    def cache_for(self, slots: int, length: int):
        """A cache with `slots` sequences of up to `length` tokens. On the CPU it grows as it fills. On a GPU the
        cache of max_batch × the whole context is allocated once and reused (the placement budgeted it); a
        request needing more slots gets a cache of its own size, if the GPU has room for it."""
        if self.kv_host:  # grows as it fills, like a CPU cache; attention reads it on the CPU
            return self.model.new_cache(length, self.dtype, torch.device("cpu"), batch=slots).on_host(self.device)
        if self.device.type != "cuda":
            return self._new_cache(length, slots)
        if self._cache is None:
            self._cache = self._new_cache(self.max_context, self.max_batch)
            self._cache.reserve()
        if slots <= self._cache.batch:
            self._cache.reset()
            return self._cache
        try:
            return self._new_cache(length, slots).reserve()
        except torch.OutOfMemoryError:
            raise CadenzaError(
                f"{slots} sequences of up to {length} tokens need more GPU memory for their KV cache than is free "
                f"(the reserved cache holds {self._cache.batch}). Start with a larger max_batch (--max-batch "
                f"{slots}), or use fewer beams / prompts at once, or lower max_tokens."
            ) from None

    def forward(self, token_ids: list[int], cache, last_only: bool, rows: list[int] | None = None) -> torch.Tensor:
        """Runs one sequence's tokens through the model in chunks of at most `prefill_chunk` -> logits [T or 1, V]."""
        out = []
        for i in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[i : i + self.prefill_chunk]
            last = i + self.prefill_chunk >= len(token_ids)
            ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
            logits = self.model(ids, cache, last_only=last_only, rows=rows)[0]
            if not last_only or last:
                out.append(logits)
        return out[0] if len(out) == 1 else torch.cat(out)

    def prefill_group(self, prompts: list[list[int]], cache, rows: list[int]) -> torch.Tensor:
        """Prompts prefilled together in one pass (slot rows[b] holds prompts[b], its cache emptied): each is
        right-padded to the longest by repeating its last token; a row's padded positions change none of its own
        (causal attention, per-token experts), their cache entries lie past the row's length (the mask hides them,
        the row's next tokens overwrite them) -> logits [B, V] float32 of each prompt's last position. With experts
        offloaded one pass streams the layer's missing experts once for all of them, not once a prompt."""
        ids, last, real = self._padded(prompts)
        with padded(real):
            logits = self.model(ids, cache, rows=rows, last=last)[:, 0]
        for r, p in zip(rows, prompts, strict=True):
            cache.lengths[r] = len(p)
        return logits

    def _padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """prompts right-padded to the longest (`prefill_group`) -> ids [B, T], each row's last real position [B],
        and the real tokens' mask [B*T] for the routing statistics (None where no prompt is padded)."""
        lengths = [len(p) for p in prompts]
        n = max(lengths)
        ids = torch.tensor([p + p[-1:] * (n - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        last = torch.tensor([m - 1 for m in lengths], device=self.device)
        real = None if min(lengths) == n else (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).reshape(-1)
        return ids, last, real

    def mixes(self, rows: int) -> bool:
        """Whether a decode step of `rows` sequences may take a prompt group's prefill into its pass (`mixed`):
        the family's passes mix (CausalLM.mixes_passes) and the step is not a host cache's micro-batched one."""
        return getattr(self.model, "mixes_passes", False) and not (self.kv_host and self.micro.applies(rows))

    def mixed(
        self, token_ids: list[int], rows: list[int], prompts: list[list[int]], prompt_rows: list[int], cache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step (token_ids[b] appended to slot rows[b]) and the prefill of `prompts` (into the emptied
        slots prompt_rows, padded as `prefill_group` pads them) as one pass: each part's attention on its own,
        every layer's experts once for both (CausalLM.forward_mixed) -> (logits [B, V] of the decode rows, logits
        [P, V] of each prompt's last position), float32. Eager: the pass's shapes change with the prompts."""
        if self.step_hook is not None:
            self.step_hook()
        ids, last, real = self._padded(prompts)
        step = torch.tensor([[t] for t in token_ids], dtype=torch.long, device=self.device)
        if real is not None:
            real = torch.cat((torch.ones(len(token_ids), dtype=torch.bool), real))
        with torch.profiler.record_function(DECODE_SPAN), padded(real):
            logits, first = self.model.forward_mixed([(step, rows, None), (ids, prompt_rows, last)], cache)
        for r, p in zip(prompt_rows, prompts, strict=True):
            cache.lengths[r] = len(p)
        self._wait_step()
        return logits, first

    def decode(self, token_ids: list[int], cache, rows: list[int], capture: bool = True) -> torch.Tensor:
        """One decode step: token_ids[b] appended to cache slot rows[b] -> logits [B, V] float32. Replayed as a
        CUDA graph where possible (cadenza.graphs), else run eagerly. capture=False: a step whose graph is not
        captured yet runs eagerly instead (a batch size that may not come again)."""
        if self.step_hook is not None:
            self.step_hook()
        with torch.profiler.record_function(DECODE_SPAN):  # (a timeline's mark: cadenza.bench.timeline)
            return self._decode(token_ids, cache, rows, capture)

    def _decode(self, token_ids: list[int], cache, rows: list[int], capture: bool = True) -> torch.Tensor:
        if self.graphs.enabled and (capture or self.graphs.captured(cache, rows)):
            logits = self.graphs.run(token_ids, cache, rows)
        elif self.kv_host and self.micro.applies(len(rows)):
            logits = self.micro.decode(self.model, token_ids, cache, rows)
        else:
            ids = torch.tensor([[t] for t in token_ids], dtype=torch.long, device=self.device)
            logits = self.model(ids, cache, last_only=True, rows=rows)[:, -1]
        self._wait_step()
        return logits

    def _wait_step(self) -> None:
        """Waits for the step's GPU work in a blocking event (offloaded experts: see `_step_done`)."""
        if self._step_done is not None:
            self._step_done.record()
            self._step_done.synchronize()

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise CadenzaError("The prompt is empty (0 tokens). Give a prompt of at least one token.")
        if len(prompt_ids) >= self.max_context:
            source = f" ({self.context_source})" if self.context_source else ""
            fix = f", or {self.context_fix}" if self.context_fix else ""
            raise CadenzaError(
                f"The prompt has {len(prompt_ids)} tokens, but the context is {self.max_context} tokens{source} and "
                f"generation needs room for at least one more. Shorten the prompt{fix}."
            )
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise CadenzaError(
                f"Prompt token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1}). Pass ids made by "
                "this model's tokenizer."
            )

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """One teacher-forced forward pass: float32 logits [len(token_ids), V] on the CPU."""
        self.check_prompt(token_ids[:-1] or token_ids)
        if len(token_ids) > self.max_context:
            raise CadenzaError(
                f"{len(token_ids)} tokens do not fit the context of {self.max_context} tokens. Score fewer tokens, "
                "or raise max_context."
            )
        return self.forward(token_ids, self.cache_for(1, len(token_ids)), last_only=False).float().cpu()

    def generate(self, prompt_ids: list[int], params: SamplingParams, gen: Generation | None = None) -> Iterator[Step]:
        """Yields one Step per generated token; `gen` (if given) collects ids, text, finish reason and stats."""
        if params.num_beams > 1:
            gen = self.beam_search(prompt_ids, params, gen)
            yield Step(gen.token_ids[-1] if gen.token_ids else -1, gen.text, gen.finish_reason)
            return
        batch = Batch(self, 1, min(self.max_context, len(prompt_ids) + params.max_tokens))
        seq = batch.add(prompt_ids, params, gen)
        try:
            while len(batch):
                for _, step in batch.step():
                    yield step
        finally:
            if not seq.finished:  # the consumer stopped early (Ctrl-C in chat): the stats still count its tokens
                seq.finish("abort", self)

    def generate_many(
        self, requests: Sequence[tuple[list[int], SamplingParams]], slots: int | None = None
    ) -> list[Generation]:
        """Runs several prompts together (continuous batching over `slots` cache slots; default: all at once on
        the CPU, max_batch on a GPU) -> their Generations in order. Beam-search requests run one after another."""
        gens = [Generation(list(ids)) for ids, _ in requests]
        plain = [i for i, (_, p) in enumerate(requests) if p.num_beams == 1]
        for i, (ids, p) in enumerate(requests):
            if p.num_beams > 1:
                self.beam_search(ids, p, gens[i])
        if plain:
            if slots is None:
                slots = len(plain) if self.device.type != "cuda" else min(len(plain), self.max_batch)
            longest = max(len(requests[i][0]) + requests[i][1].max_tokens for i in plain)
            batch = Batch(self, slots, min(self.max_context, longest))
            for i in plain:
                batch.add(*requests[i], gens[i])
            while len(batch):
                batch.step()
        return gens

    def run_many(
        self, requests: Iterable[tuple[object, list[int], SamplingParams]], slots: int, sort_window: int = 0
    ) -> Iterator[tuple[object, Generation]]:
        """Throughput mode: (tag, prompt ids, params) requests, read lazily from `requests`, run in one Batch of
        `slots` slots that is refilled as sequences finish -> (tag, Generation) as each one finishes (not in input
        order). With `sort_window` > 1, requests are read that many at a time and each window is admitted shortest
        prompt first: prompts of about one length are prefilled together with less padding, and a decode step's
        attention spans the longest row of the step, so rows of similar lengths waste less of it. Memory stays
        bounded: at most `slots` running plus one window waiting. Beam-search requests run alone, when read."""
        source = iter(requests)
        # With experts offloaded, prompts are prefilled a chunk a step inside the decode steps' passes (Batch's mix):
        # the layer's missing experts cross the link once for both, and admissions spread over the steps instead
        # of whole batches prefilled apart, each pass streaming every expert again
        mix = self.orchestra is not None and getattr(self.model, "mixes_passes", False)
        batch = Batch(self, slots, self.max_context, prefill_per_step=self.prefill_chunk if mix else None, mix=mix)
        if self.orchestra is not None:  # the job's passes keep their batch: the last layer copies the first's ahead
            self.orchestra.wraps = True
        try:
            yield from self._run_batch(batch, source, slots, sort_window)
        finally:
            if self.orchestra is not None:
                self.orchestra.wraps = False

    def _run_batch(self, batch, source, slots: int, sort_window: int) -> Iterator[tuple[object, Generation]]:
        window: deque[tuple[object, list[int], SamplingParams]] = deque()
        tags: dict[int, object] = {}
        exhausted = False
        while True:
            while not exhausted and len(batch) < slots:
                if not window:
                    window.extend(itertools.islice(source, max(1, sort_window)))
                    if not window:
                        exhausted = True
                        break
                    if sort_window > 1:
                        window = deque(sorted(window, key=lambda r: len(r[1])))
                tag, ids, params = window.popleft()
                if params.num_beams > 1:
                    yield tag, self.beam_search(ids, params, Generation(list(ids)))
                    continue
                seq = batch.add(ids, params, Generation(list(ids)))
                tags[id(seq)] = tag
            if not len(batch):
                return
            for seq, step in batch.step():
                if step.finish_reason is not None:
                    yield tags.pop(id(seq)), seq.gen

    @torch.inference_mode()
    def beam_search(self, prompt_ids: list[int], params: SamplingParams, gen: Generation | None = None) -> Generation:
        from cadenza.beam import run_beam_search

        return run_beam_search(self, prompt_ids, params, gen)

    def expert_stats(self, stats: GenerationStats, start, decode_start, end) -> None:
        whole, decode = end.minus(start), end.minus(decode_start)
        stats.expert_work = {"gpu": whole.gpu, "cpu": whole.cpu, "fetched": whole.fetched, "split": whole.split}
        stats.decode_host_bytes = decode.host_bytes
        stats.decode_gpu_bytes = decode.gpu_bytes
        stats.decode_syncs = decode.syncs
        stats.decode_breakdown = {
            "sync_wait_s": round(decode.sync_wait_s, 6),
            "cpu_experts_s": round(decode.cpu_busy_s, 6),
            "cpu_wait_s": round(decode.cpu_wait_s, 6),
        }
        looked_up = whole.cache_hits + whole.cache_misses
        if looked_up or whole.prefetch_issued:
            stats.fetch_cache = {
                "hits": whole.cache_hits,
                "misses": whole.cache_misses,
                "hit_rate": round(whole.cache_hits / looked_up, 4) if looked_up else None,
                "prefetch_issued": whole.prefetch_issued,
                **{f"prefetch_{k}": None if v is None else round(v, 4) for k, v in whole.prefetch_quality().items()},
            }
