"""GGUF architectures -> the Hugging Face config.json and tensor names cadenza's families take.

Metadata keys are llama.cpp's (`{arch}.embedding_length`, `{arch}.expert_count`, ... as its converter writes
them); transformers' GGUF loader (integrations/ggml.py) maps the same keys for llama and the Qwen MoE families and
knows no deepseek2 or olmoe, so those follow llama.cpp's src/llama-model.cpp. Routing switches that a GGUF does not
store are the ones llama.cpp hard-codes per architecture (Qwen3-MoE renormalises its top-k weights; Qwen2-MoE and
OLMoE do not).

Tensor names come from a small explicit table per family rather than `gguf.TensorNameMap` reversed: that map sends
many HF spellings to one GGUF name, so reversing it is ambiguous, and the table shows in one screen which parameter
each GGUF tensor fills.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cadenza.errors import CadenzaError

SUPPORTED = (
    "llama (with experts: Mixtral)",
    "qwen2moe",
    "qwen3moe",
    "olmoe",
    "deepseek2",
    "gpt-oss",
    "glm4moe",
    "minimax-m2",
    "dots1",
    "qwen3next",
    "qwen35moe (text)",
)
# the general.architecture values read (SUPPORTED, as llama.cpp names them)
ARCHS = (
    "llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2", "gpt-oss", "glm4moe", "minimax-m2", "dots1", "qwen3next",
    "qwen35moe",
)  # fmt: skip

# GGUF names outside the blocks
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# per block, common to every family: GGUF suffix -> HF suffix after `model.layers.{i}.`
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_sinks.weight": "self_attn.sinks",
    "post_attention_norm.weight": "post_attention_layernorm.weight",  # gpt-oss's name for ffn_norm
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    # dense MLP layers (DeepSeek's first layers, Qwen's mlp_only_layers)
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_DEEPSEEK = {
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
}
# Qwen3-Next's and Qwen3.5's Gated DeltaNet layers (`linear_attn`); the converter's value transforms, which the
# reader undoes, are in gguf_fixes
_LINEAR = {
    "ssm_conv1d.weight": "conv1d.weight",
    "ssm_a": "A_log",
    "ssm_dt.bias": "dt_bias",
    "ssm_norm.weight": "norm.weight",
    "ssm_out.weight": "out_proj.weight",
}
_LINEAR_NEXT = {
    **_LINEAR,
    "attn_qkv.weight": "in_proj_qkvz.weight",  # with attn_gate, regrouped per key head (gguf_fixes)
    "ssm_in.weight": "in_proj_qkvz.weight",  # older converters: HF's own layout, as llama.cpp still reads it
    "ssm_ba.weight": "in_proj_ba.weight",
}
_LINEAR_35 = {
    **_LINEAR,
    "attn_qkv.weight": "in_proj_qkv.weight",
    "attn_gate.weight": "in_proj_z.weight",
    "ssm_beta.weight": "in_proj_b.weight",
    "ssm_alpha.weight": "in_proj_a.weight",
}
LINEAR_NAMES = {"Qwen3NextForCausalLM": _LINEAR_NEXT, "Qwen3_5MoeForCausalLM": _LINEAR_35}
_LINEAR_FIXES = {"ssm_a": ("a_log",), "ssm_conv1d.weight": ("conv",)}
# Qwen3.5's tensors whose value heads the converter tiled, and where they sit (gguf_fixes)
_TILED_V = {
    "attn_qkv.weight": "v_rows",
    "ssm_conv1d.weight": "v_rows",
    "attn_gate.weight": "v_heads",
    "ssm_beta.weight": "v_scalars",
    "ssm_alpha.weight": "v_scalars",
    "ssm_a": "v_scalars",
    "ssm_dt.bias": "v_scalars",
    "ssm_out.weight": "v_cols",
}
# the norms the converter stores as 1 + weight for these families (every one but the DeltaNet's own)
_CENTRED = ("attn_norm.weight", "post_attention_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight")
_EXPERT_KINDS = ("gate", "up", "down")


@dataclass(frozen=True)
class Family:
    """How one GGUF architecture's MoE block is named on the HF side."""

    moe: str  # the MoE block's attribute: "mlp" or Mixtral's "block_sparse_moe"
    experts: tuple[str, str, str]  # HF names of the gate, up and down projections of one expert
    shared: str | None = None  # the shared expert's attribute
    router: str = "gate"  # the router's attribute in the MoE block


