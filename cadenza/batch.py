"""A batch of sequences in one slot cache, stepped together (continuous batching): each `Request` owns a slot; a new
sequence is prefilled (in chunks, or in one padded pass with prompts of about its length), then every running
sequence advances one token per step together, so their tokens cross each MoE layer at once and an expert's weights
are read once per step for all of them; sequences join and leave between steps. The passes themselves are the
`Engine`'s (cadenza.engine)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from cadenza.generation import NO_TOKEN, Generation, Step
from cadenza.sampling import Sampler, SamplingParams, batch_argmax
from cadenza.scoring import prompt_scores
from cadenza.text import StopStrings

if TYPE_CHECKING:
    from cadenza.engine import Engine


class Request:
    """One request's decoding state inside a Batch."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, gen: Generation | None):
        engine.check_prompt(prompt_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.gen = gen if gen is not None else Generation(list(prompt_ids))
        self.gen.stats.prompt_tokens = len(prompt_ids)
        if params.logprobs:
            self.gen.logprobs = []
        if params.top_logprobs:
            self.gen.top_logprobs = []
        self.sampler = Sampler(params, prompt_ids)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else engine.eos_token_ids)
        self.budget = min(params.max_tokens, engine.max_context - len(prompt_ids))
        self.detok = engine.tokenizer.detokenizer() if engine.tokenizer is not None else None  # None: ids only
        self.stops = StopStrings(params.stop) if params.stop and self.detok is not None else None
        self.slot: int | None = None
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.prefilled = 0  # prompt tokens in the cache (Batch._prefill)
        self.finished = False
        self.cancelled = False
        self.t_start = self.t_first = 0.0
        self.at_start = self.at_decode = None  # expert counter snapshots

    def emit(self, choice, engine: Engine) -> Step:
        """Records a sampled token; returns its Step (finish_reason set when the sequence ends with it)."""
        gen, stats, token = self.gen, self.gen.stats, choice.token_id
        gen.token_ids.append(token)
        stats.generated_tokens += 1
        if gen.logprobs is not None:
            gen.logprobs.append(choice.logprob)
        if gen.top_logprobs is not None:
            gen.top_logprobs.append(choice.top_logprobs)
        finish, text = None, ""
        if token in self.stop_ids:  # an end id: its own text is not part of the output
            finish = "stop"
            text, _ = self._flush()
        else:
            text = self.detok.add(token) if self.detok is not None else ""
            if self.stops is not None:
                text, hit = self.stops.feed(text)
                if hit:  # the text ends before the stop string; whatever followed it is dropped
                    finish = "stop"
            if finish is None and stats.generated_tokens >= self.budget:
                more, hit = self._flush()
                text += more
                finish = "stop" if hit else "length"
        self.next_token = token
        gen.text += text
        if finish is not None:
            self.finish(finish, engine)
        return Step(token, text, finish, choice.logprob, choice.top_logprobs)

    def _flush(self) -> tuple[str, bool]:
        """The text held back at the end (incomplete characters, a possible stop-string start); True when it
        completed a stop string (the text then ends before it)."""
        text = self.detok.flush() if self.detok is not None else ""
        if self.stops is None:
            return text, False
        text, hit = self.stops.feed(text)
        return (text, True) if hit else (text + self.stops.flush(), False)

    def finish(self, reason: str, engine: Engine) -> None:
        self.finished = True
        self.gen.finish_reason = reason
        if self.t_first:  # 0: never admitted (cancelled while waiting), so no decode time
            self.gen.stats.decode_s = time.perf_counter() - self.t_first
        counters = engine.orchestra.counters if engine.orchestra is not None else None
        if counters and self.at_start is not None:
            engine.expert_stats(self.gen.stats, self.at_start, self.at_decode or self.at_start, counters.snapshot())


