"""The built-in demo model: a tiny Mixtral-shaped MoE trained on first use, for a few seconds on the CPU, on a few
paragraphs of this project's own text (cadenza.demo_text), then written once as a real checkpoint folder
(config.json, model.safetensors, byte-level tokenizer files) so `cadenza run` with no --model exercises the same
loader, tokenizer and engine as a downloaded model. It has memorised its story: the greedy continuation of the
default prompt ("Once upon a time") is readable English; it knows nothing else.

The build is deterministic on a given machine and torch (a fixed seed, fixed thread count, the same steps), and
does not need transformers: the training forward below is Mixtral's (RMSNorm, rotary attention with grouped KV
heads, softmax top-k routing renormalised, SwiGLU experts) written over the checkpoint's own tensor names."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cadenza.paths import demo_dir
from cadenza.text import Tokenizer, write_byte_level_tokenizer

log = logging.getLogger(__name__)

DEMO_NAME = "demo-mixtral-v2"
DEMO_LABEL = "built-in demo model (tiny Mixtral-shaped MoE trained on a few paragraphs: it tells one short story)"

# the shapes: small enough to train in seconds on 2 cores, big enough to memorise DEMO_TEXT (2-3 KB of bytes)
DEMO_SHAPES = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e4,
    "hidden_act": "silu",
    "sliding_window": None,
    "tie_word_embeddings": False,
}
# training: windows of WINDOW tokens (BOS first) from the text, BATCH a step, STEPS steps of AdamW, cosine decay
WINDOW, BATCH, STEPS, LR = 64, 16, 250, 1e-2
THREADS = 2  # fixed, so the floating point sums (and the weights) do not depend on the machine's core count
BUILD_SECONDS = 30  # about, on 2 unloaded cores: the first-use notice says so


def demo_config(vocab_size: int, bos: int | None, eos: list[int]) -> dict:
    """DEMO_SHAPES with the byte-level tokenizer's vocabulary, in fp32."""
    return {
        **DEMO_SHAPES,
        "vocab_size": vocab_size,
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos[0] if eos else None,
    }


def init_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """The untrained checkpoint: matrices N(0, 1/fan_in), norms 1, embeddings N(0, 1)."""
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


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def forward(config: dict, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Mixtral's forward (transformers' modeling_mixtral, no cache): ids [B, T] -> logits [B, T, V]."""
    b, t = ids.shape
    h, eps = config["hidden_size"], config["rms_norm_eps"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    d = h // heads
    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    x = F.embedding(ids, w["model.embed_tokens.weight"])
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = (a @ w[p + "self_attn.q_proj.weight"].T).view(b, t, heads, d).transpose(1, 2)
        k = (a @ w[p + "self_attn.k_proj.weight"].T).view(b, t, kv_heads, d).transpose(1, 2)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).view(b, t, kv_heads, d).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        m = _rms(x, w[p + "post_attention_layernorm.weight"], eps).reshape(b * t, h)
        probs = torch.softmax(m @ w[p + "block_sparse_moe.gate.weight"].T, -1)
        top_w, top_i = probs.topk(config["num_experts_per_tok"], -1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        # every expert on every token, weighted by its routing weight (0 where not picked): at this size cheaper
        # than gathering each expert's tokens, and the same sum as the sparse route
        gates = torch.zeros_like(probs).scatter(1, top_i, top_w)
        out = 0
        for e in range(config["num_local_experts"]):
            q_ = p + f"block_sparse_moe.experts.{e}."
            y = (F.silu(m @ w[q_ + "w1.weight"].T) * (m @ w[q_ + "w3.weight"].T)) @ w[q_ + "w2.weight"].T
            out = out + gates[:, e, None] * y
        x = x + out.view(b, t, h)
    return _rms(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def train_weights(config: dict, tok: Tokenizer, text: str, seed: int = 0, steps: int = STEPS) -> dict:
    """init_weights(config, seed) trained on `text`: windows BOS + text[o : o + WINDOW - 1] (token offsets o drawn
    with the seed, offset 0 in every batch so the opening is learned best), the text ending with EOS."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        g = torch.Generator().manual_seed(seed)
        data = torch.tensor(tok.encode(text, add_special_tokens=False) + list(tok.eos_token_ids[:1]))
        bos = torch.full((BATCH, 1), tok.bos_token_id)
        w = {name: t.requires_grad_() for name, t in init_weights(config, seed).items()}
        opt = torch.optim.AdamW(w.values(), lr=LR, betas=(0.9, 0.98), weight_decay=0.0)
        span = max(1, len(data) - WINDOW + 1)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            offsets = torch.randint(0, span, (BATCH,), generator=g)
            offsets[0] = 0
            windows = data[offsets[:, None] + torch.arange(WINDOW - 1)]
            ids = torch.cat((bos, windows), 1)
            logits = forward(config, w, ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        log.debug("demo model: final training loss %.3f", loss.item())
        return {name: t.detach().contiguous() for name, t in w.items()}
    finally:
        torch.set_num_threads(threads)


def build_demo(folder: Path, seed: int = 0) -> None:
    """Write the demo checkpoint (tokenizer, config, trained weights) into `folder`."""
    from safetensors.torch import save_file

    from cadenza.demo_text import DEMO_TEXT

    write_byte_level_tokenizer(folder)
    tok = Tokenizer.from_dir(folder)
    config = demo_config(tok.vocab_size, tok.bos_token_id, tok.eos_token_ids)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(train_weights(config, tok, DEMO_TEXT, seed), str(folder / "model.safetensors"))


def demo_model_dir() -> Path:
    """The demo checkpoint folder, built on first use (atomically: a half-written folder is never left)."""
    target = demo_dir(DEMO_NAME)
    if (target / "model.safetensors").exists():
        return target
    if target.exists():  # incomplete (someone deleted files from it): build it again
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=DEMO_NAME + ".", dir=target.parent))
    try:
        log.info(f"building the demo model (first use, ~{BUILD_SECONDS} s)...")
        start = time.perf_counter()
        build_demo(tmp)
        log.debug("demo model built in %.1f s", time.perf_counter() - start)
        try:
            os.replace(tmp, target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
