"""`cadenza perplexity`: a model's perplexity over a text file, and how far quantized experts move its predictions.

The text is scored in windows of --context tokens, --stride tokens apart (the usual strided perplexity: each token
counts once, in the first window that scores it with the most context; a window's first token has no context
inside it and is scored by an earlier window or not at all). Everything comes from the engine's teacher-forced
logits (`LLM.score`) in float32. Against a baseline (the same model with bf16 experts, loaded a second time by
--baseline, or the log-probs an earlier run saved with --save-logits, read by --kl-from) it reports what llama.cpp's
`llama-perplexity --kl-divergence` does: the KL divergence KL(baseline || this run) per token (mean, its standard
error and spread) and how often both agree on the most likely token.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from cadenza.cli.flags import add_command, add_engine_args, load
from cadenza.errors import CadenzaError

MAGIC = b"cadenza-logprobs 1\n"  # --save-logits: this line, a JSON header line, then float32 [tokens, vocab]
DEFAULT_CONTEXT = 512  # llama.cpp's default window


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "perplexity",
        help="perplexity over a text file; KL divergence of quantized experts from bf16",
        description="Scores a text file with the model in sliding windows and prints its perplexity. With "
        "--baseline (or --kl-from a file saved by --save-logits) it also reports the KL divergence from the bf16 "
        "experts' predictions and how often the two agree on the most likely token, as llama-perplexity does.",
        examples=[
            "# perplexity of int4 experts over a text, in windows of 1024 tokens moved by 512",
            "cadenza perplexity -m Qwen/Qwen3-30B-A3B --experts int4 --file wiki.test.raw --context 1024 --stride 512",
            "# how far int4 experts are from bf16: the baseline saved once, then compared against",
            "cadenza perplexity -m DIR --experts bf16 --file wiki.txt --save-logits base.bin && "
            "cadenza perplexity -m DIR --experts int4 --file wiki.txt --kl-from base.bin --json",
        ],
    )
    add_engine_args(p)
    p.add_argument("--file", "-f", required=True, help="the text file to score (UTF-8)")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help=f"tokens per window (default {DEFAULT_CONTEXT}, at most the model's context)",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        metavar="S",
        help="tokens from one window's start to the next (default: half of --context; --context: windows do not "
        "overlap, and each window's first token goes unscored)",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="load the model a second time with bf16 experts (the other flags kept) and compare this run to it: "
        "KL divergence and top-1 agreement",
    )
    p.add_argument(
        "--save-logits",
        default=None,
        metavar="FILE",
        help="save this run's log-probs of every scored token (float32, tokens x vocabulary: large) for --kl-from",
    )
    p.add_argument("--kl-from", default=None, metavar="FILE", help="compare to the log-probs a --save-logits run saved")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)
    return p


# --- windows and statistics ------------------------------------------------------------------------------------


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window over n tokens: the window holds tokens [begin, end) and scores tokens
    [first, end), those no earlier window scored (a window cannot score its own first token)."""
    out, scored_to = [], 1  # token 0 has nothing before it
    begin = 0
    while True:
        end = min(begin + context, n)
        first = max(scored_to, begin + 1)
        if first < end:
            out.append((begin, end, first))
        scored_to = max(scored_to, end)
        if end >= n:
            return out
        begin += stride


