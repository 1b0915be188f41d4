"""Offline batch jobs (`cadenza batch`): a JSONL file of requests in, a JSONL file of results out, in input order.

- `read_requests` parses and checks every input line before any work, and reports all bad lines at once;
- `resume_point` checks what an existing output file already holds (a resumed job runs only the rest);
- `run_job` runs the rest through `LLM.generate_iter` and writes each result as soon as it and all earlier ones
  are done: whole lines, one write each, so an interrupted job leaves a valid file to resume from.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cadenza.errors import CadenzaError
from cadenza.sampling import SamplingParams

PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")
OVERRIDES = ("max_tokens", "temperature", "top_p", "seed", "stop")  # per-line sampling settings
FIELDS = (*PROMPT_FIELDS, "id", "metadata", *OVERRIDES)
MAX_REPORTED = 20  # bad lines listed in one error


@dataclass
class JobRequest:
    """One input line: where it is (1-based line number), its id, its prompt and its sampling overrides."""

    line: int
    id: str | int
    kind: str  # one of PROMPT_FIELDS
    prompt: str | list
    overrides: dict = field(default_factory=dict)
    metadata: object = None


class BadLines(CadenzaError):
    """Input lines that cannot run: every problem, with its line number."""

    def __init__(self, path: str | Path, problems: list[tuple[int, str]], total: int | None = None):
        total = len(problems) if total is None else total
        shown = "\n".join(f"  line {n}: {why}" for n, why in problems[:MAX_REPORTED])
        more = f"\n  ... and {total - MAX_REPORTED} more" if total > MAX_REPORTED else ""
        lines = "line" if total == 1 else "lines"
        super().__init__(
            f'{path}: {total} bad input {lines}; nothing was run. Each line is one JSON object with "prompt" '
            '(text), "messages" (a chat) or "prompt_token_ids" (ints); optional "id", "metadata" and '
            f"{', '.join(OVERRIDES)}.\n{shown}{more}"
        )
        self.problems = problems


def read_requests(path: str | Path) -> list[JobRequest]:
    """Every request of a JSONL file (blank lines skipped), or BadLines naming each bad line."""
    requests, problems = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for n, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    requests.append(parse_line(n, text))
                except CadenzaError as e:
                    problems.append((n, str(e)))
    except FileNotFoundError:
        raise CadenzaError(f"--prompts {path}: no such file. Pass a JSONL file, one request per line.") from None
    except UnicodeDecodeError as e:
        raise CadenzaError(f"--prompts {path} is not UTF-8 text ({e.reason}). Save it as UTF-8 JSONL.") from None
    if problems:
        raise BadLines(path, problems)
    if not requests:
        raise CadenzaError(
            f'--prompts {path} holds no requests. Write one JSON object per line, e.g. {{"prompt": "Hi"}}.'
        )
    ids: dict = {}
    for r in requests:
        key = json.dumps(r.id)
        if key in ids:
            problems.append((r.line, f"id {key} is also the id of line {ids[key]}; ids must be unique"))
        ids.setdefault(key, r.line)
    if problems:
        raise BadLines(path, problems)
    return requests


def parse_line(n: int, text: str) -> JobRequest:
    """One input line -> its JobRequest; a CadenzaError says what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CadenzaError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise CadenzaError(f"a JSON {type(obj).__name__}, not an object")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise CadenzaError(
            f"unknown field {', '.join(map(repr, unknown))} (known: {', '.join(FIELDS)}; put extra data under "
            '"metadata", which is copied to the output)'
        )
    kinds = [k for k in PROMPT_FIELDS if k in obj]
    if len(kinds) != 1:
        raise CadenzaError(
            'no prompt: give one of "prompt", "messages" or "prompt_token_ids"'
            if not kinds
            else f"{' and '.join(map(repr, kinds))} given: give only one prompt field"
        )
    kind, prompt = kinds[0], obj[kinds[0]]
    if kind == "prompt" and (not isinstance(prompt, str) or not prompt):
        raise CadenzaError(f'"prompt" must be non-empty text, not {_short(prompt)}')
    if kind == "prompt_token_ids" and (
        not isinstance(prompt, list) or not prompt or not all(type(t) is int and t >= 0 for t in prompt)
    ):
        raise CadenzaError(
            f'"prompt_token_ids" must be a non-empty list of token ids (ints >= 0), not {_short(prompt)}'
        )
    if kind == "messages":
        _check_messages(prompt)
    rid = obj.get("id", n)
    if type(rid) not in (str, int):
        raise CadenzaError(f'"id" must be text or a whole number, not {_short(rid)}')
    overrides = {k: obj[k] for k in OVERRIDES if k in obj}
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = [overrides["stop"]]
    if "max_tokens" in overrides and type(overrides["max_tokens"]) is not int:
        raise CadenzaError(f'"max_tokens" must be a whole number, not {_short(overrides["max_tokens"])}')
    try:
        SamplingParams(**overrides)  # its checks, before any work
    except (CadenzaError, TypeError) as e:
        raise CadenzaError(str(e).removeprefix("Invalid sampling parameter: ")) from None
    return JobRequest(n, rid, kind, prompt, overrides, obj.get("metadata"))


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise CadenzaError(
            f'"messages" must be a non-empty list of {{"role": ..., "content": ...}}, not {_short(messages)}'
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise CadenzaError(f'messages[{i}] must be {{"role": TEXT, "content": TEXT}}, not {_short(m)}')


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def resume_point(out: str | Path, requests: list[JobRequest], overwrite: bool) -> int:
    """How many requests `out` already holds results for (0 when it is new, empty or overwritten). Its lines must
    be results of the first requests, in order (else a CadenzaError); an incomplete last line (a job killed in the
    middle of a write) is cut off."""
    path = Path(out)
    if not path.parent.is_dir():
        raise CadenzaError(f"--out {out}: the folder {path.parent} does not exist. Create it, or pass another --out.")
    if path.is_dir():
        raise CadenzaError(f"--out {out} is a folder. Pass a file name, e.g. {path / 'results.jsonl'}.")
    if overwrite or not path.exists():
        return 0  # the file is created (or emptied) when the first result is written
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    lines = whole.decode("utf-8", errors="replace").splitlines()
    if len(lines) > len(requests):
        _mismatch(out, f"holds {len(lines)} results but --prompts has only {len(requests)} requests")
    for i, text in enumerate(lines):
        try:
            done_id = json.loads(text)["id"]
        except (json.JSONDecodeError, TypeError, KeyError):
            _mismatch(out, f"line {i + 1} is not a result line of `cadenza batch`")
        if done_id != requests[i].id:
            _mismatch(
                out,
                f"line {i + 1} is the result of id {json.dumps(done_id)}, but request {i + 1} of --prompts (line "
                f"{requests[i].line}) has id {json.dumps(requests[i].id)}",
            )
    return len(lines)


def _mismatch(out, why: str):
    raise CadenzaError(
        f"--out {out} exists and {why}: it is not a partial result of these prompts. Pass another --out, or add "
        "--overwrite to replace it."
    )


@dataclass
class JobStats:
    total: int = 0  # requests in the input
    skipped: int = 0  # already in the output file
    prompts: int = 0  # run now
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    written: int = 0  # results of this run in the output file (less than `prompts` when interrupted)

    @property
    def tok_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "total": self.total, "skipped": self.skipped, "prompts": self.prompts,
            "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
            "seconds": round(self.seconds, 3), "tok_s": round(self.tok_s, 3),
        }  # fmt: skip

    def summary(self) -> str:
        before = f"; {self.skipped} done before" if self.skipped else ""
        return (
            f"batch: {self.prompts} prompts, {self.generated_tokens} tokens generated in {self.seconds:.1f} s: "
            f"{self.tok_s:.1f} tok/s (prompts {self.prompt_tokens} tokens{before})"
        )


