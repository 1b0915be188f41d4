"""The built-in demo model: a small Mixtral-shaped MoE with random weights, written once as a real checkpoint
folder (config.json, model.safetensors, tokenizer files) so `cadenza run` with no --model exercises the same
loader, tokenizer and engine as a downloaded model. Its text is gibberish: the weights are random."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from cadenza.paths import demo_dir
from cadenza.text import Tokenizer, write_byte_level_tokenizer

DEMO_NAME = "demo-mixtral-v1"
DEMO_LABEL = "built-in demo model (tiny Mixtral-shaped MoE, random weights: the text is gibberish)"


def demo_config(vocab_size: int, bos: int | None, eos: list[int]) -> dict:
    """mixtral-tiny's shapes (the bench's CPU model) with the byte-level tokenizer's vocabulary, in fp32."""
    from cadenza.bench.synthetic import SYNTHETIC_MODELS

    return {
        **SYNTHETIC_MODELS["mixtral-tiny"],
        "vocab_size": vocab_size,
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos[0] if eos else None,
    }


def demo_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * shape[-1] ** -0.5

    w = {"model.embed_tokens.weight": torch.randn(v, h, generator=g), "lm_head.weight": rand(v, h)}
    w["model.norm.weight"] = torch.ones(h)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
        for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            w[p + f"self_attn.{name}.weight"] = rand(rows, h)
        w[p + "block_sparse_moe.gate.weight"] = rand(config["num_local_experts"], h)
        for e in range(config["num_local_experts"]):
            q = p + f"block_sparse_moe.experts.{e}."
            w[q + "w1.weight"], w[q + "w3.weight"], w[q + "w2.weight"] = rand(i, h), rand(i, h), rand(h, i)
    return w


def demo_model_dir() -> Path:
    """The demo checkpoint folder, built on first use (atomically: a half-written folder is never left)."""
    target = demo_dir(DEMO_NAME)
    if (target / "model.safetensors").exists():
        return target
    from safetensors.torch import save_file

    if target.exists():  # incomplete (someone deleted files from it): build it again
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=DEMO_NAME + ".", dir=target.parent))
    try:
        write_byte_level_tokenizer(tmp)
        tok = Tokenizer.from_dir(tmp)
        config = demo_config(tok.vocab_size, tok.bos_token_id, tok.eos_token_ids)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(demo_weights(config), str(tmp / "model.safetensors"))
        try:
            os.replace(tmp, target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
