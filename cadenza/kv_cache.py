"""Key/value cache: per layer one buffer for keys and one for values, grown in chunks up to the context limit.

Growing in chunks (rather than allocating the whole context up front) keeps a short CPU chat from reserving
gigabytes for a 32k-token context; a fixed `capacity` gives static buffers where those are needed.
"""

from __future__ import annotations

import torch

from cadenza.errors import CadenzaError

CHUNK = 256  # tokens added to every layer's buffers when they fill


class KVCache:
    """Buffers [B, K, capacity, D] per layer; `length` positions of them are filled."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
        v_head_dim: int | None = None,
    ):
        self.num_layers, self.batch, self.num_kv_heads = num_layers, batch, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.max_length, self.dtype, self.device = max_length, dtype, torch.device(device)
        self.length = 0
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def reserve(self) -> KVCache:
        """Allocates the whole context now: under a GPU budget the cache must never grow (a growth copy would
        briefly hold two caches)."""
        if self.capacity < self.max_length:
            self._grow(self.max_length)
        return self

    def reset(self) -> None:
        self.length = 0

    def _grow(self, needed: int) -> None:
        if needed > self.max_length:
            raise CadenzaError(
                f"The sequence reached {needed} tokens, beyond the context of {self.max_length} tokens. "
                "Shorten the prompt or lower max_tokens."
            )
        new_cap = min(self.max_length, max(needed, self.capacity + CHUNK, 2 * self.capacity))
        shape_k = (self.batch, self.num_kv_heads, new_cap, self.head_dim)
        shape_v = (self.batch, self.num_kv_heads, new_cap, self.v_head_dim)
        new_k = [torch.empty(shape_k, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_v = [torch.empty(shape_v, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for i in range(len(self.k)):
            new_k[i][:, :, : self.length] = self.k[i][:, :, : self.length]
            new_v[i][:, :, : self.length] = self.v[i][:, :, : self.length]
        self.k, self.v, self.capacity = new_k, new_v, new_cap

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v ([B, K, T, D]) at positions start..start+T and returns the filled views [B, K, start+T, D]."""
        end = start + k.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def nbytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * self.batch * self.num_kv_heads * (self.head_dim + self.v_head_dim) * elem
