"""The engine thread: the one place the server touches the model.

One thread owns a `Batch` over `max_batch` cache slots and calls `step()` while any sequence is queued or running;
idle, it sleeps on a condition. HTTP handlers (on the asyncio loop) `submit` sequences and read their tokens from an
asyncio queue; the thread hands each token over with `loop.call_soon_threadsafe`, so the loop never waits on the
model and the model never waits on a client. Sequences that arrive while others decode join the batch at the next
step (continuous batching); a cancelled one (its client went away) leaves at the next step and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cadenza.batch import Batch, Request
from cadenza.errors import CadenzaError
from cadenza.generation import Step
from cadenza.sampling import SamplingParams
from cadenza.server.errors import APIError
from cadenza.server.metrics import Metrics

log = logging.getLogger(__name__)


def shutting_down() -> APIError:
    return APIError(
        "The server is shutting down and did not finish this request. Retry it against a running server.",
        status=503,
        type="server_error",
        code="server_shutting_down",
    )


@dataclass
class Event:
    """What a handler receives for sequence `index` of its request: a token, or the end without one."""

    index: int
    step: Step | None = None  # a token (its finish_reason set on the sequence's last one)
    error: APIError | None = None  # the sequence failed
    aborted: bool = False  # the server is shutting down: no more tokens will come


class Job:
    """One sequence on its way through the engine."""

    def __init__(self, index: int, prompt_ids: list[int], params: SamplingParams, deliver: Callable[[Event], None]):
        self.index, self.prompt_ids, self.params, self.deliver = index, prompt_ids, params, deliver
        self.request: Request | None = None  # set by the engine thread when it joins the batch
        self.cancelled = False
        self.admitted = False  # has a slot (its first token came)
        self.queued = True  # counted in the worker's `waiting` (guarded by its lock)
        self.done = False
        self.t_submit = time.perf_counter()
        self.t_last = 0.0


class Submission:
    """One HTTP request's sequences and the queue their Events arrive in (in each sequence's order)."""

    def __init__(self, worker: EngineWorker, jobs: list[Job], queue: asyncio.Queue):
        self.worker, self.jobs, self.queue = worker, jobs, queue

    def cancel(self) -> None:
        """The client is gone: its sequences stop at the next step (waiting ones never start)."""
        self.worker.cancel(self.jobs)


class EngineWorker:
    ADAPT_EVERY_STEPS = 512  # under steady load there is no idle moment: adapt between steps this often

    def __init__(
        self, llm, max_queue: int, metrics: Metrics, adapt_bytes: int | None = None, prefill_chunk: int | None = None
    ):
        self.llm, self.max_queue, self.metrics = llm, max_queue, metrics
        # prompt tokens prefilled per step, between the running sequences' tokens (None: a whole prompt at once)
        self.prefill_chunk = prefill_chunk
        # adaptive placement: between steps, at most this many bytes of resident experts exchanged for ones live
        # traffic uses more (None: off; nothing to do without offloading)
        self.adapt_bytes = adapt_bytes if llm.orchestra is not None else None
        self.steps_since_adapt = 0
        self.cond = threading.Condition()
        self.inbox: list[Job] = []  # submitted, not yet added to the batch
        self.to_cancel: list[Job] = []
        self.waiting = 0  # submitted sequences without a slot yet (the bounded queue)
        self.accepting = True
        self.stopping = False
        self.batch: Batch | None = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cadenza-engine", daemon=True)

    # --- the handlers' side (the asyncio loop) -------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        self.ready.wait()
        if self.failed is not None:
            raise self.failed

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.accepting

    def submit(self, sequences: list[tuple[list[int], SamplingParams]]) -> Submission:
        """Queues sequences (from the running asyncio loop); their Events arrive in the returned queue. Refuses
        with 429 when the waiting sequences would pass max_queue, 503 when shutting down."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, event)

        jobs = [Job(i, ids, params, deliver) for i, (ids, params) in enumerate(sequences)]
        with self.cond:
            if not self.accepting:
                raise shutting_down()
            if self.waiting + len(jobs) > self.max_queue:
                raise APIError(
                    f"The server is busy: {self.waiting} sequences are already waiting for one of its "
                    f"{self.llm.max_batch} slots (the queue holds {self.max_queue}, --max-queue). Retry after a "
                    "moment.",
                    status=429,
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": "1"},
                )
            self.inbox.extend(jobs)
            self.waiting += len(jobs)
            self.metrics.waiting = self.waiting
            self.cond.notify()
        return Submission(self, jobs, queue)

    def cancel(self, jobs: list[Job]) -> None:
        """The client is gone. A sequence still waiting leaves the queue at once (the `waiting` gauge and the
        room left before 429 count it no more); one in the inbox never reaches the engine, one queued in the batch
        is dropped by the engine thread before its next step, one decoding leaves at its next step."""
        dropped = 0
        with self.cond:
            for job in jobs:
                if job.done or job.cancelled:
                    continue
                job.cancelled = True
                self._unqueue(job)
                if job in self.inbox:
                    self.inbox.remove(job)
                    job.done = True
                    dropped += 1
                else:
                    self.to_cancel.append(job)
            self.cond.notify()
        if dropped:
            with self.metrics.lock:
                self.metrics.finished["abort"] += dropped

    def _unqueue(self, job: Job) -> None:
        """`job` no longer waits for a slot (admitted, cancelled or ended): once only. Holds self.cond."""
        if job.queued:
            job.queued = False
            self.waiting -= 1
            with self.metrics.lock:
                self.metrics.waiting = self.waiting

    def shutdown(self) -> None:
        """Stops taking requests; at the end of the step under way, every sequence ends (its handler is told) and
        the thread exits."""
        with self.cond:
            self.accepting = False
            self.stopping = True
            self.cond.notify()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # --- the engine thread -----------------------------------------------------------------------------------------

    def _new_batch(self) -> Batch:
        return Batch(self.llm.engine, slots=self.llm.max_batch, prefill_per_step=self.prefill_chunk)

    def _run(self) -> None:
        try:
            if self.llm.device.type == "cuda":  # a new thread starts on device 0
                torch.cuda.set_device(self.llm.device)
            self.batch = self._new_batch()
        except BaseException as e:  # e.g. no GPU memory for the cache: reported by start()
            self.failed = e
            self.ready.set()
            return
        self.ready.set()
        live: dict[Request, Job] = {}
        error = None
        try:
            self._serve(live)
        except BaseException as e:  # the engine cannot go on (e.g. no clean batch could be made after a failure)
            log.exception("the engine thread stopped after an internal error")
            error = APIError(
                f"The engine stopped after an internal error ({type(e).__name__}: {e}); see the "
                "server's log, and restart the server.",
                status=500,
                type="server_error",
            )
        with self.cond:
            self.accepting = False
            left, self.inbox = self.inbox, []
        for job in [*live.values(), *left]:
            if not job.done and not job.cancelled:
                job.deliver(Event(job.index, error=error, aborted=error is None))
            self._end(job, "abort" if error is None else "error")
        with self.metrics.lock:
            self.metrics.running = self.metrics.waiting = 0

    def _serve(self, live: dict[Request, Job]) -> None:
        """Steps while there is work, sleeps while there is none, returns when told to stop."""
        while True:
            with self.cond:
                idle = not (self.inbox or self.to_cancel or live or self.stopping)
            if (
                self.adapt_bytes
                and self.steps_since_adapt
                and (idle or self.steps_since_adapt >= self.ADAPT_EVERY_STEPS)
            ):
                self._adapt()  # between requests (or between steps under steady load), never inside a step
            with self.cond:
                while not (self.inbox or self.to_cancel or live or self.stopping):
                    self.cond.wait()
                if self.stopping:
                    return
                new, self.inbox = self.inbox, []
                cancels, self.to_cancel = self.to_cancel, []
            for job in new:
                self._add(job, live)
            for job in cancels:
                if job.request is not None:
                    self.batch.cancel(job.request)
            self._step(live)

    def _adapt(self) -> None:
        self.steps_since_adapt = 0
        try:
            swapped = self.llm.adapt_placement(self.adapt_bytes)
        except Exception:  # adaptation is an optimisation: never let it take the server down
            log.exception("adaptive expert placement failed; it stays off from now on")
            self.adapt_bytes = None
            return
        with self.metrics.lock:
            self.metrics.experts_swapped += swapped

    def _add(self, job: Job, live: dict[Request, Job]) -> None:
        if job.cancelled:
            self._end(job, "abort")
            return
        try:
            job.request = self.batch.add(job.prompt_ids, job.params)
        except CadenzaError as e:  # the handler checks first; this is the engine's own word on it
            job.deliver(Event(job.index, error=APIError(str(e))))
            self._end(job, "error")
            return
        live[job.request] = job

    def _step(self, live: dict[Request, Job]) -> None:
        batch, metrics = self.batch, self.metrics
        decoding = sum(not r.cancelled for r in batch.running)
        self.steps_since_adapt += 1
        try:
            out = batch.step()
        except Exception as e:  # a bug or the device failing: fail what is in flight, start a clean batch
            log.exception("an engine step failed; its sequences fail, and a clean batch takes over")
            error = APIError(f"The engine failed: {type(e).__name__}: {e}", status=500, type="server_error")
            for job in live.values():
                job.deliver(Event(job.index, error=error))
                self._end(job, "error")
            live.clear()
            self.batch = self._new_batch()
            return
        now, admitted = time.perf_counter(), []
        with metrics.lock:
            if decoding:
                metrics.decode_steps += 1
                metrics.decode_step_sequences += decoding
                metrics.max_batch_seen = max(metrics.max_batch_seen, decoding)
            for request, step in out:
                job = live.get(request)
                if job is None:
                    continue
                if not job.admitted:
                    job.admitted = True
                    admitted.append(job)
                    metrics.prompt_tokens += len(job.prompt_ids)
                    metrics.ttft.observe(now - job.t_submit)
                else:
                    metrics.itl.observe(now - job.t_last)
                job.t_last = now
                metrics.generation_tokens += step.has_token  # max_tokens 0: the prompt scored, no token
                if step.finish_reason is not None:
                    metrics.e2e.observe(now - job.t_submit)
        for request, step in out:
            job = live.get(request)
            if job is not None and not job.cancelled:
                job.deliver(Event(job.index, step=step))
        for request in [r for r in live if r.finished]:  # by their last step, or cancelled (no step)
            self._end(live.pop(request), request.gen.finish_reason or "abort")
        with self.cond:  # the gauge is set under the lock a cancel takes too, so it is never left stale
            for job in admitted:
                self._unqueue(job)
            with metrics.lock:
                metrics.waiting = self.waiting
        orch = self.llm.orchestra
        counters = orch.counters.snapshot() if orch is not None else None
        fetching = orch is not None and orch.cache is not None
        with metrics.lock:
            metrics.running = len(self.batch.running)
            metrics.max_prefill_step = self.batch.max_prefill_step
            if counters is not None:
                metrics.expert_work = {
                    "gpu": counters.gpu, "cpu": counters.cpu, "fetched": counters.fetched, "split": counters.split
                }  # fmt: skip
            if fetching:
                metrics.cache_hits, metrics.cache_misses = counters.cache_hits, counters.cache_misses
                metrics.prefetch = (
                    counters.prefetch_issued, counters.prefetch_guessed, counters.prefetch_used,
                    counters.prefetch_needed,
                )  # fmt: skip

    def _end(self, job: Job, reason: str) -> None:
        if job.done:
            return
        job.done = True
        with self.cond:
            self._unqueue(job)
        with self.metrics.lock:
            self.metrics.finished[reason] += 1
