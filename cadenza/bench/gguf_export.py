"""A synthetic checkpoint as a GGUF file llama.cpp loads: the same shapes and the same seeded bf16 weights as the
model cadenza measures, with the routed experts in Q8_0 or Q4_0 (quantized from those weights), or Q4_K_M-like
(`q4_k_m`: gate and up Q4_K, down Q6_K, as random blocks of the weights' scale: gguf_quants.random_kquant; K-quant
quantization in Python is too slow for 45 B weights, and speed does not depend on the values). llama.cpp's own
Q4_K_M gives only some layers' down projections Q6_K (its use_more_bits); here every layer's are Q6_K, so the
experts are a little larger than a real Q4_K_M file's. Attention and the output matrix are quantized as Q4_K_M
does (q, k, output of attention Q4_K; v and the LM head Q6_K; random blocks too), where their rows are whole
super-blocks: both systems then hold what a real Q4_K_M file gives them.

Tensor types (int8 / int4 files: kept simple, the same non-expert bytes cadenza keeps in bf16 on the GPU): routed
experts in the requested block format; norms and routers (`ffn_gate_inp`) in F32, as llama.cpp's converter writes
them; every other matrix (embedding, attention, output) in F16 (q4_k_m: see above). llama-quantize's own Q4_0 mix
would also quantize the embedding, attention and output; we keep them in 16 bits so both systems carry the same
non-expert weights.

Families (llama.cpp architecture names and tensor names from its src/llama-arch.cpp, models/llama.cpp and
models/qwen3moe.cpp):
- Mixtral -> `llama` with experts. llama.cpp rotates adjacent pairs of a head's dimensions while the HF layout
  rotates its two halves, so the q/k rows of each head are interleaved (first half, second half, ...) to compute
  the same attention; llama.cpp's converter does the same.
- Qwen3-MoE -> `qwen3moe` (q/k norms, expert_feed_forward_length, head_dim via attention.key_length), rotary on
  halves as in HF: no reordering.

The vocabulary is synthetic, of the model's size (llama-bench feeds random ids below it): a SentencePiece-style
`llama` vocabulary (<unk>, <s>, </s>, 256 byte tokens, pieces) or a GPT-2-style byte-level `gpt2` one (256 byte
tokens, pieces, the special tokens at the config's ids, one merge: llama.cpp requires the merges key and gguf-py
writes no empty array), with the `qwen2` pre-tokenizer that Qwen3's real GGUFs name.

Writing streams: every tensor's header goes first, then each tensor is made (taken from the synthetic pools,
quantized) and written while the next one is made; memory holds about two tensors, never the model.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cadenza.bench.gguf_quants import (
    BLOCK_BYTES,
    K_BLOCK_BYTES,
    quantize_many,
    quantized_nbytes,
    random_kquant,
    random_mxfp4,
    single_threaded_ops,
)
from cadenza.bench.synthetic import SyntheticCheckpoint
from cadenza.errors import CadenzaError
from cadenza.formats.gguf import import_gguf

# expert format -> the GGUF block format of the file's experts: cadenza's int8 / int4 measured as Q8_0 / Q4_0, and
# q4_k_m (GGUF only: cadenza loads the file itself) for the G scenarios
# f16: the synthetic weights themselves, for a baseline the other formats are compared with (cadenza perplexity)
EXPERT_QTYPE = {"int8": "Q8_0", "int4": "Q4_0", "q4_k_m": "Q4_K_M", "mxfp4": "MXFP4", "f16": "F16"}
# a mix's type per projection (gate, up, down); a plain block format is every projection's
EXPERT_MIX = {"Q4_K_M": {"gate": "Q4_K", "up": "Q4_K", "down": "Q6_K"}}
_ELEMENT_BYTES = {"F32": 4, "F16": 2}
_FILE_TYPE = {
    "F16": 1,
    "Q8_0": 7,
    "Q4_0": 2,
    "Q4_K_M": 15,
    "MXFP4": 38,
}  # 38: MOSTLY_MXFP4_MOE  # llama.cpp's LLAMA_FTYPE_MOSTLY_*: what the bulk of the file is
_TOKEN_TYPE = {"normal": 1, "unknown": 2, "control": 3, "unused": 5, "byte": 6}
_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss", "glm4_moe": "glm4moe"}


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the file: its GGUF name, shape (outermost first, in weights), type and where it comes from."""

    name: str
    shape: tuple[int, ...]
    qtype: str  # F32, F16, Q8_0, Q4_0, Q4_K, Q6_K
    sources: tuple[str, ...]  # the checkpoint's tensors; several: the experts of a layer, stacked along dim 0
    layer: int | None = None
    rope_heads: int = 0  # > 0: interleave the two halves of each of this many heads' rows (llama's q and k)

    @property
    def nbytes(self) -> int:
        if self.qtype in _ELEMENT_BYTES:
            n = _ELEMENT_BYTES[self.qtype]
            for d in self.shape:
                n *= d
            return n
        return quantized_nbytes(self.shape, self.qtype)

    @property
    def is_expert(self) -> bool:
        return "_exps." in self.name

    @property
    def is_random(self) -> bool:
        """Random K-quant or MXFP4 blocks of the weights' scale, not the checkpoint's weights."""
        return self.qtype in K_BLOCK_BYTES or self.qtype == "MXFP4"


