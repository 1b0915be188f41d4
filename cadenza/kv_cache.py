"""Attention caches with slots: one row per sequence, each row with its own length.

A cache holds, per layer, a few named streams of shape [slots, heads, capacity, dim] (keys and values for ordinary
attention; MLA's compressed latent and rope key for DeepSeek). A forward pass names the slots its batch rows use
(`rows`) and each row appends at its own length, so sequences of different lengths decode together (continuous
batching), beams are reordered by copying rows (`reorder`) and a slot is recycled with `reset`.

Buffers grow in chunks (a short CPU chat does not reserve gigabytes for a 32k-token context); `reserve` allocates
the whole capacity once where the cache must never grow (under a GPU budget).

A cache may live in host memory while the model runs on a GPU (`on_host`: the offline mode's big batches, whose KV
cache would not fit the GPU): each pass's new keys and values are copied to the host as they are written, and
attention reads them there, on the CPU (`cadenza.models.attention.attend`), so only queries and outputs cross the link.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.profiler import record_function

from cadenza.errors import CadenzaError

CHUNK = 256  # tokens added to every layer's buffers when they fill
KV_COPY_SPAN = "cadenza.kv.copy"


class Cache:
    """Per layer, streams {name: [slots, heads, capacity, dim]}; `lengths[slot]` positions of a slot are filled."""

    hostable = False  # whether the cache may live in host memory (`on_host`, --kv-cache host)
    not_hostable_why = "DeepSeek's MLA keeps a compressed latent, already a fraction of the size"

    def __init__(
        self,
        num_layers: int,
        batch: int,
        streams: dict[str, tuple[int, int]],  # name -> (heads, dim)
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.num_layers, self.batch, self.streams = num_layers, batch, dict(streams)
        self.max_length, self.dtype, self.device = max_length, dtype, torch.device(device)
        self.lengths = [0] * batch
        self.capacity = 0
        self.buffers: dict[str, list[torch.Tensor]] = {name: [] for name in self.streams}
        self.compute_device = self.device  # where the model's activations are (on_host: a GPU, or the CPU too)
        self.hosted = False  # a host cache: decode attention by cadenza.models.attention.host_attention
        # per layer, the device its buffers live on: the layer's own where the layers are split over several GPUs
        # (`place_layers`), else the cache's device
        self.layer_devices = [self.device] * num_layers

    def checkpoint(self, rows: Sequence[int]):
        """Slots `rows` as they are: the returned callable puts them back, so a pass over them can be undone. Their
        lengths are enough here: a repeat of the pass rewrites its keys and values in place."""
        lengths = [(r, self.lengths[r]) for r in rows]

        def restore() -> None:
            for r, n in lengths:
                self.lengths[r] = n

        return restore

    def place_layers(self, devices: Sequence[torch.device]) -> Cache:
        """Each layer's buffers on the device that computes the layer (layers split over several GPUs,
        cadenza.layer_split); before the buffers are allocated."""
        if len(devices) != self.num_layers:
            raise ValueError(f"{len(devices)} devices for a cache of {self.num_layers} layers")
        if self.capacity:
            raise ValueError("place_layers comes before the cache's first allocation")
        self.layer_devices = [torch.device(d) for d in devices]
        return self

    def on_host(self, compute_device: torch.device) -> Cache:
        """This (CPU) cache serves a model running on `compute_device`: writes copy to the host, decode attention
        runs on the CPU where the cache is (on a CPU model too: the same path, CPU to CPU)."""
        if self.device.type != "cpu":
            raise ValueError("a host cache is made on the CPU device")
        self.compute_device = torch.device(compute_device)
        self.hosted = True
        return self

    # --- bookkeeping ---------------------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """The longest slot (for a one-sequence cache: its length)."""
        return max(self.lengths)

    @length.setter
    def length(self, value: int) -> None:
        self.lengths = [value] * self.batch

    def reserve(self) -> Cache:
        """Allocates the whole context now: under a GPU budget the cache must never grow (a growth copy would
        briefly hold two caches)."""
        self.ensure(self.max_length)
        return self

    def reset(self, slots: Sequence[int] | None = None) -> None:
        """Empties the given slots (all by default); their memory is reused."""
        for s in range(self.batch) if slots is None else slots:
            self.lengths[s] = 0

    def reorder(self, dst: Sequence[int], src: Sequence[int]) -> None:
        """Slot dst[i] becomes a copy of slot src[i] (read before any is written): beam search's reordering."""
        if list(dst) == list(src):
            return
        n = max(self.lengths[i] for i in src)
        index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # per device the buffers are on
        for bufs in self.buffers.values():
            for buf in bufs:
                if buf.device not in index:
                    index[buf.device] = (
                        torch.tensor(list(dst), device=buf.device),
                        torch.tensor(list(src), device=buf.device),
                    )
                d, s = index[buf.device]
                buf[:, :, :n].index_copy_(0, d, buf[:, :, :n].index_select(0, s))
        old = list(self.lengths)
        for i, j in zip(dst, src, strict=True):
            self.lengths[i] = old[j]

    def ensure(self, needed: int) -> bool:
        """Makes room for `needed` positions per slot (a CadenzaError past the context); True if the buffers were
        reallocated (views and CUDA graphs taken of the old ones are stale)."""
        if needed <= self.capacity:
            return False
        self._grow(needed)
        return True

    def _grow(self, needed: int) -> None:
        if needed > self.max_length:
            raise CadenzaError(
                f"The sequence reached {needed} tokens, beyond the context of {self.max_length} tokens. "
                "Shorten the prompt or lower max_tokens."
            )
        new_cap = min(self.max_length, max(needed, self.capacity + CHUNK, 2 * self.capacity))
        n = self.length
        for name, (heads, dim) in self.streams.items():
            old = self.buffers[name]
            # zeroed, not empty: masked-out positions still meet the values in the attention's product, and
            # uninitialised memory may hold NaN (0 * NaN = NaN)
            try:
                new = [
                    torch.zeros((self.batch, heads, self.layer_capacity(i, new_cap), dim), dtype=self.dtype, device=dev)
                    for i, dev in enumerate(self.layer_devices)
                ]
            except (RuntimeError, MemoryError) as exc:
                if self.device.type != "cpu" or ("alloc" not in str(exc).lower() and not isinstance(exc, MemoryError)):
                    raise
                per_token = self.nbytes_per_token()
                raise CadenzaError(
                    f"Host memory ran out growing the KV cache of {self.batch} sequences to {new_cap} tokens "
                    f"({self.batch * new_cap * per_token / 2**30:.1f} GiB; {per_token / 1024:.0f} KiB a token). "
                    "Run fewer sequences at once (--max-batch) or shorter ones (max_tokens, --max-context)."
                ) from None
            for i, buf in enumerate(old):
                new[i][:, :, :n] = buf[:, :, :n]
            self.buffers[name] = new
        self.capacity = new_cap

    # --- the write every attention layer makes ------------------------------------------------------------------

    def write(self, layer: int, name: str, x: torch.Tensor, ctx) -> torch.Tensor:
        """Appends x ([B, heads, T, dim]) to the pass's rows (`ctx.rows`, each at `ctx.starts[b]`) and returns the
        rows' filled views [B, heads, S, dim], S = the longest row after the write. Positions past a shorter row's
        end hold stale values: the pass's mask hides them."""
        t = x.shape[2]
        end = ctx.end
        self.ensure(end)
        buf = self.buffers[name][layer]
        if x.device != buf.device:  # a host cache: the pass's new positions cross the link, nothing else
            with record_function(KV_COPY_SPAN):  # (a timeline's mark: cadenza.bench.timeline)
                # through a page-locked buffer: the link's full speed (torch's host allocator keeps them)
                x = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda).copy_(x)
        if ctx.row_slice is not None:
            rows = buf[ctx.row_slice]
            if ctx.start is not None:
                rows[:, :, ctx.start : ctx.start + t] = x
            else:
                rows[ctx.index.local_t, :, ctx.index.starts_t] = x[:, :, 0]
            return rows[:, :, :end]
        if ctx.start is not None:
            buf[ctx.index.rows_t, :, ctx.start : ctx.start + t] = x
        else:
            buf[ctx.index.rows_t, :, ctx.index.starts_t] = x[:, :, 0]
        return buf[:, :, :end].index_select(0, ctx.index.rows_t)

    def advance(self, rows: Sequence[int], t: int) -> None:
        for r in rows:
            self.lengths[r] += t

    def nbytes_per_sequence(self) -> int:
        """Bytes a slot takes whatever its length (a recurrent layer's state): none for attention caches."""
        return 0

    def layer_capacity(self, layer: int, capacity: int) -> int:
        """The positions layer `layer`'s buffers hold when the cache holds `capacity` (all, unless a layer keeps
        none)."""
        return capacity

    def nbytes_per_token(self) -> int:
        """Bytes one position of one slot takes over all layers (that keep positions: `layer_capacity`)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        layers = sum(1 for i in range(self.num_layers) if self.layer_capacity(i, 1))
        return layers * sum(h * d for h, d in self.streams.values()) * elem


class KVCache(Cache):
    """Keys and values per layer, [slots, K, capacity, D] each (ordinary multi-head / grouped-query attention)."""

    hostable = True  # may live in host memory (`on_host`): ordinary keys and values the CPU's attention reads

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
        self.num_kv_heads, self.head_dim, self.v_head_dim = num_kv_heads, head_dim, v_head_dim or head_dim
        streams = {"k": (num_kv_heads, head_dim), "v": (num_kv_heads, self.v_head_dim)}
        super().__init__(num_layers, batch, streams, max_length, dtype, device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v ([B, K, T, D]) for the pass's rows and returns the filled views [B, K, S, D]."""
        return self.write(layer, "k", k, ctx), self.write(layer, "v", v, ctx)


