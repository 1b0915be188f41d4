"""Synthetic full-size models: a published model's exact shapes with random bf16 weights, built in memory.

No real checkpoint can be downloaded on the benchmark box and its disk is smaller than Mixtral-8x7B, so
`SyntheticCheckpoint` stands in for `cadenza.checkpoint.Checkpoint`: same attributes, same `iter_tensors`, but
tensors come from a few random pools (one per weight scale) instead of files. Each routed expert is yielded as a view
into a pool at a seeded offset, so a 93 GB model costs one copy (the loader's, into its final storage) and ~1 GB of
pools.

Weights are scaled like trained ones so routing is not degenerate: matrices ~ N(0, 1/fan_in), which keeps every
projection's output at unit scale (router logits ~ N(0, 1), a spread-out softmax); norms are 1; embeddings small.
Random routing is still flatter than a trained model's: say so next to any result that depends on popularity.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from cadenza.bench.models import SYNTHETIC_MODELS  # re-exported: its home before cadenza.bench.models
from cadenza.checkpoint import DTYPE_NAMES, TensorInfo
from cadenza.errors import CadenzaError

EMBEDDING_STD = 0.02  # small, as trained embeddings are; the first RMSNorm rescales them anyway
MAX_POOL_ELEMENTS = 1 << 27  # 128 Mi bf16 elements (256 MiB) per scale, unless one tensor needs more
_CHUNK = 1 << 22  # pool generation unit: fixed, so the pool is the same whatever the thread count
_ALIGN = 64  # view offsets in elements (128 bytes): aligned sources keep the loader's copy vectorised


@dataclass(frozen=True)
class WeightBytes:
    """Where a model's bytes are, for bytes-per-token arithmetic (rooflines)."""

    embedding: int  # embedding table: one row is read per token, not the table
    routed_experts: int  # all routed experts, all layers
    other: int  # everything else (attention, routers, norms, shared experts, dense layers, LM head): read per token
    num_moe_layers: int
    num_experts: int  # routed experts per MoE layer
    experts_per_token: int

    @property
    def expert_bytes(self) -> int:
        """One routed expert (gate + up + down)."""
        n = self.num_moe_layers * self.num_experts
        return self.routed_experts // n if n else 0

    @property
    def active_expert_bytes_per_token(self) -> int:
        """Expert bytes one decode token reads: k distinct experts in every MoE layer, wherever they live."""
        return self.num_moe_layers * self.experts_per_token * self.expert_bytes