class Batch:
    """Sequences decoding together in the slots of one cache. `add` queues a sequence (from any thread); each
    `step()` admits queued sequences into free slots (prefilling prompts of about one length together, longer or
    odd ones alone) and then advances every running sequence by one token in one forward pass. Cancelled
    sequences leave at the next step.

    prefill_per_step: at most this many prompt tokens are prefilled in one step (None: every admitted prompt
    whole), the rest of a long prompt in the following steps, between the running sequences' decode steps: a long
    prompt then delays the others' next token by one such chunk, not by its whole prefill (the server's
    interleaved prefill). A prompt whose log-probs are asked for is prefilled whole. With `mix`, a step that has
    both runs its prompt group and its decode rows as one pass (offline jobs: `Engine.run_many`)."""

    def __init__(
        self,
        engine: Engine,
        slots: int,
        length: int | None = None,
        prefill_per_step: int | None = None,
        mix: bool = False,
    ):
        """mix: a step that decodes and has whole prompts to prefill runs both as one pass (Engine.mixed), where
        the engine can: with experts offloaded, the layer's missing experts then cross the link once for both."""
        if prefill_per_step is not None and prefill_per_step < 1:
            raise ValueError(f"prefill_per_step must be at least 1, got {prefill_per_step}")
        self.engine = engine
        self.cache = engine.cache_for(slots, length or engine.max_context)
        self.free = list(range(self.cache.batch))
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()  # admitted (a slot each), their prompts partly prefilled
        self.running: list[Request] = []
        self.lock = threading.Lock()
        self.prefill_per_step = prefill_per_step
        self.mix = mix
        self.last_rows = 0  # the last decode step's rows (with mix: a batch size gets a graph when it repeats)
        self.max_prefill_step = 0  # the most prompt tokens one step has prefilled (the bound of a stall)

    def add(self, prompt_ids: list[int], params: SamplingParams, gen: Generation | None = None) -> Request:
        seq = Request(self.engine, prompt_ids, params, gen)
        with self.lock:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Request) -> None:
        """A running sequence leaves at the next step; a queued one leaves the queue now (finished, "abort"), so
        that sequences behind it move up instead of it keeping its place until it reaches the front."""
        seq.cancelled = True
        with self.lock:
            try:
                self.waiting.remove(seq)
            except ValueError:  # admitted already (or finished)
                return
        seq.finish("abort", self.engine)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, Step]]:
        engine, out = self.engine, []
        for seq in [s for s in self.running if s.cancelled]:
            self._leave(seq, "abort")
        decoding = list(self.running)
        while self.free:
            with self.lock:
                if not self.waiting:
                    break
                seq = self.waiting.popleft()
            if seq.cancelled:
                seq.finish("abort", engine)
                continue
            self._start(seq)
        budget = self.prefill_per_step if self.prefill_per_step is not None else float("inf")
        if decoding and self.prefilling and self.mix and engine.mixes(len(decoding)):
            # the pass's tokens within the prefill chunk, like a prefill pass's (the activation workspace)
            group = self._front_group(min(budget, engine.prefill_chunk - len(decoding)))
            if group:
                return self._mixed_step(decoding, group)
        done = 0
        t0 = time.perf_counter()
        while self.prefilling and done < budget:
            group = self._front_group(budget - done)
            if len(group) > 1:
                logits = engine.prefill_group([s.prompt_ids for s in group], self.cache, [s.slot for s in group])
                for i, seq in enumerate(group):
                    self.prefilling.popleft()
                    seq.prefilled = len(seq.prompt_ids)
                    done += seq.prefilled
                    out.append((seq, self._first_token(seq, logits[i : i + 1], None)))
                continue
            seq = self.prefilling[0]
            if seq.cancelled:
                self.prefilling.popleft()
                seq.finish("abort", engine)
                self.free.append(seq.slot)
                continue
            whole = seq.params.prompt_logprobs is not None or self.prefill_per_step is None
            left = len(seq.prompt_ids) - seq.prefilled
            if self.mix and done and not whole and not seq.prefilled and budget - done < left <= engine.prefill_chunk:
                break  # not split: it goes whole into the next step's pass, which can mix it with the decode rows
            n = left if whole else min(budget - done, left)
            step = self._prefill(seq, int(n))
            done += n
            if step is not None:
                self.prefilling.popleft()
                out.append((seq, step))
        self.max_prefill_step = max(self.max_prefill_step, int(done))
        if done:
            engine.passes.add("prefill", time.perf_counter() - t0)
        if decoding:
            t0 = time.perf_counter()
            # with mix, sizes change nearly every step while prompts join and leave (a batch's tail: one size a
            # step as each group finishes); a graph captured for one replay costs more than the step it speeds
            capture = not self.mix or len(decoding) == self.last_rows
            tokens, rows = [s.next_token for s in decoding], [s.slot for s in decoding]
            logits = engine.decode(tokens, self.cache, rows, capture=capture)
            self.last_rows = len(decoding)
            self._emit(decoding, logits, out)
            engine.passes.add("decode", time.perf_counter() - t0)
        return out

    def _mixed_step(self, decoding: list[Request], group: list[Request]) -> list[tuple[Request, Step]]:
        """The running sequences' next tokens and `group`'s prompts (the front of `prefilling`) in one pass."""
        engine, out = self.engine, []
        t0 = time.perf_counter()
        tokens, rows = [s.next_token for s in decoding], [s.slot for s in decoding]
        logits, first = engine.mixed(tokens, rows, [s.prompt_ids for s in group], [s.slot for s in group], self.cache)
        for i, seq in enumerate(group):
            self.prefilling.popleft()
            seq.prefilled = len(seq.prompt_ids)
            out.append((seq, self._first_token(seq, first[i : i + 1], None)))
        self.max_prefill_step = max(self.max_prefill_step, sum(len(s.prompt_ids) for s in group))
        self.last_rows = len(decoding)
        self._emit(decoding, logits, out)
        engine.passes.add("mixed", time.perf_counter() - t0)
        return out

    def _emit(self, decoding: list[Request], logits: torch.Tensor, out: list) -> None:
        """Samples each decoding row's token from its logits row (plain greedy rows by one argmax), into `out`."""
        best = batch_argmax(logits, [s.sampler.plain_greedy for s in decoding])
        for i, seq in enumerate(decoding):
            step = seq.emit(seq.sampler.sample(logits[i], best.get(i)), self.engine)
            out.append((seq, step))
            if seq.finished:
                self._leave(seq, None)

    def _start(self, seq: Request) -> None:
        """Gives a queued sequence a slot; its prompt is prefilled by this and later steps (`_prefill`)."""
        seq.slot = self.free.pop(0)
        self.cache.reset([seq.slot])
        counters = self.engine.orchestra.counters if self.engine.orchestra is not None else None
        seq.at_start = counters.snapshot() if counters else None
        seq.t_start = time.perf_counter()
        seq.prefilled = 0
        self.prefilling.append(seq)

    def _front_group(self, budget: float) -> list[Request]:
        """The prompts at the front of `prefilling` that one pass prefills together (Engine.prefill_group): not
        started, no prompt log-probs, whole within `budget` and the engine's prefill chunk once padded to the
        longest, padding at most 1/8 of the pass (run_many's window sorted by length keeps neighbours close), and
        all of one length for a model that pads none. Stops at the first prompt that does not fit, keeping order."""
        cap = min(self.engine.prefill_chunk, budget)
        pads = getattr(self.engine.model, "pads_prompts", False)
        group: list[Request] = []
        longest = real = 0
        for seq in self.prefilling:
            n = len(seq.prompt_ids)
            if seq.cancelled or seq.prefilled or seq.params.prompt_logprobs is not None or not 0 < n <= cap:
                break
            top, rows = max(longest, n), len(group) + 1
            if group and (rows * top > cap or (not pads and n != longest) or 8 * (rows * top - real - n) > rows * top):
                break
            group.append(seq)
            longest, real = top, real + n
        return group

    def _prefill(self, seq: Request, n: int) -> Step | None:
        """Prefills the next n prompt tokens of `seq`; at the prompt's end samples its first token -> its Step
        (None while prompt tokens remain)."""
        engine = self.engine
        top = seq.params.prompt_logprobs  # None: only the last position's logits are needed
        part = seq.prompt_ids[seq.prefilled : seq.prefilled + n]
        logits = engine.forward(part, self.cache, last_only=top is None, rows=[seq.slot])
        seq.prefilled += n
        if seq.prefilled < len(seq.prompt_ids):
            return None
        return self._first_token(seq, logits, top)

    def _first_token(self, seq: Request, logits: torch.Tensor, top: int | None) -> Step:
        """The prompt of `seq` is in the cache, `logits` [T or 1, V] its last positions': scores the prompt (top:
        its log-probs asked for), samples the first token -> its Step; the sequence runs on or leaves."""
        engine = self.engine
        counters = engine.orchestra.counters if engine.orchestra is not None else None
        scores = None if top is None else prompt_scores(logits, seq.prompt_ids, top)
        seq.gen.prompt_logprobs = scores
        choice = seq.sampler.sample(logits[-1]) if seq.budget > 0 else None
        seq.t_first = time.perf_counter()
        seq.gen.stats.prefill_s = seq.t_first - seq.t_start
        seq.at_decode = counters.snapshot() if counters else None
        if choice is None:  # max_tokens 0: the prompt scored, nothing generated
            seq.finish("length", engine)
            step = Step(NO_TOKEN, "", "length")
        else:
            step = seq.emit(choice, engine)
        step.prompt_logprobs = scores
        if seq.finished:
            self.free.append(seq.slot)
        else:
            self.running.append(seq)
        return step

    def _leave(self, seq: Request, reason: str | None) -> None:
        if reason is not None:
            seq.finish(reason, self.engine)
        self.running.remove(seq)
        self.free.append(seq.slot)