FAMILIES = {
    "MixtralForCausalLM": Family("block_sparse_moe", ("w1", "w3", "w2")),
    "Qwen2MoeForCausalLM": Family("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "Qwen3MoeForCausalLM": Family("mlp", ("gate_proj", "up_proj", "down_proj")),
    "OlmoeForCausalLM": Family("mlp", ("gate_proj", "up_proj", "down_proj")),
    "DeepseekV2ForCausalLM": Family("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "DeepseekV3ForCausalLM": Family("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    # experts with biases (ffn_*_exps.bias), read expert by expert (fused_experts false in the config below)
    "GptOssForCausalLM": Family("mlp", ("gate_proj", "up_proj", "down_proj"), router="router"),
    "Glm4MoeForCausalLM": Family("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "MiniMaxM2ForCausalLM": Family("block_sparse_moe", ("w1", "w3", "w2")),
    "Dots1ForCausalLM": Family("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "Qwen3NextForCausalLM": Family("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "Qwen3_5MoeForCausalLM": Family("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Mapped:
    """Where a GGUF tensor lands: one HF name, or (experts) a name pattern with `{e}` for each expert; `fixes`: the
    converter's value transforms to undo (gguf_fixes), `also`: a second GGUF tensor they read."""

    name: str
    experts: bool = False
    fixes: tuple[str, ...] = ()
    also: str | None = None
    fused_up: str | None = None  # ffn_gate_up_exps: `name` is the gate's pattern, this the up's


def hf_name(architecture: str, gguf_name: str) -> Mapped | None:
    """The HF parameter a GGUF tensor fills, or None for a tensor cadenza does not read (rope_freqs, ...)."""
    linear = LINEAR_NAMES.get(architecture)
    if gguf_name in GLOBAL_NAMES:
        centred = linear is not None and gguf_name == "output_norm.weight"
        return Mapped(GLOBAL_NAMES[gguf_name], fixes=("centred",) if centred else ())
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None:
        return None
    fam, layer, rest = FAMILIES[architecture], m.group(1), m.group(2)
    pre = f"model.layers.{layer}."
    if linear is not None and rest in linear:
        return _linear(architecture, pre + "linear_attn." + linear[rest], rest, f"blk.{layer}.")
    if rest in _BLOCK:
        return Mapped(pre + _BLOCK[rest], fixes=("centred",) if linear is not None and rest in _CENTRED else ())
    if architecture.startswith("Deepseek") and rest in _DEEPSEEK:
        return Mapped(pre + _DEEPSEEK[rest])
    if architecture in ("Glm4MoeForCausalLM", "Dots1ForCausalLM") and rest == "exp_probs_b.bias":  # as DeepSeek-V3's
        return Mapped(pre + _DEEPSEEK[rest])
    if architecture == "MiniMaxM2ForCausalLM" and rest == "exp_probs_b.bias":  # on the MoE block, beside its gate
        return Mapped(f"{pre}{fam.moe}.e_score_correction_bias")
    if rest in ("ffn_gate_inp.weight", "ffn_gate_inp.bias"):
        return Mapped(f"{pre}{fam.moe}.{fam.router}.{rest.rpartition('.')[2]}")
    if rest == "ffn_gate_up_exps.weight":  # llama.cpp's --fuse-gate-up-exps: each expert's gate rows, then its up
        gate, up = (f"{pre}{fam.moe}.experts.{{e}}.{hf}.weight" for hf in fam.experts[:2])
        return Mapped(gate, experts=True, fused_up=up)
    for kind, hf in zip(_EXPERT_KINDS, fam.experts, strict=True):
        if rest == f"ffn_{kind}_exps.weight":
            return Mapped(f"{pre}{fam.moe}.experts.{{e}}.{hf}.weight", experts=True)
        if rest == f"ffn_{kind}_exps.bias":
            return Mapped(f"{pre}{fam.moe}.experts.{{e}}.{kind}_bias", experts=True)
        if rest == f"ffn_{kind}_shexp.weight" and fam.shared:
            return Mapped(f"{pre}{fam.moe}.{fam.shared}.{kind}_proj.weight")
    if rest == "ffn_gate_inp_shexp.weight" and fam.shared == "shared_expert":
        return Mapped(f"{pre}{fam.moe}.shared_expert_gate.weight")
    return None


def _linear(architecture: str, name: str, rest: str, blk: str) -> Mapped:
    """A Gated DeltaNet tensor: its HF name and what the converter did to it (gguf_fixes). Qwen3.5's converter also
    moved the value heads from grouped to tiled order in every tensor that has them."""
    fixes = _LINEAR_FIXES.get(rest, ())
    if architecture == "Qwen3NextForCausalLM":
        if rest == "attn_qkv.weight":
            return Mapped(name, fixes=("qkvz",), also=blk + "attn_gate.weight")
        return Mapped(name, fixes=fixes)
    tiled = _TILED_V.get(rest)
    return Mapped(name, fixes=((tiled,) if tiled else ()) + fixes)


def hf_config(meta: dict, shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """config.json's equivalent for a GGUF's metadata; shapes: GGUF tensor name -> shape (outermost first), for
    the facts some files leave out of the metadata (vocabulary size, shared expert width)."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise CadenzaError(
            f"{source} has no general.architecture key, so it is not a model GGUF cadenza can read. "
            "Use a GGUF model file converted by llama.cpp's convert_hf_to_gguf.py."
        )

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        return max(value) if isinstance(value, list) and value else value  # per-layer arrays: the widest

    def req(key: str):
        value = get(key)
        if value is None:
            raise CadenzaError(
                f"{source} has no {arch}.{key} metadata, which a {arch} model needs. The file is incomplete or was "
                "written by an old converter: convert the model again with a current llama.cpp."
            )
        return value

    if arch not in ARCHS:
        raise CadenzaError(
            f"{source} holds a GGUF {arch!r} model, which cadenza does not run. Supported GGUF architectures: "
            f"{', '.join(SUPPORTED)}. Use a GGUF of one of these, or the model's Hugging Face folder."
        )
    if not get("expert_count"):
        raise CadenzaError(
            f"{source} holds a dense {arch} model (no {arch}.expert_count). cadenza runs Mixture-of-Experts models "
            "and offloads their experts; run dense models with llama.cpp or transformers."
        )
    heads = int(req("attention.head_count"))
    embd = shapes.get("token_embd.weight")
    cfg: dict = {
        "hidden_size": int(req("embedding_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv") or heads),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(get("vocab_size") or (embd[0] if embd else req("vocab_size"))),
        "num_experts_per_tok": int(req("expert_used_count")),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    for key in ("eos_token_id", "bos_token_id"):
        if isinstance(meta.get(f"tokenizer.ggml.{key}"), int):
            cfg[key] = meta[f"tokenizer.ggml.{key}"]
    experts, expert_ff = int(req("expert_count")), get("expert_feed_forward_length")
    dense_ff = get("feed_forward_length")
    if arch == "llama":
        # llama.cpp writes Mixtral's expert width as feed_forward_length; newer converters also as expert_*
        cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts)
        cfg["intermediate_size"] = int(expert_ff or req("feed_forward_length"))
    elif arch in ("qwen2moe", "qwen3moe"):
        moe_ff = int(expert_ff or req("feed_forward_length"))
        cfg.update(num_experts=experts, moe_intermediate_size=moe_ff, intermediate_size=int(dense_ff or moe_ff))
        if get("attention.key_length"):
            cfg["head_dim"] = int(get("attention.key_length"))
        if arch == "qwen2moe":
            cfg.update(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe")
            cfg.update(shared_expert_intermediate_size=_shared_ff(get, shapes), qkv_bias="blk.0.attn_q.bias" in shapes)
            cfg["norm_topk_prob"] = bool(get("expert_weights_norm", False))
        else:
            cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
            cfg.update(
                norm_topk_prob=bool(get("expert_weights_norm", True)), attention_bias="blk.0.attn_q.bias" in shapes
            )
    elif arch == "olmoe":
        cfg.update(architectures=["OlmoeForCausalLM"], model_type="olmoe", num_experts=experts)
        cfg.update(intermediate_size=int(expert_ff or req("feed_forward_length")), rms_norm_eps=cfg["rms_norm_eps"])
        cfg["norm_topk_prob"] = bool(get("expert_weights_norm", False))
        if get("attention.clamp_kqv"):
            cfg["clip_qkv"] = float(get("attention.clamp_kqv"))
    elif arch == "gpt-oss":
        if any(n.endswith("ffn_gate_up_exps.weight") for n in shapes):
            raise CadenzaError(
                f"{source} stores gpt-oss's gate and up experts fused (ffn_gate_up_exps), which this cadenza does not "
                "read yet. Use a GGUF with separate ffn_gate_exps / ffn_up_exps (llama.cpp's default) or the HF folder."
            )
        cfg.update(architectures=["GptOssForCausalLM"], model_type="gpt_oss", num_local_experts=experts)
        cfg.update(intermediate_size=int(expert_ff or req("feed_forward_length")), fused_experts=False)
        cfg.update(head_dim=int(get("attention.key_length") or cfg["hidden_size"] // heads))
        cfg.update(sliding_window=int(req("attention.sliding_window")), attention_bias="blk.0.attn_q.bias" in shapes)
    elif arch == "glm4moe":
        cfg.update(_glm4moe(get, req, cfg, shapes))
    elif arch == "minimax-m2":
        cfg.update(_minimax_m2(get, req, cfg, source))
    elif arch == "dots1":
        cfg.update(_dots1(get, req, cfg, shapes, source))
    elif arch in ("qwen3next", "qwen35moe"):
        cfg.update(_qwen3next(get, req, cfg, shapes, arch))
    else:
        cfg.update(_deepseek(get, req, heads, shapes, cfg["num_hidden_layers"]))
    scaling = _rope_scaling(get)
    if scaling:
        if arch == "gpt-oss":  # the family's YaRN keeps its correction range unrounded (config.json's truncate)
            scaling["truncate"] = False
        cfg["rope_scaling"] = scaling
    return cfg


def _deepseek(get, req, heads: int, shapes: dict, blocks: int) -> dict:
    """DeepSeek-V2 / V3 (GGUF deepseek2): V3 when the router is sigmoid (expert_gating_func 2) or has the routing
    bias exp_probs_b. Newer llama.cpp converters store MLA's per-head sizes as key_length_mla / value_length_mla.
    GLM-4.7-Flash converts as deepseek2 too (V3's computation; its router's float32 weight is the file's F32 one);
    a converter that exports its multi-token-prediction layer counts it in block_count (nextn_predict_layers, the
    last blocks), which cadenza does not run: its tensors are neither expected nor read."""
    rope = int(req("rope.dimension_count"))
    key = get("attention.key_length_mla") or req("attention.key_length")
    value = get("attention.value_length_mla") or req("attention.value_length")
    v3 = get("expert_gating_func") == 2 or any(n.endswith("exp_probs_b.bias") for n in shapes)
    groups = int(get("expert_group_count") or 0) or None
    nextn = int(get("nextn_predict_layers") or 0)
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "num_hidden_layers": blocks - nextn,
        "num_nextn_predict_layers": nextn,
        "num_key_value_heads": heads,  # MLA: every head reads the shared latent
        **_routed_experts(get, req, norm_default=v3),
        "q_lora_rank": int(get("attention.q_lora_rank") or 0) or None,
        "kv_lora_rank": int(req("attention.kv_lora_rank")),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": int(key) - rope,
        "v_head_dim": int(value),
        "n_group": groups,
        "topk_group": int(get("expert_group_used_count") or 0) or groups,
    }
    if not v3:
        cfg["topk_method"] = "group_limited_greedy" if groups and groups > 1 else "greedy"
    return cfg


def _routed_experts(get, req, norm_default: bool) -> dict:
    """The DeepSeek-style routed and shared experts' keys DeepSeek-V2/V3 and GLM-4.5 share."""
    return {
        "n_routed_experts": int(req("expert_count")),
        "n_shared_experts": int(get("expert_shared_count", 0)),
        "moe_intermediate_size": int(req("expert_feed_forward_length")),
        "intermediate_size": int(req("feed_forward_length")),
        "first_k_dense_replace": int(get("leading_dense_block_count", 0)),
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(get("expert_weights_norm", norm_default)),
    }


def _glm4moe(get, req, cfg: dict, shapes: dict) -> dict:
    """GLM-4.5 (GGUF glm4moe, llama.cpp's LLM_ARCH_GLM4_MOE): DeepSeek-V3's routing (sigmoid scores, the bias
    exp_probs_b) with plain attention rotating the first rope.dimension_count features of each head. The converter
    counts the multi-token-prediction layers in block_count (nextn_predict_layers, the last blocks); cadenza does not
    run them, and their tensors are neither expected nor read."""
    head_dim = int(get("attention.key_length") or cfg["hidden_size"] // cfg["num_attention_heads"])
    nextn = int(get("nextn_predict_layers") or 0)
    groups = int(get("expert_group_count") or 1)
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "num_hidden_layers": cfg["num_hidden_layers"] - nextn,
        "num_nextn_predict_layers": nextn,
        "head_dim": head_dim,
        "partial_rotary_factor": int(get("rope.dimension_count") or head_dim // 2) / head_dim,
        **_routed_experts(get, req, norm_default=False),  # llama.cpp's default when the key is absent
        "n_group": groups,
        "topk_group": int(get("expert_group_used_count") or groups),
        "use_qk_norm": "blk.0.attn_q_norm.weight" in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
    }


def _require_sigmoid(get, arch: str, model: str, source: str) -> None:
    """A family whose router is always a sigmoid: a file whose expert_gating_func says otherwise is refused."""
    gating = get("expert_gating_func")
    if gating not in (None, 2):
        raise CadenzaError(
            f"{source} says {arch}.expert_gating_func={gating}; {model}'s router is a sigmoid (2). The file was "
            "converted from another model or by a broken converter: convert the model again with llama.cpp."
        )


def _minimax_m2(get, req, cfg: dict, source: str) -> dict:
    """MiniMax-M2 (GGUF minimax-m2, llama.cpp's LLM_ARCH_MINIMAX_M2): Mixtral's block names, q/k norms over the whole
    projection, rope.dimension_count rotary features of each head, and a sigmoid router with the bias exp_probs_b.
    Converters that write expert_gating_func write 2 (sigmoid); one that says otherwise describes another model."""
    head_dim = int(get("attention.key_length") or cfg["hidden_size"] // cfg["num_attention_heads"])
    _require_sigmoid(get, "minimax-m2", "MiniMax-M2", source)
    return {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        "num_local_experts": int(req("expert_count")),
        "intermediate_size": int(get("expert_feed_forward_length") or req("feed_forward_length")),
        "head_dim": head_dim,
        "partial_rotary_factor": int(get("rope.dimension_count") or head_dim) / head_dim,
    }


def _dots1(get, req, cfg: dict, shapes: dict, source: str) -> dict:
    """dots.llm1 (GGUF dots1, llama.cpp's LLM_ARCH_DOTS1): Qwen3's attention (per-head q/k norms) with DeepSeek-V3's
    routed and shared experts and its sigmoid router (expert_gating_func 2; the converter refuses any other)."""
    _require_sigmoid(get, "dots1", "dots.llm1", source)
    return {
        "architectures": ["Dots1ForCausalLM"],
        "model_type": "dots1",
        "head_dim": int(get("attention.key_length") or cfg["hidden_size"] // cfg["num_attention_heads"]),
        **_routed_experts(get, req, norm_default=False),
        "n_group": int(get("expert_group_count") or 1),
        "topk_group": int(get("expert_group_used_count") or get("expert_group_count") or 1),
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "sliding_window": None,  # llama.cpp's dots1 attends to the whole context in every layer
    }


def _qwen3next(get, req, cfg: dict, shapes: dict, arch: str) -> dict:
    """Qwen3-Next (GGUF qwen3next) and Qwen3.5 MoE's text model (qwen35moe): the DeltaNet's sizes in ssm.* keys
    (group_count: key heads, time_step_rank: value heads, state_size: the key head dim, inner_size: all value
    features), a full-attention layer every full_attention_interval, a quarter of each attention head rotary
    (rope.dimension_count), every layer routed with renormalised top-k weights (llama.cpp hard-codes both). Qwen3.5's
    multimodal rope sections (rope.dimension_sections) are the ordinary rotary for text. A converter that exports the
    multi-token-prediction block counts it in block_count (nextn_predict_layers); it is neither expected nor read."""
    head_dim = int(get("attention.key_length") or cfg["hidden_size"] // cfg["num_attention_heads"])
    v_heads, moe_ff = int(req("ssm.time_step_rank")), int(req("expert_feed_forward_length"))
    return {
        "architectures": ["Qwen3NextForCausalLM" if arch == "qwen3next" else "Qwen3_5MoeForCausalLM"],
        "model_type": "qwen3_next" if arch == "qwen3next" else "qwen3_5_moe_text",
        "num_hidden_layers": cfg["num_hidden_layers"] - int(get("nextn_predict_layers") or 0),
        "num_experts": int(req("expert_count")),
        "moe_intermediate_size": moe_ff,
        "intermediate_size": int(get("feed_forward_length") or moe_ff),
        "shared_expert_intermediate_size": _shared_ff(get, shapes),
        "head_dim": head_dim,
        "partial_rotary_factor": int(get("rope.dimension_count") or head_dim // 4) / head_dim,
        "linear_conv_kernel_dim": int(req("ssm.conv_kernel")),
        "linear_key_head_dim": int(req("ssm.state_size")),
        "linear_num_key_heads": int(req("ssm.group_count")),
        "linear_num_value_heads": v_heads,
        "linear_value_head_dim": int(req("ssm.inner_size")) // v_heads,
        "full_attention_interval": int(get("full_attention_interval") or 4),
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "attention_bias": any(n.endswith("attn_q.bias") for n in shapes),
    }


def _shared_ff(get, shapes: dict) -> int:
    """The Qwen MoE shared expert's width: its metadata key, or (older files) its gate's rows."""
    return int(get("expert_shared_feed_forward_length") or shapes.get("blk.0.ffn_gate_shexp.weight", (0,))[0])


def _rope_scaling(get) -> dict | None:
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    out: dict = {"rope_type": kind, "factor": float(get("rope.scaling.factor", 1.0))}
    if get("rope.scaling.original_context_length"):
        out["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    if kind == "yarn" and get("rope.scaling.yarn_log_multiplier"):
        # llama.cpp's converter stores 0.1 * mscale_all_dim (DeepSeek's YaRN attention scale)
        m = float(get("rope.scaling.yarn_log_multiplier")) / 0.1
        out.update(mscale=m, mscale_all_dim=m)
    return out