class MLACache(Cache):
    """Multi-head latent attention's cache (DeepSeek-V2/V3): per layer only the normalised latent "kv"
    [slots, 1, capacity, kv_lora_rank] and the rotary key "pe" [slots, 1, capacity, qk_rope_head_dim], both shared
    by every head; the per-head keys and values they expand to are never stored."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim
        streams = {"kv": (1, kv_lora_rank), "pe": (1, qk_rope_head_dim)}
        super().__init__(num_layers, batch, streams, max_length, dtype, device)


class HybridCache(KVCache):
    """Keys and values for the attention layers, and per slot a fixed-size state for the linear-attention layers
    (Qwen3-Next's Gated DeltaNet, `linear_layers`): the convolution's last inputs `conv` [slots, C, K-1] and the
    recurrent state `recurrent` [slots, Hv, dk, dv] (float32), which do not grow with the sequence. A linear layer's
    key and value buffers are empty; the states live on the layer's device, made at first use."""

    hostable = False  # the states are read and written by the GPU's layers every step
    not_hostable_why = "Qwen3-Next's linear-attention layers keep a per-sequence state, not keys and values"

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
        linear_layers: Sequence[int],
        conv_shape: tuple[int, int],  # (channels, kernel - 1)
        state_shape: tuple[int, int, int],  # (value heads, key dim, value dim)
    ):
        super().__init__(num_layers, batch, num_kv_heads, head_dim, max_length, dtype, device)
        self.linear_layers = frozenset(linear_layers)
        self.conv_shape, self.state_shape = tuple(conv_shape), tuple(state_shape)
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def layer_capacity(self, layer: int, capacity: int) -> int:
        return 0 if layer in self.linear_layers else capacity  # a linear layer keeps no keys or values

    def checkpoint(self, rows: Sequence[int]):
        """Also the linear layers' states of slots `rows`: a pass run twice advances a state twice (unlike keys and
        values, which it rewrites in place), so a CUDA graph's warm-up pass must be undone."""
        lengths = super().checkpoint(rows)
        idx = {}
        saved = []
        for layer in sorted(self.linear_layers):
            for buf in self.state(layer).values():
                i = idx.setdefault(buf.device, torch.tensor(list(rows), device=buf.device))
                saved.append((buf, i, buf.index_select(0, i)))

        def restore() -> None:
            lengths()
            for buf, i, old in saved:
                buf.index_copy_(0, i, old)

        return restore

    def state(self, layer: int) -> dict[str, torch.Tensor]:
        """Linear layer `layer`'s {"conv": [slots, C, K-1], "recurrent": [slots, Hv, dk, dv]}, zeros at first."""
        if layer not in self.states:
            dev = self.layer_devices[layer]
            self.states[layer] = {
                "conv": torch.zeros((self.batch, *self.conv_shape), dtype=self.dtype, device=dev),
                "recurrent": torch.zeros((self.batch, *self.state_shape), dtype=torch.float32, device=dev),
            }
        return self.states[layer]

    def reorder(self, dst: Sequence[int], src: Sequence[int]) -> None:
        if list(dst) == list(src):
            return
        super().reorder(dst, src)
        for states in self.states.values():
            for buf in states.values():
                d, s = (torch.tensor(list(x), device=buf.device) for x in (dst, src))
                buf.index_copy_(0, d, buf.index_select(0, s))

    def nbytes_per_sequence(self) -> int:
        """Bytes one slot's linear-attention states take, whatever its length."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        c, w = self.conv_shape
        h, dk, dv = self.state_shape
        return len(self.linear_layers) * (c * w * elem + h * dk * dv * 4)
