"""Random GGUF blocks of each kept type, with sane scales, for the block-format tests (kernels and files)."""

import numpy as np
import torch

BLOCK = {"Q4_0": (32, 18), "MXFP4": (32, 17), "Q4_K": (256, 144), "Q6_K": (256, 210), "Q8_0": (32, 34)}


def _f16(rng: np.random.Generator, shape, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, shape).astype(np.float16).view(np.uint8).reshape(*shape, 2)


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """uint8 [rows, bytes per row]: random codes, scales near `scale` (so weights look like a model's)."""
    rng = np.random.default_rng(seed)
    per, size = BLOCK[qtype]
    n = (rows, cols // per)
    if qtype in ("Q4_0", "Q8_0"):
        d = _f16(rng, n, -scale / 8, scale / 8)
        q = rng.integers(0, 256, (*n, size - 2), dtype=np.uint8)
        b = np.concatenate((d, q), axis=-1)
    elif qtype == "MXFP4":
        e = rng.integers(118, 124, (*n, 1), dtype=np.uint8)
        b = np.concatenate((e, rng.integers(0, 256, (*n, 16), dtype=np.uint8)), axis=-1)
    elif qtype == "Q4_K":
        d, dmin = _f16(rng, n, 0, scale / 64), _f16(rng, n, 0, scale / 64)
        b = np.concatenate((d, dmin, rng.integers(0, 256, (*n, 140), dtype=np.uint8)), axis=-1)
    else:  # Q6_K: ql, qh, int8 scales, d
        body = rng.integers(0, 256, (*n, 192), dtype=np.uint8)
        sc = rng.integers(-64, 64, (*n, 16)).astype(np.int8).view(np.uint8)
        b = np.concatenate((body, sc, _f16(rng, n, 0, scale / 256)), axis=-1)
    return np.ascontiguousarray(b.reshape(rows, -1))


def reference(qtype: str, raw: np.ndarray) -> torch.Tensor:
    """gguf-py's dequantized weights, fp32 [rows, cols]."""
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32))
