"""Random GGUF blocks of each kept type (cadenza.bench.gguf_quants.random_blocks) and gguf-py's reading of them."""

import numpy as np
import torch

from cadenza.bench.gguf_quants import random_blocks

__all__ = ["random_blocks", "reference"]


def reference(qtype: str, raw: np.ndarray) -> torch.Tensor:
    """gguf-py's dequantized weights, fp32 [rows, cols]."""
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32))
