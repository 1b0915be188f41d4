"""llama.cpp's `llama-bench`: its command line, a run with a timeout, its JSON and its buffer-size log lines.

Flags (tools/llama-bench/llama-bench.cpp of the llama.cpp in ../shared/peers): `-m` model, `-ngl` layers on the GPU,
`--n-cpu-moe N` (the experts of the first N layers stay in host memory), `-t` threads, `-p` prompt tokens (a
"pp" test: one batch of random ids), `-n` generated tokens (a "tg" test: one token at a time), `-d` depth (a context
of that many tokens processed before the timed part, not timed), `-r` repetitions (after one warm-up run of the
same test), `-o json`, `-v` (its log on stderr, which is where the buffer sizes are; without -v llama-bench
silences llama.cpp's log). Each (p, n, d) is its own test with its own context of p + n + d tokens.

Its JSON printer writes a list of objects, one per test, with every field of `test::get_fields()` (strings quoted,
booleans true/false, numbers bare: avg_ts with printf's %f, samples with C++ stream precision) and then
`samples_ns` and `samples_ts`, one entry per repetition: ts = (n_prompt + n_gen) / seconds.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cadenza import foreign_environment
from cadenza.errors import CadenzaError

STDERR_TAIL_LINES = 25


@dataclass(frozen=True)
class BenchTest:
    """One llama-bench test: `prompt` tokens in one batch, or `gen` tokens one by one after `depth` tokens."""

    prompt: int
    gen: int
    depth: int

    @property
    def n_ctx(self) -> int:
        return self.prompt + self.gen + self.depth  # llama-bench's context size for the test

    @property
    def label(self) -> str:  # llama-bench's own naming: pp512, tg128 @ d64
        name = f"pp{self.prompt}" if self.prompt else f"tg{self.gen}"
        return f"{name} @ d{self.depth}" if self.depth else name


def bench_command(
    binary: str | Path,
    model: str | Path,
    test: BenchTest,
    n_cpu_moe: int,
    threads: int,
    repetitions: int,
    verbose: bool = False,
) -> list[str]:
    """The llama-bench argv measuring `test` with every layer on the GPU but the first `n_cpu_moe` layers' experts."""
    argv = [str(binary), "-m", str(model), "-ngl", "99", "--n-cpu-moe", str(n_cpu_moe), "-t", str(threads)]
    argv += ["-p", str(test.prompt), "-n", str(test.gen), "-d", str(test.depth), "-r", str(repetitions), "-o", "json"]
    if verbose:
        # a run for the log only: one repetition, no warm-up
        argv += ["--no-warmup", "-v"]
    return argv


@dataclass(frozen=True)
class BenchRun:
    command: str
    stdout: str
    stderr: str
    seconds: float


def run_llama_bench(argv: list[str], timeout_s: float) -> BenchRun:
    """Runs llama-bench (or another llama.cpp tool) in the environment cadenza was started with, less what cadenza set
    for itself (`cadenza.foreign_environment`: the peer runs as its users run it); a failure (exit status, timeout,
    no such binary) is a CadenzaError with its stderr's end."""
    import time

    command = shlex.join(argv)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, check=False, env=foreign_environment()
        )
    except subprocess.TimeoutExpired as e:
        raise CadenzaError(
            f"llama-bench ran past {timeout_s:.0f} s and was stopped: {command}\n{stderr_tail(_text(e.stderr))}"
        ) from e
    except OSError as e:
        raise CadenzaError(f"llama-bench could not start ({e}): {command}") from e
    if p.returncode != 0:
        raise CadenzaError(f"llama-bench failed (exit status {p.returncode}): {command}\n{stderr_tail(p.stderr)}")
    return BenchRun(command, p.stdout, p.stderr, round(time.perf_counter() - t0, 2))


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else b or ""


def stderr_tail(stderr: str, lines: int = STDERR_TAIL_LINES) -> str:
    tail = [line for line in stderr.splitlines() if line.strip()][-lines:]
    return "its stderr ended with:\n  " + "\n  ".join(tail) if tail else "it wrote nothing to stderr."


def parse_bench_json(stdout: str) -> list[dict]:
    """llama-bench's `-o json` output: one dict per test, with `samples_ns` and `samples_ts` lists."""
    try:
        tests = json.loads(stdout)
    except json.JSONDecodeError as e:
        raise CadenzaError(f"llama-bench's output is not the JSON of -o json ({e}); it began: {stdout[:300]!r}") from e
    need = {"n_prompt", "n_gen", "n_depth", "samples_ns", "samples_ts"}
    if not isinstance(tests, list) or not all(isinstance(t, dict) and need <= t.keys() for t in tests):
        raise CadenzaError(f"llama-bench's JSON is not a list of tests with {', '.join(sorted(need))}.")
    return tests


def find_test(tests: list[dict], test: BenchTest) -> dict:
    for t in tests:
        if (t["n_prompt"], t["n_gen"], t["n_depth"]) == (test.prompt, test.gen, test.depth):
            return t
    raise CadenzaError(f"llama-bench's JSON has no {test.label} test (it has {len(tests)} others).")


# "load_tensors:        CUDA0 model buffer size = 21234.56 MiB", "llama_kv_cache:      CUDA0 KV buffer size = ...",
# "llama_context:      CUDA0 compute buffer size = ...", "llama_context:  CUDA_Host  output buffer size = ..."
_BUFFER_LINE = re.compile(
    r"(?P<buffer>[A-Za-z][\w-]*)\s+(?P<kind>model|KV|compute|output|RS)\s+buffer size\s*=\s*"
    r"(?P<mib>\d+(?:\.\d*)?)\s*MiB"
)
# device buffers (CUDA0, ROCm1, ...); CUDA_Host and CPU_* buffers are host memory
_DEVICE_BUFFER = re.compile(r"(CUDA|ROCm|MUSA|SYCL|Vulkan|Metal)\d*")


def parse_buffer_sizes(stderr: str) -> dict[str, dict[str, float]]:
    """{kind: {buffer name: MiB}} from llama.cpp's log. A model prints one line per weight buffer (summed); each
    context prints its KV, output and compute buffers (the largest of the contexts is kept)."""
    out: dict[str, dict[str, float]] = {}
    for m in _BUFFER_LINE.finditer(stderr):
        kind, name, mib = m["kind"], m["buffer"], float(m["mib"])
        per = out.setdefault(kind, {})
        per[name] = per.get(name, 0.0) + mib if kind == "model" else max(per.get(name, 0.0), mib)
    return out


def device_mib(sizes: dict[str, dict[str, float]]) -> dict[str, float]:
    """MiB on the GPU(s) per kind (model, KV, compute, ...) and in total."""
    per_kind = {
        kind: round(sum(mib for name, mib in bufs.items() if _DEVICE_BUFFER.fullmatch(name)), 2)
        for kind, bufs in sizes.items()
    }
    return {**per_kind, "total": round(sum(per_kind.values()), 2)}