class SyntheticCheckpoint:
    """Duck-types `cadenza.checkpoint.Checkpoint` for a model of `SYNTHETIC_MODELS`; nothing touches the disk.

    Construction reads only shapes (instant even for 93 GB). The random pools are generated on the first
    `iter_tensors` call and kept for the next ones (a run may load the model twice: baseline, then cadenza);
    `release()` frees them. Same name and seed -> the same weights, in any process.
    """

    def __init__(self, name: str, seed: int = 0, layers: int | None = None):
        """layers: keep only the first `layers` decoder layers (a full-width model cut short, e.g. to measure
        quantization error against a bf16 copy that fits on the GPU)."""
        if name not in SYNTHETIC_MODELS:
            raise CadenzaError(f"Unknown synthetic model {name!r}. Use one of: {', '.join(sorted(SYNTHETIC_MODELS))}.")
        self.name = name if layers is None else f"{name}[:{layers}]"
        self.seed = seed
        self.path = Path(f"synthetic:{self.name}")
        self.config: dict = dict(SYNTHETIC_MODELS[name])
        if layers is not None:
            self.config["num_hidden_layers"] = layers
        self.generation_config: dict = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._expert_names: set[str] = set()
        self._moe_layers = 0
        self._collect_tensors()
        self._pools: dict[float, torch.Tensor] = {}

    # --- facts, from shapes only ---------------------------------------------------------------------------------

    def _collect_tensors(self) -> None:
        # The model itself says what it expects (the loader checks the same list), built on the meta device.
        from cadenza.loader import build_meta, expected_tensors
        from cadenza.moe.experts import Experts

        model = build_meta(self)
        expected = expected_tensors(model)
        if getattr(model.config, "tie_word_embeddings", False):
            expected.pop("lm_head.weight", None)  # a tied checkpoint does not store it
        file = Path("synthetic")
        self.tensors = {n: TensorInfo(n, tuple(shape), "BF16", file) for n, shape in expected.items()}
        experts = [(name, m) for name, m in model.named_modules() if isinstance(m, Experts)]
        self._moe_layers = len(experts)
        for name, m in experts:
            self._expert_names.update(m.checkpoint_shapes(f"{name}."))

    @property
    def architecture(self) -> str:
        return str(self.config["architectures"][0])

    def torch_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.config["torch_dtype"]]

    def bytes_by_dtype(self) -> dict[str, int]:
        return {"BF16": self.total_bytes}

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def weight_bytes(self) -> WeightBytes:
        """The model's bytes split into embedding, routed experts and the rest."""
        emb = sum(t.nbytes for n, t in self.tensors.items() if n.endswith("embed_tokens.weight"))
        experts = sum(self.tensors[n].nbytes for n in self._expert_names)
        return WeightBytes(
            embedding=emb,
            routed_experts=experts,
            other=self.total_bytes - emb - experts,
            num_moe_layers=self._moe_layers,
            num_experts=int(
                self.config.get("num_local_experts")
                or self.config.get("num_experts")
                or self.config.get("n_routed_experts")
                or 0
            ),
            experts_per_token=int(self.config.get("num_experts_per_tok") or 0),
        )

    # --- weights -------------------------------------------------------------------------------------------------

    @staticmethod
    def _scale(name: str, shape: tuple[int, ...]) -> float | None:
        """Standard deviation of a tensor's weights; None for 1-D tensors (norms are 1, biases 0)."""
        if len(shape) == 1:
            return None
        if name.endswith("embed_tokens.weight"):
            return EMBEDDING_STD
        return shape[-1] ** -0.5  # N(0, 1/fan_in): unit-scale outputs from unit-scale (normalised) inputs

    def _pool_elements(self) -> int:
        numels = [_numel(t.shape) for t in self.tensors.values() if len(t.shape) > 1]
        largest = max(numels, default=1)
        # Room for many distinct offsets even for the largest tensor; no bigger than the model needs.
        n = max(largest + largest // 8, min(MAX_POOL_ELEMENTS, sum(numels)))
        return -(-n // _CHUNK) * _CHUNK

    def _build_pools(self) -> None:
        n = self._pool_elements()
        base = torch.empty(n, dtype=torch.bfloat16)

        def fill(i: int) -> None:
            # One generator per fixed-size chunk: deterministic and parallel (normal_ releases the GIL).
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            base[i * _CHUNK : (i + 1) * _CHUNK].normal_(generator=g)

        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            list(pool.map(fill, range(n // _CHUNK)))
        scales = {self._scale(name, t.shape) for name, t in self.tensors.items()} - {None}
        # bf16 multiply of a pool is ~0.1 s; the base N(0, 1) pool is dropped once every scale has its own.
        self._pools = {s: base * s for s in sorted(scales)}

    def release(self) -> None:
        """Frees the random pools (~1 GB for a full-size model); the next `iter_tensors` regenerates them."""
        self._pools = {}

    def _tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        scale = self._scale(name, shape)
        if scale is None:
            fill = 1.0 if "norm" in name else 0.0
            return torch.full(shape, fill, dtype=torch.bfloat16)
        pool = self._pools[scale]
        n = _numel(shape)
        # str seeds hash with SHA-512 in random.Random: the same offset in every process (unlike hash()).
        rng = random.Random(f"{self.seed}:{name}")
        off = rng.randrange((pool.numel() - n) // _ALIGN + 1) * _ALIGN
        return pool[off : off + n].view(shape)

    def iter_tensors(self, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, bf16 tensor). Routed experts are read-only views into shared pools (the loader copies
        them into their stacked storage); the other tensors are fresh copies, because a loader may keep a CPU
        tensor as it is, and pool views overlap: aliased weights would share bytes (and cache lines)."""
        for name in self.tensors:
            if names is None or name in names:
                yield name, self.tensor(name)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, as `iter_tensors` yields it, without walking the others (a writer that wants them in its
        own order, e.g. a GGUF file's, asks by name)."""
        if not self._pools:
            self._build_pools()
        shape = self.tensors[name].shape
        t = self._tensor(name, shape)
        return t if name in self._expert_names or len(shape) == 1 else t.clone()

    def is_routed_expert(self, name: str) -> bool:
        return name in self._expert_names


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