@dataclass(frozen=True)
class GgufPlan:
    """What the file holds, known from shapes alone (instant even for a 50 GB file)."""

    model: str
    arch: str
    expert_qtype: str
    config: dict
    tensors: tuple[GgufTensor, ...]

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def file_bytes_bound(self) -> int:
        """An upper bound of the file's size: tensors, 32-byte alignment padding, and the header and vocabulary
        (under 64 bytes a token)."""
        return self.tensor_bytes + 32 * len(self.tensors) + 64 * int(self.config["vocab_size"]) + (1 << 20)

    def expert_bytes_per_layer(self) -> list[int]:
        out = [0] * int(self.config["num_hidden_layers"])
        for t in self.tensors:
            if t.is_expert:
                out[t.layer] += t.nbytes
        return out

    def bytes_where(self, keep: Callable[[GgufTensor], bool]) -> int:
        return sum(t.nbytes for t in self.tensors if keep(t))

    def other_bytes(self) -> int:
        """The non-expert tensors a decode token reads whole, as stored (attention, routers, norms, LM head; of the
        embedding table one row, left out): both systems keep them in their blocks on the GPU."""
        return self.bytes_where(lambda t: not t.is_expert and t.name != "token_embd.weight")


def gguf_plan(ckpt: SyntheticCheckpoint, expert_format: str) -> GgufPlan:
    """The tensors of `ckpt`'s GGUF with `expert_format` (int8 / int4 / q4_k_m) experts; refuses families llama.cpp's
    writer here does not know."""
    c = ckpt.config
    family = c.get("model_type")
    if family not in _ARCH:
        raise CadenzaError(f"The llama.cpp peer writes GGUF files for {', '.join(_ARCH)} models, not {family}.")
    if expert_format not in EXPERT_QTYPE:
        raise CadenzaError(
            f"GGUF files are written with int8 (Q8_0), int4 (Q4_0), q4_k_m (Q4_K / Q6_K), mxfp4 or f16 experts, "
            f"not {expert_format}."
        )
    qtype = EXPERT_QTYPE[expert_format]
    mixtral, gpt_oss, glm = family == "mixtral", family == "gpt_oss", family == "glm4_moe"
    if qtype == "MXFP4" and not gpt_oss:
        raise CadenzaError(
            f"MXFP4 experts are written for gpt-oss models only (llama.cpp reads them there), not {family}."
        )
    heads, kv_heads = int(c["num_attention_heads"]), int(c["num_key_value_heads"])
    n_experts = int(c.get("num_local_experts") or c.get("num_experts") or c["n_routed_experts"])
    dense_layers = int(c.get("first_k_dense_replace") or 0) if glm else 0
    shape = lambda name: tuple(ckpt.tensors[name].shape)  # noqa: E731
    out: list[GgufTensor] = [
        GgufTensor("token_embd.weight", shape("model.embed_tokens.weight"), "F16", ("model.embed_tokens.weight",))
    ]

    def one(gguf_name: str, src: str, qt: str, layer: int, rope_heads: int = 0) -> None:
        out.append(GgufTensor(gguf_name, shape(src), qt, (src,), layer, rope_heads))

    def dense(src: str, k_type: str) -> str:  # a Q4_K_M file's type for a dense matrix, where it has whole blocks
        return k_type if qtype == "Q4_K_M" and shape(src)[-1] % 256 == 0 else "F16"

    def some(gguf_name: str, src: str, qt: str, layer: int) -> None:  # a tensor the family may not have
        if src in ckpt.tensors:
            one(gguf_name, src, qt, layer)

    for i in range(int(c["num_hidden_layers"])):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        one(blk + "attn_norm.weight", hf + "input_layernorm.weight", "F32", i)
        for x in ("q", "k", "v"):
            src = f"{hf}self_attn.{x}_proj.weight"
            one(f"{blk}attn_{x}.weight", src, dense(src, "Q6_K" if x == "v" else "Q4_K"), i,
                {"q": heads, "k": kv_heads}.get(x, 0) if mixtral else 0)  # fmt: skip
            some(f"{blk}attn_{x}.bias", f"{hf}self_attn.{x}_proj.bias", "F32", i)
        one(
            blk + "attn_output.weight", hf + "self_attn.o_proj.weight", dense(hf + "self_attn.o_proj.weight", "Q4_K"), i
        )
        some(blk + "attn_output.bias", hf + "self_attn.o_proj.bias", "F32", i)
        some(blk + "attn_sinks.weight", hf + "self_attn.sinks", "F32", i)
        some(blk + "attn_q_norm.weight", hf + "self_attn.q_norm.weight", "F32", i)
        some(blk + "attn_k_norm.weight", hf + "self_attn.k_norm.weight", "F32", i)
        # gpt-oss and GLM-4.5 name the norm before the MLP post_attention_norm in llama.cpp
        norm = "post_attention_norm.weight" if gpt_oss or glm else "ffn_norm.weight"
        one(blk + norm, hf + "post_attention_layernorm.weight", "F32", i)
        if i < dense_layers:  # GLM-4.5's dense first layers
            for kind in ("gate", "up", "down"):
                one(f"{blk}ffn_{kind}.weight", f"{hf}mlp.{kind}_proj.weight", "F16", i)
            continue
        moe = hf + ("block_sparse_moe." if mixtral else "mlp.")
        router = moe + ("router." if gpt_oss else "gate.")
        one(blk + "ffn_gate_inp.weight", router + "weight", "F32", i)
        some(blk + "ffn_gate_inp.bias", router + "bias", "F32", i)
        some(blk + "exp_probs_b.bias", router + "e_score_correction_bias", "F32", i)
        projections = (
            (("gate", "w1"), ("down", "w2"), ("up", "w3"))
            if mixtral
            else (("gate", "gate_proj"), ("down", "down_proj"), ("up", "up_proj"))
        )
        for kind, proj in projections:
            srcs = tuple(f"{moe}experts.{e}.{proj}.weight" for e in range(n_experts))
            kind_qtype = EXPERT_MIX.get(qtype, {}).get(kind, qtype)
            row = shape(srcs[0])[-1]
            if kind_qtype in K_BLOCK_BYTES and row % 256:
                raise CadenzaError(
                    f"{ckpt.name}'s {kind} projections have rows of {row} weights, not whole {kind_qtype} blocks of "
                    "256: write it with int8 or int4 experts, or use a model whose rows are multiples of 256."
                )
            out.append(GgufTensor(f"{blk}ffn_{kind}_exps.weight", (n_experts, *shape(srcs[0])), kind_qtype, srcs, i))
            biases = tuple(f"{moe}experts.{e}.{kind}_bias" for e in range(n_experts))
            if biases[0] in ckpt.tensors:  # gpt-oss's, stacked [E, rows] in F32 as the converter keeps them
                out.append(GgufTensor(f"{blk}ffn_{kind}_exps.bias", (n_experts, *shape(biases[0])), "F32", biases, i))
            some(f"{blk}ffn_{kind}_shexp.weight", f"{moe}shared_experts.{proj}.weight", "F16", i)
    out.append(GgufTensor("output_norm.weight", shape("model.norm.weight"), "F32", ("model.norm.weight",)))
    if "lm_head.weight" in ckpt.tensors:  # tied models have none: llama.cpp then reuses token_embd
        out.append(
            GgufTensor("output.weight", shape("lm_head.weight"), dense("lm_head.weight", "Q6_K"), ("lm_head.weight",))
        )
    return GgufPlan(ckpt.name, _ARCH[family], qtype, dict(c), tuple(out))