def mean_and_stderr(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard error of the mean and standard deviation."""
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n), math.sqrt(var)


def quantile(sorted_values: list[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


# --- saved log-probs -------------------------------------------------------------------------------------------


class LogprobWriter:
    """Writes the scored tokens' float32 log-probs row by row after a header (no copy of them in memory)."""

    def __init__(self, path: Path, header: dict):
        self.file = open(path, "wb")  # noqa: SIM115  (closed by close())
        self.file.write(MAGIC + json.dumps(header).encode() + b"\n")

    def write(self, logprobs) -> None:
        self.file.write(logprobs.float().contiguous().numpy().astype("<f4", copy=False).tobytes())

    def close(self) -> None:
        self.file.close()


def read_logprobs(path: Path):
    """(header, memmap [tokens, vocab]) of a --save-logits file; a clear error for anything else."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            magic = f.readline()
            line = f.readline()
    except OSError as e:
        raise CadenzaError(f"Cannot read the saved log-probs {str(path)!r} (--kl-from): {e.strerror}.") from None
    try:
        header = json.loads(line) if magic == MAGIC else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or "tokens" not in header or "vocab" not in header:
        raise CadenzaError(
            f"{str(path)!r} (--kl-from) is not a file written by `cadenza perplexity --save-logits`. Save the "
            "baseline's log-probs with --save-logits FILE first."
        )
    shape = (len(header["tokens"]), header["vocab"])
    offset = len(magic) + len(line)
    if path.stat().st_size != offset + 4 * shape[0] * shape[1]:
        raise CadenzaError(f"{str(path)!r} (--kl-from) is truncated: the run that saved it did not finish.")
    return header, np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=shape)


# --- the command -----------------------------------------------------------------------------------------------


def _text(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CadenzaError(f"The text file {path!r} (--file) does not exist.") from None
    except IsADirectoryError:
        raise CadenzaError(f"{path!r} (--file) is a folder; give a text file.") from None
    except UnicodeDecodeError as e:
        raise CadenzaError(f"{path!r} (--file) is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    except OSError as e:
        raise CadenzaError(f"Cannot read {path!r} (--file): {e.strerror}.") from None
    if not text.strip():
        raise CadenzaError(f"{path!r} (--file) holds no text to score. Give a file with some text.")
    return text


def _check_flags(args: argparse.Namespace) -> None:
    if args.context is not None and args.context < 2:
        raise CadenzaError(f"--context {args.context} is too short. Use at least 2 tokens (default {DEFAULT_CONTEXT}).")
    if args.stride is not None and args.stride < 1:
        raise CadenzaError(f"--stride {args.stride} is not valid. Use a whole number of at least 1.")
    if args.stride is not None and args.context is not None and args.stride > args.context:
        raise CadenzaError(
            f"--stride {args.stride} is longer than --context {args.context}: tokens between windows would go "
            "unscored. Use a stride of at most the context."
        )
    if args.baseline and args.kl_from is not None:
        raise CadenzaError("--baseline and --kl-from both name a baseline. Use one of them.")
    if args.kl_from is not None and not Path(args.kl_from).is_file():
        raise CadenzaError(f"The saved log-probs {args.kl_from!r} (--kl-from) do not exist.")
    if args.experts == "bf16" and args.baseline:
        raise CadenzaError(
            "--baseline compares to bf16 experts, and this run's experts are bf16 already. Pass --experts int8 or "
            "int4 (or a GGUF's own blocks) to see what quantization changes."
        )


class Progress:
    """Windows scored: a tqdm bar on a terminal (cadenza.moe.quantize.Progress); nothing when stderr is piped."""

    def __init__(self, label: str, total: int):
        from cadenza.moe.quantize import Progress as Bar

        self.bar = Bar(label, total, after_s=0.0, stream=sys.stderr, unit="window", terminal_only=True)
        self.done = 0

    def step(self) -> None:
        self.done += 1
        self.bar.update(self.done)

    def close(self) -> None:
        pass  # the bar ends with its last window


def score_text(llm, ids: list[int], spans, label: str, writer: LogprobWriter | None = None, baseline=None):
    """Scores every window: per scored token its negative log-likelihood, and against `baseline` (a callable
    giving the baseline's log-probs [k, vocab] of tokens [a, b) of the scored ones) its KL divergence and whether
    both pick the same most likely token."""
    import torch

    from cadenza.scoring import kl_and_agreement

    nll, kl, same = [], [], []
    done = 0
    progress = Progress(label, len(spans))
    try:
        for begin, end, first in spans:
            logits = llm.score(ids[begin:end])  # float32 [end - begin, vocab]; row i predicts token begin + i + 1
            logprobs = torch.log_softmax(logits[first - begin - 1 : end - begin - 1].float(), dim=-1)
            targets = torch.tensor(ids[first:end], dtype=torch.long)
            nll.extend((-logprobs.gather(1, targets[:, None])[:, 0]).double().tolist())
            if writer is not None:
                writer.write(logprobs)
            if baseline is not None:
                base = baseline(done, done + len(targets))
                if base.shape != logprobs.shape:
                    raise CadenzaError(
                        f"The baseline's log-probs have {base.shape[-1]} entries per token and this model's "
                        f"{logprobs.shape[-1]}: they come from different models."
                    )
                k, s = kl_and_agreement(base, logprobs)
                kl.extend(k)
                same.extend(s)
            done += len(targets)
            progress.step()
    finally:
        progress.close()
    return nll, kl, same


def _summary(nll: list[float]) -> dict:
    mean, stderr, _ = mean_and_stderr(nll)
    ppl = math.exp(mean)
    return {"perplexity": ppl, "perplexity_error": ppl * stderr, "nll": mean, "nll_stderr": stderr}


def _baseline_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "experts": "bf16", "expert_group": None})


def run(args: argparse.Namespace) -> int:
    import gc
    import tempfile

    import torch

    _check_flags(args)
    text = _text(args.file)
    # with --baseline the bf16 model loads first (it settles the tokens and windows as well as this run would)
    llm = load(_baseline_args(args) if args.baseline else args)
    if llm.tokenizer is None:
        raise CadenzaError("This model has no tokenizer, so it cannot read a text file.")
    ids = llm.tokenizer.encode(text)
    context = args.context or min(DEFAULT_CONTEXT, llm.max_context)
    if context > llm.max_context:
        raise CadenzaError(
            f"--context {context} is longer than the model's context of {llm.max_context} tokens "
            f"({llm.context_source}). Use a shorter --context, or raise --max-context."
        )
    stride = args.stride or max(1, context // 2)
    if stride > context:
        raise CadenzaError(f"--stride {stride} is longer than the context of {context} tokens. Use at most {context}.")
    if len(ids) < 2:
        raise CadenzaError(f"{args.file!r} (--file) is {len(ids)} token long: perplexity needs at least 2 tokens.")
    spans = windows(len(ids), context, stride)
    targets = [t for _, end, first in spans for t in ids[first:end]]
    header = {
        "model": str(llm.checkpoint.path),
        "context": context,
        "stride": stride,
        "vocab": llm.config.vocab_size,
        "tokens": targets,
    }
    result = {"model": str(llm.checkpoint.path), "file": args.file}
    result |= {"context": context, "stride": stride, "windows": len(spans), "tokens": len(targets)}

    baseline = None
    temp = None
    if args.baseline:  # scored into a temporary file, then unloaded before this run's model loads
        temp = tempfile.NamedTemporaryFile(prefix="cadenza-baseline-", suffix=".bin", delete=False)  # noqa: SIM115
        temp.close()
        writer = LogprobWriter(Path(temp.name), {**header, "experts": "bf16"})
        try:
            base_nll, _, _ = score_text(llm, ids, spans, "baseline (bf16 experts)", writer)
        except BaseException:
            Path(temp.name).unlink(missing_ok=True)
            raise
        finally:
            writer.close()
        result["baseline"] = {"experts": "bf16", **_summary(base_nll)}
        llm.close()
        del llm
        gc.collect()
        llm = load(args)
    header["experts"] = result["experts"] = llm.expert_format.describe()
    if temp is not None or args.kl_from is not None:
        saved_path = Path(temp.name) if temp is not None else Path(args.kl_from)
        saved_header, saved = read_logprobs(saved_path)
        same = (saved_header.get("context"), saved_header.get("stride")) == (context, stride)
        if not same or saved_header["tokens"] != targets:
            raise CadenzaError(
                f"{args.kl_from!r} (--kl-from) scored other tokens ({len(saved_header['tokens'])} of them, context "
                f"{saved_header.get('context')}, stride {saved_header.get('stride')}) than this run ({len(targets)}, "
                f"context {context}, stride {stride}). Use the same --file, --context and --stride, and the same model."
            )
        if args.kl_from is not None:
            result["baseline"] = {"file": args.kl_from, "experts": saved_header.get("experts")}

        def baseline(a: int, b: int):
            return torch.from_numpy(saved[a:b].copy())

    writer = LogprobWriter(Path(args.save_logits), header) if args.save_logits else None
    try:
        nll, kl, same = score_text(llm, ids, spans, "scoring", writer, baseline)
    finally:
        if writer is not None:
            writer.close()
        if temp is not None:
            Path(temp.name).unlink(missing_ok=True)
    result |= _summary(nll)
    if baseline is not None:
        mean, stderr, std = mean_and_stderr(kl)
        ordered = sorted(kl)
        result["kl_divergence"] = {
            "mean": mean,
            "stderr": stderr,
            "std": std,
            "median": quantile(ordered, 0.5),
            "p99": quantile(ordered, 0.99),
            "max": ordered[-1],
        }
        agree, agree_err, _ = mean_and_stderr([float(s) for s in same])
        result["top1_agreement"] = {"percent": 100 * agree, "stderr": 100 * agree_err}
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    print(
        f"perplexity {result['perplexity']:.4f} ± {result['perplexity_error']:.4f} over {len(targets)} tokens "
        f"({len(spans)} windows of {context} tokens, stride {stride}; experts {result['experts']})"
    )
    if "baseline" in result:
        base = result["baseline"]
        if "perplexity" in base:
            print(f"baseline (bf16 experts): perplexity {base['perplexity']:.4f} ± {base['perplexity_error']:.4f}")
        else:
            print(f"baseline: {base['file']} (experts {base['experts']})")
        k = result["kl_divergence"]
        print(
            f"KL divergence: mean {k['mean']:.6f} ± {k['stderr']:.6f} (std {k['std']:.6f}, median {k['median']:.6f}, "
            f"99% {k['p99']:.6f}, max {k['max']:.6f})"
        )
        t = result["top1_agreement"]
        print(f"top-1 agreement: {t['percent']:.2f}% ± {t['stderr']:.2f}%")
    return 0
