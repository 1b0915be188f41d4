"""The sampling layer: request parameters and the per-sequence sampler (stop strings: cadenza.text.stops).

Definitions follow the common references so that results can be checked against them:

- repetition_penalty: CTRL (Keskar et al., 2019) as Hugging Face transformers applies it, over the prompt and the
  generated tokens, each distinct token once.
- presence_penalty / frequency_penalty: the OpenAI API's definition (also vLLM's), over generated tokens only.
- temperature, min_p, top_k, top_p: the same cut-offs as transformers' logits warpers, so the kept sets agree.

Processing order is vLLM's: penalties on the raw logits, then temperature, then min_p, top_k, top_p. Reported
log-probs are of the raw model logits (before any processing), as the OpenAI API and vLLM report them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cadenza.errors import CadenzaError

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
PENALTY_RANGE = 2.0  # presence/frequency penalties live in [-2, 2], as in the OpenAI API


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; every value is checked when the object is made.

    temperature 0 is greedy; top_k 0 (or -1), top_p 1 and min_p 0 switch those filters off; penalties of 1.0
    (repetition) and 0.0 (presence, frequency) are off. The same seed gives the same output.
    Generation stops at an end-of-sequence id (unless `ignore_eos`), at any of `stop_token_ids`, when the text
    contains any of `stop` (the stop string itself is not returned), or after `max_tokens` tokens.
    `logprobs` asks for the chosen token's log-probability, `top_logprobs` (implies `logprobs`) for the N most
    likely tokens at each position as well. `num_beams` > 1 asks for beam search, which is deterministic
    (temperature 0) and takes no penalties or stop strings; `length_penalty` and `early_stopping` mean what they
    mean in transformers (score / length**length_penalty; True, False or "never").
    `prompt_logprobs` N (vLLM's) asks for each prompt token's log-probability, rank and N most likely alternatives,
    from the prefill's logits; with it, max_tokens 0 scores the prompt and generates nothing.

    The first seven fields keep their historical order, so old positional uses still work.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        def bad(what: str, fix: str) -> CadenzaError:
            return CadenzaError(f"Invalid sampling parameter: {what}. {fix}")

        def number(name: str, ok, fix: str) -> float:
            """A real number (not a bool) that passes `ok`; NaN and infinities never pass."""
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or not ok(value):
                raise bad(f"{name}={value!r}", fix)
            return float(value)

        def flag(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name}={getattr(self, name)!r}", "Use true or false.")

        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS
        ):
            raise bad(
                f"prompt_logprobs={self.prompt_logprobs!r}",
                f"Use a whole number from 0 to {MAX_TOP_LOGPROBS}, or leave it unset.",
            )
        least = 0 if self.prompt_logprobs is not None else 1  # 0: score the prompt only
        if not _is_int(self.max_tokens) or self.max_tokens < least:
            fix = "Use a whole number of at least 1" + (" (0 only with prompt_logprobs)." if least else ".")
            raise bad(f"max_tokens={self.max_tokens!r}", fix)
        self.temperature = number(
            "temperature", lambda v: v >= 0, "Use 0 for greedy decoding or a positive finite number."
        )
        self.top_p = number("top_p", lambda v: 0 < v <= 1, "Use a number in (0, 1]; 1 keeps every token.")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad(f"top_k={self.top_k!r}", "Use 0 or -1 (off) or a positive whole number.")
        self.top_k = max(self.top_k, 0)  # -1 is the vLLM / OpenAI-compatible spelling of "off"
        self.min_p = number("min_p", lambda v: 0 <= v <= 1, "Use a number in [0, 1]; 0 keeps every token.")
        self.repetition_penalty = number(
            "repetition_penalty",
            lambda v: v > 0,
            "Use a positive number: 1 is no penalty, above 1 discourages repeats, below 1 encourages them.",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = number(
                name,
                lambda v: -PENALTY_RANGE <= v <= PENALTY_RANGE,
                f"Use a number in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}]; 0 is no penalty.",
            )
            setattr(self, name, value)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise bad(f"seed={self.seed!r}", "Use a non-negative whole number below 2**64, or leave it unset.")

        stops = self.stop
        if stops is None:
            stops = []
        elif isinstance(stops, str):
            stops = [stops]
        if (
            not isinstance(stops, list | tuple)
            or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOP_STRINGS
        ):
            raise bad(f"stop={self.stop!r}", f"Use a string or a list of at most {MAX_STOP_STRINGS} non-empty strings.")
        self.stop = list(stops)
        ids = self.stop_token_ids
        if not isinstance(ids, list | tuple) or not all(_is_int(i) and i >= 0 for i in ids):
            raise bad(f"stop_token_ids={ids!r}", "Use a list of non-negative token ids.")
        self.stop_token_ids = list(ids)

        flag("ignore_eos")
        flag("logprobs")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad(f"top_logprobs={self.top_logprobs!r}", f"Use a whole number from 0 to {MAX_TOP_LOGPROBS}.")
        if self.top_logprobs > 0:
            self.logprobs = True  # the alternatives come with the chosen token's own log-prob

        if not _is_int(self.num_beams) or self.num_beams < 1:
            raise bad(f"num_beams={self.num_beams!r}", "Use a whole number of at least 1 (1: no beam search).")
        self.length_penalty = number(
            "length_penalty",
            lambda v: True,
            "Use a finite number: above 0 favours longer beams, below 0 shorter ones, 0 ignores length.",
        )
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise bad(f"early_stopping={self.early_stopping!r}", 'Use true, false or "never".')
        if self.num_beams > 1:
            self._check_beam_search(bad)

    def _check_beam_search(self, bad) -> None:
        """Beam search ranks whole sequences by log-probability: no randomness, no logit rewriting, no stop text."""
        n = self.num_beams
        if self.temperature != 0:
            raise bad(
                f"num_beams={n} with temperature={self.temperature:g}",
                "beam search is deterministic: set temperature=0 (or num_beams=1 to sample).",
            )
        penalties = {
            "repetition_penalty": (self.repetition_penalty, 1.0),
            "presence_penalty": (self.presence_penalty, 0.0),
            "frequency_penalty": (self.frequency_penalty, 0.0),
        }
        for name, (value, neutral) in penalties.items():
            if value != neutral:
                raise bad(
                    f"num_beams={n} with {name}={value:g}",
                    f"Beam search takes no penalties: leave {name} at {neutral:g}, or use num_beams=1.",
                )
        if self.prompt_logprobs is not None:
            raise bad(
                f"num_beams={n} with prompt_logprobs={self.prompt_logprobs}",
                "Beam search does not score the prompt: use LLM.prompt_logprobs, or num_beams=1.",
            )
        if self.stop:
            raise bad(
                f"num_beams={n} with stop={self.stop!r}",
                "Beam search takes no stop strings: use stop_token_ids, or num_beams=1.",
            )

    def replace(self, **changes) -> SamplingParams:
        """A copy with some fields changed; the copy is validated like a new object."""
        return dataclasses.replace(self, **changes)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass
class TokenChoice:
    """One sampled position: the token, and (when asked for) raw log-probs of it and of the best alternatives."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, raw log-prob), most likely first


