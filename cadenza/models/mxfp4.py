"""MXFP4 (OCP microscaling, 4-bit): blocks of 32 e2m1 values sharing one e8m0 exponent, as gpt-oss publishes its
experts. Two values per byte, the low nibble first; a nibble is sign (bit 3) and one of eight magnitudes; the block's
scale byte s means 2^(s - 127). Every MXFP4 value is exact in bf16 and float32, so dequantizing loses nothing."""

from __future__ import annotations

import torch

# the e2m1 magnitudes of nibbles 0..7; nibbles 8..15 are the same, negative
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLOCK = 32


def e2m1_table(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=dtype, device=device)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G * 32] in `dtype` (exact)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)}")
    lut = e2m1_table(torch.float32, blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)  # [..., G, 16, 2]
    values = values.flatten(-2)  # [..., G, 32]: byte j holds values 2j (low nibble) and 2j + 1
    exponents = scales.to(torch.int32) - 127
    out = values * torch.exp2(exponents.float())[..., None]  # a power of two: exact
    return out.flatten(-2).to(dtype)
