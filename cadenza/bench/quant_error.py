"""The output error of quantized experts against bf16 on a synthetic model (D3 / D4 report it next to speed).

Both copies of the model cut to its first few layers (full width) sit wholly on the GPU, so the only difference
is the experts' format: the relative error of the logits of one prompt (||q - ref|| / ||ref|| over all positions)
and how often the top-1 token agrees. Random weights are less forgiving than trained ones (no outliers for
per-group scales to follow, but no redundancy either): the numbers are indicative, not a model-quality claim.
"""

from __future__ import annotations

import gc

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
    }
