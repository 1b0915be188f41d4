"""Test helper: an HF checkpoint folder written as a GGUF file, as llama.cpp's converter lays it out.

Tensor names come from gguf-py's own `TensorNameMap` (HF -> GGUF), not from cadenza's table, so a wrong entry in
either shows; experts are stacked per layer; the llama arch's q/k rows are interleaved per head as the converter
does. `qtype` quantizes every matrix whose rows split into whole blocks with `gguf.quants.quantize`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ARCH = {
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "olmoe": "olmoe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "gpt_oss": "gpt-oss",
    "glm4_moe": "glm4moe",
    "minimax_m2": "minimax-m2",
    "glm4_moe_lite": "deepseek2",  # GLM-4.7-Flash
    "dots1": "dots1",  # GLM-4.7-Flash (above): llama.cpp converts it as DeepSeek's MLA architecture
    "qwen3_next": "qwen3next",
    "qwen3_5_moe": "qwen35moe",
    "qwen3_5_moe_text": "qwen35moe",
}


def _theta(cfg: dict) -> float:
    return float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def metadata(cfg: dict) -> dict:
    """{arch}.* keys (without the prefix) as llama.cpp's converter writes them for this config."""
    mt = cfg["model_type"]
    if mt in ("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text"):
        return _qwen3next_metadata({**cfg, **(cfg.get("text_config") or {})})
    heads = cfg["num_attention_heads"]
    m = {
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"],
        "attention.head_count": heads,
        "attention.head_count_kv": cfg.get("num_key_value_heads") or heads,
        "attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        "rope.freq_base": _theta(cfg),
        "expert_used_count": cfg["num_experts_per_tok"],
        "vocab_size": cfg["vocab_size"],
    }
    if mt == "mixtral":
        m.update(feed_forward_length=cfg["intermediate_size"], expert_count=cfg["num_local_experts"])
        m["rope.dimension_count"] = cfg["hidden_size"] // heads
    elif mt in ("qwen2_moe", "qwen3_moe"):
        m.update(
            expert_count=(cfg.get("num_experts") or cfg["num_local_experts"]),
            expert_feed_forward_length=cfg["moe_intermediate_size"],
        )
        m["feed_forward_length"] = cfg["intermediate_size"]
        if mt == "qwen2_moe":
            m["expert_shared_feed_forward_length"] = cfg["shared_expert_intermediate_size"]
        else:
            m["attention.key_length"] = m["attention.value_length"] = cfg["head_dim"]
    elif mt == "olmoe":
        m.update(
            expert_count=(cfg.get("num_experts") or cfg["num_local_experts"]),
            feed_forward_length=cfg["intermediate_size"],
        )
    elif mt == "gpt_oss":
        m.update(expert_count=cfg["num_local_experts"], expert_feed_forward_length=cfg["intermediate_size"])
        m.update({"attention.key_length": cfg["head_dim"], "attention.value_length": cfg["head_dim"]})
        m["attention.sliding_window"] = cfg["sliding_window"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type") == "yarn":
            m.update({"rope.scaling.type": "yarn", "rope.scaling.factor": float(rope["factor"])})
            m["rope.scaling.original_context_length"] = rope["original_max_position_embeddings"]
    elif mt == "glm4_moe":  # llama.cpp's Glm4MoeModel.set_gguf_parameters
        nextn = cfg.get("num_nextn_predict_layers") or 0
        m.update(_sigmoid_moe(cfg), block_count=cfg["num_hidden_layers"] + nextn, nextn_predict_layers=nextn)
        m["rope.dimension_count"] = int(cfg["head_dim"] * cfg.get("partial_rotary_factor", 0.5))
    elif mt == "dots1":  # llama.cpp's Dots1Model.set_gguf_parameters (Qwen2MoeModel's keys, then DeepSeek's)
        m.update(_sigmoid_moe(cfg))
    elif mt == "minimax_m2":  # llama.cpp's MiniMaxM2Model.set_gguf_parameters (a newer one adds the gating func)
        m.update(expert_count=cfg["num_local_experts"], feed_forward_length=cfg["intermediate_size"])
        m.update(expert_feed_forward_length=cfg["intermediate_size"], expert_gating_func=2)
        m.update({"attention.key_length": cfg["head_dim"], "attention.value_length": cfg["head_dim"]})
        partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
        m["rope.dimension_count"] = cfg.get("rotary_dim") or int(cfg["head_dim"] * partial)
    else:  # deepseek (and GLM-4.7-Flash, whose dense layers mlp_layer_types names: the leading ones)
        v3 = mt in ("deepseek_v3", "glm4_moe_lite")
        dense = cfg.get("first_k_dense_replace")
        if dense is None:
            dense = next((i for i, t in enumerate(cfg["mlp_layer_types"]) if t != "dense"), cfg["num_hidden_layers"])
        m.update(
            expert_count=cfg["n_routed_experts"],
            expert_feed_forward_length=cfg["moe_intermediate_size"],
            feed_forward_length=cfg["intermediate_size"],
            expert_shared_count=cfg["n_shared_experts"],
            leading_dense_block_count=dense,
            expert_weights_scale=float(cfg["routed_scaling_factor"]),
            expert_weights_norm=bool(cfg["norm_topk_prob"]),
            expert_gating_func=2 if v3 else 1,
        )
        m["attention.kv_lora_rank"] = cfg["kv_lora_rank"]
        if cfg.get("q_lora_rank"):
            m["attention.q_lora_rank"] = cfg["q_lora_rank"]
        m["attention.key_length"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        m["attention.value_length"] = cfg["v_head_dim"]
        m["rope.dimension_count"] = cfg["qk_rope_head_dim"]
        if v3 and cfg.get("n_group"):
            m.update(expert_group_count=cfg["n_group"], expert_group_used_count=cfg["topk_group"])
    return m


def _sigmoid_moe(cfg: dict) -> dict:
    """The keys GLM-4.5's and dots.llm1's converters write alike: DeepSeek-V3-style routed and shared experts with a
    sigmoid router, and the attention's head dim."""
    return {
        "expert_count": cfg["n_routed_experts"],
        "expert_feed_forward_length": cfg["moe_intermediate_size"],
        "feed_forward_length": cfg["intermediate_size"],
        "expert_shared_count": cfg["n_shared_experts"],
        "leading_dense_block_count": cfg["first_k_dense_replace"],
        "expert_gating_func": 2,
        "expert_weights_scale": float(cfg["routed_scaling_factor"]),
        "expert_weights_norm": bool(cfg["norm_topk_prob"]),
        "attention.key_length": cfg["head_dim"],
        "attention.value_length": cfg["head_dim"],
    }


def _qwen3next_metadata(cfg: dict) -> dict:
    """llama.cpp's Qwen3NextModel.set_gguf_parameters (Qwen3.5's converter runs the same; partial_rotary_factor is
    looked up at the top level, so Qwen3.5's, inside rope_parameters, falls back to 0.25, the same value)."""
    head_dim = cfg["head_dim"]
    m = {
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"],
        "attention.head_count": cfg["num_attention_heads"],
        "attention.head_count_kv": cfg["num_key_value_heads"],
        "attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        "rope.freq_base": _theta(cfg),
        "expert_count": cfg["num_experts"],
        "expert_used_count": cfg["num_experts_per_tok"],
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "expert_feed_forward_length": cfg["moe_intermediate_size"],
        "expert_shared_feed_forward_length": cfg["shared_expert_intermediate_size"],
        "ssm.conv_kernel": cfg["linear_conv_kernel_dim"],
        "ssm.state_size": cfg["linear_key_head_dim"],
        "ssm.group_count": cfg["linear_num_key_heads"],
        "ssm.time_step_rank": cfg["linear_num_value_heads"],
        "ssm.inner_size": cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"],
        "full_attention_interval": cfg.get("full_attention_interval", 4),
        "rope.dimension_count": int(head_dim * cfg.get("partial_rotary_factor", 0.25)),
        "vocab_size": cfg["vocab_size"],
    }
    if cfg.get("intermediate_size"):
        m["feed_forward_length"] = cfg["intermediate_size"]
    return m


def _qwen3next_as_converted(sd: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """llama.cpp's Qwen3NextModel.modify_tensors (and, for Qwen3.5, _LinearAttentionVReorderBase's first): the
    multimodal prefix and the vision / MTP tensors dropped; Qwen3.5's DeltaNet value heads from grouped to tiled order;
    A stored as -exp(A_log), dt_bias renamed dt_proj.bias, the convolution squeezed, every norm but the DeltaNet's
    stored as 1 + weight; Qwen3-Next's in_proj_qkvz split into all q, k, v rows (attn_qkv) and all z rows
    (attn_gate)."""
    text = {**cfg, **(cfg.get("text_config") or {})}
    nk, dk = text["linear_num_key_heads"], text["linear_key_head_dim"]
    nv, dv = text["linear_num_value_heads"], text["linear_value_head_dim"]
    tiles = cfg["model_type"] != "qwen3_next" and nv != nk

    def tile(w: np.ndarray, axis: int, start: int, width: int) -> np.ndarray:  # grouped (g * r + j) -> j * nk + g
        w = np.moveaxis(w, axis, 0)
        heads = w[start:]
        heads = heads.reshape(nk, nv // nk, width, *heads.shape[1:]).swapaxes(0, 1).reshape(heads.shape)
        return np.moveaxis(np.concatenate([w[:start], heads]), 0, axis)

    out = {}
    for name, w in sd.items():
        if name.startswith(("mtp.", "model.visual.")):
            continue
        name = name.replace("model.language_model.", "model.")
        if tiles and ".linear_attn." in name:
            if name.endswith("in_proj_qkv.weight"):
                w = tile(w, 0, 2 * nk * dk, dv)
            elif name.endswith("in_proj_z.weight"):
                w = tile(w, 0, 0, dv)
            elif name.endswith(("in_proj_b.weight", "in_proj_a.weight", "A_log", "dt_bias")):
                w = tile(w, 0, 0, 1)
            elif name.endswith("conv1d.weight"):
                w = tile(w.squeeze(), 0, 2 * nk * dk, dv)
            elif name.endswith("out_proj.weight"):
                w = tile(w, 1, 0, dv)
        if name.endswith(".A_log"):
            w = -np.exp(w)
        elif name.endswith(".dt_bias"):
            name = name.replace(".dt_bias", ".dt_proj.bias")
        elif "conv1d" in name:
            w = w.squeeze()
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            w = w + 1
        if name.endswith("in_proj_qkvz.weight"):
            groups = w.reshape(nk, -1, w.shape[-1])
            q, k, v, z = np.split(groups, np.cumsum([dk, dk, nv // nk * dv]), axis=1)
            qkv = np.concatenate([x.reshape(-1, w.shape[-1]) for x in (q, k, v)])
            out[name.replace("in_proj_qkvz", "in_proj_qkv")] = qkv
            out[name.replace("in_proj_qkvz", "in_proj_z")] = np.ascontiguousarray(z.reshape(-1, w.shape[-1]))
            continue
        out[name] = np.ascontiguousarray(w)
    return out


def interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k permutation: each head's two rotary halves interleaved row by row."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, GGUF name -> float32 array in GGUF layout) for an HF folder."""
    import gguf

    cfg = json.loads((folder / "config.json").read_text())
    if "text_config" in cfg:  # (Qwen3.5's multimodal config: the converter reads the text model's keys)
        cfg = {**cfg, **cfg["text_config"]}
    sd = {k: v.float().numpy() for k, v in load_file(folder / "model.safetensors").items()}
    arch = ARCH[cfg["model_type"]]
    if arch == "gpt-oss":
        sd = _gpt_oss_as_converted(sd)
    if arch in ("qwen3next", "qwen35moe"):
        sd = _qwen3next_as_converted(sd, cfg)
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    blocks = cfg["num_hidden_layers"] + (cfg.get("num_nextn_predict_layers") or 0)
    names = gguf.get_tensor_name_map(model_arch, blocks)
    out: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, w in sd.items():
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():  # routed expert: stack per layer
            i = parts.index("experts")
            merged = ".".join(parts[: i + 1] + parts[i + 2 :])
            stacks.setdefault(merged, {})[int(parts[i + 1])] = w
            continue
        if name.endswith("e_score_correction_bias"):
            out[f"blk.{parts[2]}.exp_probs_b.bias"] = w
            continue
        g = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert g is not None, name
        if arch == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["num_attention_heads"] if "attn_q" in g else cfg["num_key_value_heads"]
            w = interleave(w, heads)
        if g.endswith("ffn_gate_inp_shexp.weight"):
            w = w.reshape(-1)  # llama.cpp keeps Qwen2-MoE's shared expert gate as a vector
        out[g] = w
    for merged, experts in stacks.items():
        out[names.get_name(merged, try_suffixes=(".weight",))] = np.stack([experts[e] for e in sorted(experts)])
    return cfg, out


def _gpt_oss_as_converted(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """gpt-oss's fused expert tensors as llama.cpp's converter splits them (the names its TensorNameMap takes):
    gate_up_proj [E, H, 2I] -> gate_proj / up_proj [E, I, H] (even / odd columns), down_proj [E, I, H] -> [E, H, I],
    the biases split the same way; the sinks get a .weight suffix."""
    out = {}
    for name, w in sd.items():
        if name.endswith("experts.gate_up_proj"):
            t = w.swapaxes(1, 2)
            out[name.replace("gate_up_proj", "gate_proj.weight")] = np.ascontiguousarray(t[:, 0::2])
            out[name.replace("gate_up_proj", "up_proj.weight")] = np.ascontiguousarray(t[:, 1::2])
        elif name.endswith("experts.gate_up_proj_bias"):
            out[name.replace("gate_up_proj_bias", "gate_proj.bias")] = np.ascontiguousarray(w[:, 0::2])
            out[name.replace("gate_up_proj_bias", "up_proj.bias")] = np.ascontiguousarray(w[:, 1::2])
        elif name.endswith("experts.down_proj"):
            out[name + ".weight"] = np.ascontiguousarray(w.swapaxes(1, 2))
        elif name.endswith("experts.down_proj_bias"):
            out[name.replace("down_proj_bias", "down_proj.bias")] = w
        elif name.endswith("self_attn.sinks"):
            out[name + ".weight"] = w
        else:
            out[name] = w
    return out


def _quantizable(name: str, w: np.ndarray, qtype) -> bool:
    import gguf

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return (
        w.ndim >= 2 and w.shape[-1] % block == 0 and "norm" not in name and "ffn_gate_inp" not in name
    ) and not name.endswith(".bias")  # gpt-oss's stacked expert biases [E, I] stay float, as the converter keeps them


def add_plain(writer, key: str, value) -> None:
    """One metadata key from a plain value: bool, int (uint32), float (float32), str, a list (tokenizer.ggml.scores
    kept float), or (value, GGUFValueType)."""
    if isinstance(value, tuple):
        writer.add_key_value(key, value[0], value[1])
    elif key == "tokenizer.ggml.scores":
        writer.add_array(key, [float(x) for x in value])  # add_array picks a type per value: keep them float
    elif isinstance(value, list):
        writer.add_array(key, value)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, value)


def write_gguf(
    folder: Path, out: Path, qtype: str = "F32", extra: dict | None = None, drop: tuple = (), split_kv_b: bool = False,
    tensors: dict | None = None,
) -> Path:  # fmt: skip
    """The HF checkpoint in `folder` as a GGUF file `out`; matrices in `qtype` (F32, F16, Q8_0, Q4_0, ...).
    extra: more metadata keys (full names), as (value, GGUFValueType) or plain values (str, int, bool, lists, e.g.
    tokenizer.ggml.*); drop: GGUF tensor names to leave out; split_kv_b: DeepSeek's attn_kv_b written as newer
    converters do, split into attn_k_b [H, lora, nope] (transposed) and attn_v_b [H, v, lora]; tensors: more GGUF
    tensors (name -> array in GGUF layout), as an older or newer converter writes them."""
    import gguf

    cfg, converted = gguf_tensors(folder)
    tensors = {**converted, **(tensors or {})}
    if split_kv_b:
        for name in [n for n in tensors if n.endswith("attn_kv_b.weight")]:
            kv_b = tensors.pop(name)
            heads, nope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"]
            per_head = kv_b.reshape(heads, -1, kv_b.shape[-1])
            tensors[name.replace("attn_kv_b", "attn_k_b")] = np.ascontiguousarray(per_head[:, :nope].swapaxes(1, 2))
            tensors[name.replace("attn_kv_b", "attn_v_b")] = np.ascontiguousarray(per_head[:, nope:])
    arch = ARCH[cfg["model_type"]]
    w = gguf.GGUFWriter(out, arch)
    extra = dict(extra or {})
    for k, v in metadata(cfg).items():
        if f"{arch}.{k}" not in extra:  # (a key in extra replaces the converter's value)
            add_plain(w, f"{arch}.{k}", v)
    for key in ("eos", "bos"):  # (unless the tokenizer metadata in extra names them)
        if f"tokenizer.ggml.{key}_token_id" not in extra:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", int(cfg[f"{key}_token_id"]))
    for k, v in extra.items():
        add_plain(w, k, v)
    qt = gguf.GGMLQuantizationType[qtype]
    for name, t in tensors.items():
        if name in drop:
            continue
        if qtype == "F32" or not _quantizable(name, t, qt):
            w.add_tensor(name, t.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def dequantized_folder(folder: Path, out: Path, qtype: str) -> Path:
    """The HF folder with every matrix `write_gguf` would quantize replaced by gguf.quants' round trip of it: the
    reference a GGUF in `qtype` must equal. Blocks run along rows, so the q/k row interleave commutes with it."""
    import gguf

    qt = gguf.GGMLQuantizationType[qtype]
    out.mkdir(parents=True, exist_ok=True)
    sd = load_file(folder / "model.safetensors")
    ref = {}
    for name, t in sd.items():
        a = t.float().numpy()
        if _quantizable(name.replace("gate.weight", "ffn_gate_inp"), a, qt) and "layernorm" not in name:
            a = gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt)
        ref[name] = torch.from_numpy(np.ascontiguousarray(a))
    save_file(ref, out / "model.safetensors")
    for f in folder.iterdir():  # config.json, tokenizer files
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def rewrite_gguf(src: Path, out: Path, edit) -> Path:
    """The GGUF file `src` written again as `out` with its metadata and `edit(tensors)`'s tensors: `tensors` maps
    each name to (stored array, GGMLQuantizationType) in file order (block types as their raw bytes, [..., rows,
    bytes a row]); edit returns the map to write."""
    import gguf

    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, field.contents())
        else:
            w.add_key_value(field.name, field.contents(), field.types[0])
    tensors = {t.name: (np.asarray(t.data), t.tensor_type) for t in reader.tensors}
    for name, (data, qtype) in edit(tensors).items():
        plain = qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        w.add_tensor(name, data) if plain else w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def fuse_gate_up(src: Path, out: Path) -> Path:
    """`src` as llama.cpp's converter writes it with --fuse-gate-up-exps: each layer's ffn_gate_exps and ffn_up_exps
    as one ffn_gate_up_exps, each expert's gate rows, then its up rows (the same blocks, moved)."""

    def edit(tensors: dict) -> dict:
        fused = {}
        for name, (data, qtype) in tensors.items():
            if name.endswith("ffn_up_exps.weight"):
                continue
            if name.endswith("ffn_gate_exps.weight"):
                up = tensors[name.replace("gate_exps", "up_exps")][0]
                name, data = name.replace("gate_exps", "gate_up_exps"), np.concatenate([data, up], axis=1)
            fused[name] = (data, qtype)
        return fused

    return rewrite_gguf(src, out, edit)
