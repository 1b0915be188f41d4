"""The output error of quantized experts against bf16 on a synthetic model (D3 / D4 report it next to speed).

Both copies of the model cut to its first few layers (full width) sit wholly on the GPU, so the only difference
is the experts' format: the relative error of the logits of one prompt (||q - ref|| / ||ref|| over all positions),
how often the top-1 token agrees, and what `cadenza perplexity --baseline` reports for the prompt's tokens (each
copy's perplexity, the KL divergence from the bf16 copy per position: mean, median, p99, max; one code path,
cadenza.scoring.kl_and_agreement). Random weights are less forgiving than trained ones (no outliers for
per-group scales to follow, but no redundancy either): the numbers are indicative, not a model-quality claim.
"""

from __future__ import annotations

import gc
import math

import torch

from cadenza.bench.synthetic import SyntheticCheckpoint

PROMPT_TOKENS = 128


def quantization_error(
    model: str, fmt: str, device: torch.device, seed: int = 0, layers: int = 4, group: int | None = None
) -> dict:
    from cadenza.bench.scenarios import random_prompt
    from cadenza.llm import LLM

    ckpt = SyntheticCheckpoint(model, seed=seed, layers=layers)
    prompt = random_prompt(PROMPT_TOKENS, ckpt.config["vocab_size"], seed)
    kw = dict(checkpoint=ckpt, device=str(device), max_context=PROMPT_TOKENS + 1)  # everything on the device
    ref = LLM(**kw)
    want = ref.score(prompt).float().cpu()
    ref.close()
    del ref
    quant = LLM(**kw, experts=fmt, expert_group=group)
    got = quant.score(prompt).float().cpu()
    quant.close()
    del quant
    ckpt.release()
    gc.collect()  # (an LLM's engine and graphs hold each other: collect now, not at some later allocation)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "format": fmt,
        "group": group,
        "model": ckpt.name,
        "prompt_tokens": PROMPT_TOKENS,
        "relative_logit_error": round(((got - want).norm() / want.norm()).item(), 5),
        "top1_agreement": round((got.argmax(-1) == want.argmax(-1)).float().mean().item(), 4),
        **perplexity_comparison(want, got, prompt),
    }


def perplexity_comparison(want: torch.Tensor, got: torch.Tensor, prompt: list[int]) -> dict:
    """What `cadenza perplexity --baseline` reports, for teacher-forced logits [n, V] of `prompt` (row i predicts
    token i + 1) from the bf16 copy (`want`) and the quantized one (`got`)."""
    from cadenza.cli.perplexity import mean_and_stderr, quantile
    from cadenza.scoring import kl_and_agreement

    base, this = (torch.log_softmax(t[:-1].float(), dim=-1) for t in (want, got))
    targets = torch.tensor(prompt[1:], dtype=torch.long)[:, None]
    ppl = {name: math.exp(-lp.gather(1, targets).double().mean().item()) for name, lp in (("bf16", base), ("q", this))}
    kl, _ = kl_and_agreement(base, this)
    ordered = sorted(kl)
    return {
        "perplexity": round(ppl["q"], 4),
        "baseline_perplexity": round(ppl["bf16"], 4),
        "kl_divergence": {
            "mean": round(mean_and_stderr(kl)[0], 6),
            "median": round(quantile(ordered, 0.5), 6),
            "p99": round(quantile(ordered, 0.99), 6),
            "max": round(ordered[-1], 6),
        },
    }