class Sampler:
    """Turns one sequence's logits into tokens, one step at a time.

    One per sequence: it owns the sequence's random generator (seeded from `params.seed`, else from the OS), so a
    seed reproduces the output whatever else runs in the same batch, and the sequence's token counts for the
    penalties. Those counts live on the logits' device as [V] tensors made at the first step and updated by one
    element per step, so a penalty costs a few elementwise ops per token and never rescans the history.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = ()):
        self.params = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self._repetition = params.repetition_penalty != 1.0
        self._counted = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        # the prompt only matters to the repetition penalty; kept as ids until the vocabulary size is known
        self._prompt_ids = [int(t) for t in prompt_ids] if self._repetition else []
        self._seen: torch.Tensor | None = None  # bool [V]: in the prompt or generated (repetition penalty)
        self._counts: torch.Tensor | None = None  # float32 [V]: times generated (presence / frequency)
        self.num_generated = 0

    # -- the public steps ----------------------------------------------------------------------------------------

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] -> the chosen token id (and the token is recorded for the penalties)."""
        return self.sample(logits).token_id

    @property
    def plain_greedy(self) -> bool:
        """Whether the choice is the logits' argmax as they are (temperature 0, no penalty): a batch of such
        sequences can take theirs in one argmax and one transfer (`sample`'s `argmax`)."""
        return self.params.temperature == 0 and not (self._repetition or self._counted)

    def sample(self, logits: torch.Tensor, argmax: int | None = None) -> TokenChoice:
        """logits [V] (any float dtype, any device) -> the chosen token, recorded in this sequence's history.
        argmax: the logits' argmax where the caller took it for a batch (used only when `plain_greedy`)."""
        logits = _as_vector(logits)
        p = self.params
        if self.plain_greedy:
            # plain greedy: argmax where the logits already are, one transfer of one integer (or the batch's)
            token = int(torch.argmax(logits)) if argmax is None else argmax
        else:
            x = self._processed(logits)
            greedy = p.temperature == 0
            token = int(torch.argmax(x)) if greedy else _draw(torch.softmax(x, dim=-1), self.generator)
        choice = TokenChoice(token)
        if p.logprobs:
            self._add_logprobs(choice, logits)
        self._record(token)
        return choice

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the choice is drawn from: float32 on the CPU, -inf where a filter removed the token.

        Greedy decoding (temperature 0) takes the argmax of these; only penalties apply then. Does not change the
        history: calling it is free of side effects.
        """
        return self._processed(_as_vector(logits)).cpu()

    # -- processing ----------------------------------------------------------------------------------------------

    def _processed(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties, temperature, min_p, top_k, top_p, in that order, on the logits' own device (float32).

        Steps whose parameter is neutral are skipped. The input is never modified.
        """
        p = self.params
        x = logits.float()
        if self._repetition or self._counted:
            x = self._penalised(x)
        if p.temperature == 0:
            # greedy: no temperature and no filters, since the argmax survives every one of them
            return x if x is not logits else x.clone()
        if p.temperature != 1.0:
            x = x / p.temperature
        if p.min_p > 0:
            # drop tokens less likely than min_p times the most likely one (the top token always stays)
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < p.min_p * probs.max(), -math.inf)
        vocab = x.shape[-1]
        if 0 < p.top_k < vocab:
            # keep the k largest; a tie with the k-th largest stays too
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, -math.inf)
        if p.top_p < 1.0:
            x = x.masked_fill(_top_p_drop(x, p.top_p), -math.inf)
        return x if x is not logits else x.clone()

    def _penalised(self, x: torch.Tensor) -> torch.Tensor:
        """Repetition penalty, then frequency and presence penalties (vLLM's order), on the raw logits."""
        p = self.params
        self._ensure_state(x.shape[-1], x.device)
        if self._repetition:
            # CTRL: make a seen token less likely whatever its sign: shrink positive logits, grow negative ones
            rp = p.repetition_penalty
            x = torch.where(self._seen, torch.where(x > 0, x / rp, x * rp), x)
        if self._counted:
            # OpenAI: logit -= presence * [count > 0] + frequency * count, over generated tokens only
            if p.frequency_penalty != 0.0:
                x = x - self._counts * p.frequency_penalty
            if p.presence_penalty != 0.0:
                x = x - (self._counts > 0).to(x.dtype) * p.presence_penalty
        return x

    def _ensure_state(self, vocab: int, device: torch.device) -> None:
        """Makes the [V] penalty tensors at the first step (when V is known), or moves them to a new device."""
        if self._repetition:
            if self._seen is None:
                self._seen = torch.zeros(vocab, dtype=torch.bool)
                # ids beyond the model's output vocabulary cannot be generated; they have nothing to penalise
                ids = [t for t in self._prompt_ids if 0 <= t < vocab]
                if ids:
                    self._seen[torch.tensor(ids, dtype=torch.long)] = True
                self._prompt_ids = []
            if self._seen.device != device:
                self._seen = self._seen.to(device)
        if self._counted:
            if self._counts is None:
                self._counts = torch.zeros(vocab, dtype=torch.float32)
            if self._counts.device != device:
                self._counts = self._counts.to(device)

    def _record(self, token: int) -> None:
        """Adds the chosen token to the history: one element per tensor, no rebuild."""
        self.num_generated += 1
        if self._seen is not None:
            self._seen[token] = True
        if self._counts is not None:
            self._counts[token] += 1

    def _add_logprobs(self, choice: TokenChoice, logits: torch.Tensor) -> None:
        """Raw log-probs: log_softmax of the model's logits, before penalties, temperature or filters."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        n = self.params.top_logprobs
        if n:
            best = torch.topk(logprobs, min(n, logprobs.shape[-1]))  # sorted, most likely first
            choice.top_logprobs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
        choice.logprob = float(logprobs[choice.token_id])


def batch_argmax(logits: torch.Tensor, plain: Sequence[bool]) -> dict[int, int]:
    """{row: its argmax} for the rows of logits [B, V] whose sequences choose by plain argmax (`plain[row]`:
    Sampler.plain_greedy), in one argmax and one transfer: a row at a time costs a launch and a synchronisation
    each (~45 us on an H200, 23 ms a step at 512 sequences). Empty for fewer than two such rows."""
    rows = [i for i, p in enumerate(plain) if p]
    if len(rows) < 2:
        return {}
    x = logits if len(rows) == logits.shape[0] else logits[rows]
    return dict(zip(rows, torch.argmax(x, dim=-1).tolist(), strict=True))


def _as_vector(logits: torch.Tensor) -> torch.Tensor:
    """Accepts [V] or [1, V]."""
    if logits.dim() == 2 and logits.shape[0] == 1:
        return logits[0]
    if logits.dim() != 1:
        raise ValueError(f"Sampler takes one position's logits, shape [V]; got shape {tuple(logits.shape)}")
    return logits


def _top_p_drop(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool mask over the logits x: the tokens that top_p (nucleus sampling) removes.

    Keeps the smallest set of most likely tokens whose probability reaches top_p, and always the most likely
    token: ranked by probability, a token stays when the tokens ranked above it hold less than top_p. This is
    transformers' set (it drops the least likely tokens while their total is at most 1 - top_p) up to rounding;
    of exactly tied tokens straddling the cut, which stay is unspecified there as here.

    Sorting a whole vocabulary costs ~10 ms on a CPU, so there only the most likely tokens are ranked: 256 at
    first, eight times more while those hold too little mass to decide. Other devices sort everything at once,
    which is cheap there and needs no host sync.
    """
    probs = torch.softmax(x, dim=-1)
    vocab = probs.shape[-1]
    k = min(vocab, 256) if x.device.type == "cpu" else vocab
    while True:
        if k == vocab:
            ranked, order = torch.sort(probs, descending=True)
        else:
            ranked, order = torch.topk(probs, k)  # most likely first
        above = torch.cumsum(ranked, dim=-1).roll(1)  # mass of the tokens ranked above each one
        above[0] = 0.0
        # enough ranked once the last of them is cut: every token after it is cut as well
        if k == vocab or bool(above[-1] >= top_p):
            break
        k = min(vocab, k * 8)
    drop = torch.ones_like(probs, dtype=torch.bool)  # tokens outside the ranked ones are cut
    return drop.scatter_(0, order, above >= top_p)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [V] by inverse transform: one uniform number and a running sum.

    This uses one random number per token (torch.multinomial draws V of them: ~3 ms for a 150k vocabulary on
    one CPU core) and runs on the probabilities' own device, with the uniform number from the sequence's own
    CPU generator. A token of probability 0 is never drawn: its running sum equals the one before it, and the
    search takes the first sum above the target. The CPU's cumsum adds in order, which keeps that so; a
    parallel scan elsewhere may round neighbouring sums differently, so there the sum is made to rise only at
    tokens with probability above 0.
    """
    running = torch.cumsum(probs, dim=-1)
    if probs.device.type != "cpu":
        running = torch.where(probs > 0, running, 0.0).cummax(dim=-1).values
    total = running[-1:]
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    # the first token whose running sum exceeds u * total; the target is kept strictly below the total
    target = torch.minimum(total * u, torch.nextafter(total, torch.zeros_like(total)))
    return int(torch.searchsorted(running, target, right=True))
