"""llama.cpp's converter's value transforms, undone as a GGUF tensor is read (`GgufTensorInfo.fixes`).

The converter (convert_hf_to_gguf.py) changes some tensors' values or layout to suit llama.cpp's graphs; the reader
puts them back as the HF checkpoint has them, so cadenza's families take GGUF and HF folders alike:

- "kv_b": DeepSeek's kv_b_proj from newer converters' split form: attn_k_b [H, lora, nope] (the key rows,
  transposed) and `also` attn_v_b [H, v, lora] -> [H (nope + v), lora].
- "centred": Qwen3-Next's and Qwen3.5's zero-centred norms multiply by 1 + weight; the file stores 1 + weight.
- "a_log": the DeltaNet's decay rate: the file stores A = -exp(A_log).
- "conv": the DeltaNet's convolution [C, K], stored without HF's middle axis of 1.
- "qkvz": Qwen3-Next's in_proj_qkvz, which HF groups per key head ([q, k, v, z] of each group's heads), stored as
  attn_qkv (all q rows, then all k, then all v) and `also` attn_gate (all z rows), each still in group order.
- "v_rows", "v_heads", "v_scalars", "v_cols": Qwen3.5's converter moves the DeltaNet's value heads from grouped
  order (head g * r + j: key head g's j-th value head) to tiled order (j * key_heads + g), in the rows after q and k
  (v_rows: attn_qkv, the convolution's channels), in all rows (v_heads: attn_gate; v_scalars: one row a head,
  ssm_beta, ssm_alpha, ssm_a, ssm_dt) or in the columns (v_cols: ssm_out). Only llama.cpp's arch name tells: no
  metadata key says the heads were moved.

Fixes run in the order listed, on float32 (or the file's float) values.
"""

from __future__ import annotations

import torch


def fixed_shape(fixes: tuple[str, ...], shape: tuple[int, ...], also: tuple[int, ...] | None) -> tuple[int, ...]:
    """The HF shape of a tensor stored with `shape` (outermost first); `also`: the second tensor's shape."""
    if "kv_b" in fixes:
        (heads, lora, nope), v_dim = shape, also[1]
        return (heads * (nope + v_dim), lora)
    if "qkvz" in fixes:
        return (shape[0] + also[0], shape[1])
    if "conv" in fixes:
        return (shape[0], 1, shape[1])
    return shape


def undo(fixes: tuple[str, ...], t: torch.Tensor, also: torch.Tensor | None, cfg: dict) -> torch.Tensor:
    """The HF tensor from the stored `t` (and `also`); cfg: the model's config.json equivalent."""
    for fix in fixes:
        if fix == "kv_b":  # [H, lora, nope] and [H, v, lora] -> [H (nope + v), lora]
            t = torch.cat((t.transpose(1, 2), also.reshape(t.shape[0], -1, t.shape[1])), dim=1)
        elif fix == "centred":
            t = t.float() - 1.0
        elif fix == "a_log":
            t = torch.log(-t.float())
        elif fix == "conv":
            t = t.reshape(t.shape[0], 1, t.shape[1])
        elif fix == "qkvz":
            t = _qkvz(t, also, cfg)
        else:
            t = _untile(fix, t, cfg)
    return t


def _qkvz(qkv: torch.Tensor, z: torch.Tensor, cfg: dict) -> torch.Tensor:
    nk, dk = cfg["linear_num_key_heads"], cfg["linear_key_head_dim"]
    h = qkv.shape[-1]
    q, k, v = qkv.split([nk * dk, nk * dk, qkv.shape[0] - 2 * nk * dk])
    per_group = [x.reshape(nk, -1, h) for x in (q, k, v, z)]
    return torch.cat(per_group, dim=1).reshape(-1, h)


def _untile(fix: str, t: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Qwen3.5's value heads back from tiled to grouped order (see the module docstring)."""
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    if nv == nk:  # one value head a key head: both orders are the same
        return t
    width = 1 if fix == "v_scalars" else cfg["linear_value_head_dim"]
    dim = 1 if fix == "v_cols" else 0
    start = 2 * nk * cfg["linear_key_head_dim"] if fix == "v_rows" else 0
    heads = t.narrow(dim, start, nv * width).movedim(dim, 0)  # [j * nk + g, ...]
    grouped = heads.reshape(nv // nk, nk, width, *heads.shape[1:]).transpose(0, 1).reshape(heads.shape)
    return torch.cat((t.narrow(dim, 0, start), grouped.movedim(0, dim)), dim=dim)