# --- metadata ------------------------------------------------------------------------------------------------------


def _add_hparams(w, plan: GgufPlan) -> None:
    c = plan.config
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    w.add_name(f"{plan.model} (cadenza synthetic, {plan.expert_qtype} experts)")
    w.add_file_type(_FILE_TYPE[plan.expert_qtype])
    w.add_quantization_version(2)  # GGML_QNT_VERSION: the block layouts above
    w.add_context_length(int(c["max_position_embeddings"]))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(c["num_key_value_heads"]))
    # GLM-4.5 turns the first half of each head (partial_rotary_factor); the others all of it
    w.add_rope_dimension_count(int(head_dim * float(c.get("partial_rotary_factor") or 1.0)))
    w.add_rope_freq_base(float(c["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    if plan.arch == "llama":
        w.add_vocab_size(int(c["vocab_size"]))
        w.add_expert_count(int(c["num_local_experts"]))
    else:
        w.add_expert_count(int(c.get("num_experts") or c.get("num_local_experts") or c["n_routed_experts"]))
        w.add_expert_feed_forward_length(int(c.get("moe_intermediate_size") or c["intermediate_size"]))
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_expert_used_count(int(c["num_experts_per_tok"]))
    if plan.arch == "gpt-oss":  # llama.cpp's GptOssModel: sliding window (every other layer), YaRN
        rope = c.get("rope_scaling") or {}
        w.add_sliding_window(int(c["sliding_window"]))
        w.add_rope_scaling_type(gguf_module().RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings", 4096)))
    elif plan.arch == "glm4moe":  # llama.cpp's Glm4MoeModel (no multi-token-prediction layer: nextn 0)
        w.add_expert_shared_count(int(c["n_shared_experts"]))
        w.add_leading_dense_block_count(int(c["first_k_dense_replace"]))
        w.add_expert_gating_func(gguf_module().ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(float(c["routed_scaling_factor"]))
        w.add_expert_weights_norm(bool(c["norm_topk_prob"]))
        w.add_nextn_predict_layers(0)


def gguf_module():
    return import_gguf()


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: byte b -> the printable character standing for it in a `gpt2` vocabulary.
    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) take code points from 256 up,
    in byte order. llama.cpp maps pieces back to bytes through this table."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _add_vocab(w, plan: GgufPlan) -> None:
    c = plan.config
    n = int(c["vocab_size"])
    bos, eos = c.get("bos_token_id"), c.get("eos_token_id")
    if plan.arch == "llama":  # SentencePiece layout: <unk> <s> </s>, byte tokens <0x00>..<0xFF>, then pieces
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        kinds = ["unknown", "control", "control"] + ["byte"] * 256
        tokens += [f"\u2581t{i}" for i in range(len(tokens), n)]  # "▁": SentencePiece's word start
        kinds += ["normal"] * (n - len(kinds))
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens[:n])
        w.add_token_scores([0.0 if k != "normal" else -float(i) for i, k in enumerate(kinds[:n])])
        w.add_token_types([_TOKEN_TYPE[k] for k in kinds[:n]])
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
    else:  # byte-level BPE: 256 byte tokens, a merged pair, pieces; specials at the config's ids, padding after
        specials = {i: s for i, s in ((bos, "<|endoftext|>"), (eos, "<|im_end|>")) if i is not None and i < n}
        first_special = min(specials, default=n)
        tokens = [*gpt2_byte_chars(), "\u0120\u0120"]  # "ĠĠ": two spaces, the one merge below
        tokens += [f"t{i}" for i in range(len(tokens), first_special)]
        kinds = ["normal"] * len(tokens)
        for i in range(first_special, n):
            if i in specials:
                tokens.append(specials[i])
            elif i <= max(specials):
                tokens.append(f"<|extra_{i}|>")
            else:
                tokens.append(f"[PAD{i}]")
            kinds.append("control" if i <= max(specials) else "unused")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types([_TOKEN_TYPE[k] for k in kinds])
        w.add_token_merges(["\u0120 \u0120"])
        w.add_add_bos_token(False)
        if bos is not None and bos < n:
            w.add_pad_token_id(bos)
    if bos is not None and bos < n:
        w.add_bos_token_id(int(bos))
    if eos is not None and eos < n:
        w.add_eos_token_id(int(eos))
    w.add_add_eos_token(False)


# --- tensors -------------------------------------------------------------------------------------------------------


def interleave_rope_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from (first half, second half) to pairs (h0[0], h1[0], h0[1], h1[1], ...): the
    HF rotate-half layout to the adjacent-pair layout llama.cpp's `llama` rotary expects."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _materialize(ckpt: SyntheticCheckpoint, t: GgufTensor, pool: ThreadPoolExecutor):
    """The tensor's bytes as the numpy array gguf-py writes."""
    if t.is_random:  # the synthetic weights' N(0, 1/fan_in) scale; seeded by the model's seed and the tensor's name
        out = torch.empty((*t.shape[:-1], t.nbytes // _numel(t.shape[:-1])), dtype=torch.uint8)
        seed = (ckpt.seed << 32) + zlib.crc32(t.name.encode())
        if t.qtype == "MXFP4":
            random_mxfp4(out, t.shape[-1] ** -0.5, seed, pool)
        else:
            random_kquant(out, t.qtype, t.shape[-1] ** -0.5, seed, pool)
        return out.numpy()
    if t.qtype in _ELEMENT_BYTES:
        x = ckpt.tensor(t.sources[0]) if len(t.sources) == 1 else torch.stack([ckpt.tensor(n) for n in t.sources])
        if t.rope_heads:
            x = interleave_rope_halves(x, t.rope_heads)
        return x.to(torch.float32 if t.qtype == "F32" else torch.float16).contiguous().numpy()
    width = t.shape[-1] // 32 * BLOCK_BYTES[t.qtype]
    out = torch.empty((*t.shape[:-1], width), dtype=torch.uint8)
    quantize_many([(ckpt.tensor(src), out[e]) for e, src in enumerate(t.sources)], t.qtype, pool)
    return out.numpy()


@dataclass(frozen=True)
class WrittenGguf:
    path: Path
    nbytes: int
    seconds: float
    plan: GgufPlan


def write_gguf(
    ckpt: SyntheticCheckpoint, path: str | Path, expert_format: str, threads: int | None = None, log=None
) -> WrittenGguf:
    """Writes `ckpt` as GGUF with `expert_format` experts to `path`; a failed write leaves no file behind."""
    gguf = import_gguf()
    plan = gguf_plan(ckpt, expert_format)
    path = Path(path)
    t0 = time.perf_counter()
    writer = gguf.GGUFWriter(path, plan.arch)
    _add_hparams(writer, plan)
    _add_vocab(writer, plan)
    for t in plan.tensors:
        if t.qtype in _ELEMENT_BYTES:
            dtype = np.dtype(np.float32 if t.qtype == "F32" else np.float16)
            writer.add_tensor_info(t.name, t.shape, dtype, t.nbytes)
        else:  # quantized: given as bytes, which gguf-py turns back into weights for the header
            byte_shape = (*t.shape[:-1], t.nbytes // _numel(t.shape[:-1]))
            qtype = getattr(gguf.GGMLQuantizationType, t.qtype)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=qtype)
    threads = threads or torch.get_num_threads()
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with single_threaded_ops(), ThreadPoolExecutor(threads) as pool, ThreadPoolExecutor(1) as disk:
            pending = None
            for t in plan.tensors:
                data = _materialize(ckpt, t, pool)  # made while the previous tensor is being written
                if pending is not None:
                    pending.result()
                pending = disk.submit(writer.write_tensor_data, data)
                if log and t.is_expert and t.name.endswith("up_exps.weight") and (t.layer + 1) % 8 == 0:
                    log(f"  GGUF: layer {t.layer + 1}/{plan.config['num_hidden_layers']} written")
            if pending is not None:
                pending.result()
        writer.close()
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)
        raise
    finally:
        ckpt.release()  # the random pools (~1 GB for a full-size model) are not needed by the peer
    return WrittenGguf(path, path.stat().st_size, time.perf_counter() - t0, plan)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