class JobProgress:
    """Prompts done of the total, generated tok/s and the ETA: a tqdm bar on a terminal, else a log line at most
    every `every_s` seconds (a short job prints none)."""

    def __init__(self, total: int, done: int, stream=None, every_s: float = 30.0):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.start_done = total, done, done
        self.every_s = every_s
        self.start = self.last = time.perf_counter()
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from cadenza.log import terminal_bar

            self.bar = terminal_bar(self.stream, total, "cadenza: batch", " prompts", initial=done, smoothing=0.1)

    def update(self, tokens: int) -> None:
        """One more prompt done; `tokens` generated so far by this run."""
        self.done += 1
        now = time.perf_counter()
        rate = tokens / (now - self.start) if now > self.start else 0.0
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            self.bar.update(1)
            return
        if now - self.last < self.every_s or self.done >= self.total:
            return
        self.last = now
        ran = self.done - self.start_done
        eta = (self.total - self.done) * (now - self.start) / ran
        self.stream.write(
            f"cadenza: batch: {self.done}/{self.total} prompts, {rate:.1f} tok/s, about {_duration(eta)} left\n"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(s: float) -> str:
    if s < 90:
        return f"{math.ceil(s)} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def result_line(request: JobRequest, result) -> dict:
    out = {
        "id": request.id,
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "prompt_tokens": len(result.prompt_token_ids),
        "completion_tokens": len(result.token_ids),
    }
    if request.metadata is not None:
        out["metadata"] = request.metadata
    return out


def prompt_ids(llm, request: JobRequest) -> list[int]:
    """The request's prompt as token ids: text encoded, a chat rendered with the checkpoint's chat template."""
    if request.kind == "messages":
        return llm.chat_prompt(request.prompt)
    if request.kind == "prompt":
        if llm.tokenizer is None:
            raise CadenzaError('this model has no tokenizer: give "prompt_token_ids"')
        return llm.tokenizer.encode(request.prompt)
    return list(request.prompt)


def check_prompts(llm, path, requests: list[JobRequest]) -> None:
    """Tokenizes every request (the ids are not kept) and refuses, with line numbers, those the model cannot run:
    a chat without a chat template, prompts too long for the context, ids outside the vocabulary."""
    problems = []
    for r in requests:
        try:
            llm.engine.check_prompt(prompt_ids(llm, r))
        except CadenzaError as e:
            problems.append((r.line, str(e)))
    if problems:
        raise BadLines(path, problems)


def run_job(
    llm,
    requests: list[JobRequest],
    out: str | Path,
    base: SamplingParams,
    skip: int,
    max_batch: int,
    sort_window: int,
    stats: JobStats,
    progress: JobProgress | None = None,
    on_result: Callable[[int, dict], None] | None = None,
) -> JobStats:
    """Runs requests[skip:] and appends their results to `out` in input order (out-of-order finishers wait in a
    buffer of at most max_batch + sort_window lines). Each line is written whole, in one write, as soon as it
    and all earlier ones are done. `stats` is filled as it goes (so an interrupted job still reports it)."""
    import dataclasses

    todo = requests[skip:]

    def prompts() -> Iterator[list[int]]:
        for r in todo:
            yield prompt_ids(llm, r)

    def params() -> Iterator[SamplingParams]:
        for r in todo:
            yield dataclasses.replace(base, **r.overrides) if r.overrides else base

    held: dict[int, bytes] = {}
    following = 0
    start = time.perf_counter()
    # nothing to keep when skip is 0: a new file, an empty one, or --overwrite
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if skip == 0 else 0), 0o644)
    try:
        for i, result in llm.generate_iter(prompts(), params(), max_batch=max_batch, sort_window=sort_window):
            line = result_line(todo[i], result)
            held[i] = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
            stats.prompts += 1
            stats.prompt_tokens += line["prompt_tokens"]
            stats.generated_tokens += line["completion_tokens"]
            while following in held:
                _write_all(fd, held.pop(following))
                following += 1
            if on_result is not None:
                on_result(skip + i, line)
            if progress is not None:
                progress.update(stats.generated_tokens)
    finally:
        os.close(fd)
        stats.seconds = time.perf_counter() - start
        stats.written = following
    return stats


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]
