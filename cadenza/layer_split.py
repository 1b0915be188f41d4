"""A model's decoder layers spread over several GPUs of one host (`--gpus`): which device holds each layer.

cadenza.moe.devices splits the MoE layers into contiguous blocks, one a device; here a block becomes decoder layers
(a dense layer goes with the next MoE layer's device, those after the last MoE layer with the last device), the
device of every checkpoint tensor at load (`device_of`: a decoder layer's weights on its device; the embeddings,
the final norm and the LM head on the first, where tokens enter and logits leave), and each device's MoE layers
for its Orchestra (cadenza.moe.offload.stages). The forward pass reads `DecoderModel.layer_devices` and copies the
hidden states across each boundary (cadenza.models.common); the KV cache keeps each layer's part on its device
(`Cache.place_layers`).

On a CPU-only machine the devices may all be "cpu": the same code runs, every copy a no-op (how the tests check the
split against one device).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cadenza.errors import CadenzaError
from cadenza.moe.experts import Experts

_LAYER = re.compile(r"^(.*?\.layers\.(\d+))\.")


def parse_devices(devices: Sequence[str | int | torch.device] | str) -> list[torch.device]:
    """["cuda:0", 1, "cpu"], "0,1" or "cuda:0,cuda:1" -> devices (a bare number is a CUDA index). CadenzaError for
    a name that is no device, a GPU this PyTorch does not see, or one named twice."""
    items = [s.strip() for s in devices.split(",")] if isinstance(devices, str) else list(devices)
    out: list[torch.device] = []
    for item in items:
        text = str(item)
        try:
            dev = torch.device(f"cuda:{int(text)}") if text.isdigit() or isinstance(item, int) else torch.device(text)
        except (RuntimeError, ValueError):
            raise CadenzaError(
                f"{text!r} in --gpus / devices is not a device. Give GPU numbers (--gpus 0,1) or names (cuda:0,cuda:1)."
            ) from None
        if dev.type == "cuda":
            if dev.index is None:
                raise CadenzaError(f"{text!r} in --gpus / devices names no GPU; give its number, e.g. cuda:0.")
            seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if dev.index >= seen:
                raise CadenzaError(
                    f"GPU {dev.index} was asked for (--gpus / devices), but this PyTorch sees {seen} CUDA GPU(s) "
                    f"(torch {torch.__version__}; CUDA_VISIBLE_DEVICES={_visible()}). Use numbers below {seen}."
                )
        elif dev.type != "cpu":
            raise CadenzaError(f"{text!r} in --gpus / devices is not a CUDA GPU (nor 'cpu', for tests).")
        if dev.type == "cuda" and dev in out:
            raise CadenzaError(f"GPU {dev.index} is named twice in --gpus / devices. Name each GPU once.")
        out.append(dev)
    if len(out) < 2:
        raise CadenzaError(
            f"--gpus / devices names {len(out)} device(s); a split needs two or more. For one GPU leave it out "
            "(--device cuda:N picks which)."
        )
    if len({d.type for d in out}) > 1:
        raise CadenzaError("--gpus / devices mixes CUDA GPUs and the CPU; name GPUs only.")
    return out


def split_devices(devices, device, kv_cache: str) -> list[torch.device]:
    """LLM's devices (several GPUs) checked against its other options; [] without a split."""
    if devices is None:
        return []
    out = parse_devices(devices)
    want = torch.device(device) if str(device) != "auto" else out[0]
    if want.type != out[0].type or want.index not in (None, out[0].index):
        raise CadenzaError(
            f"device={device!r} and devices={[str(d) for d in out]} disagree: with several GPUs the first holds "
            "the embeddings and takes the tokens. Leave device out (or 'auto')."
        )
    if kv_cache != "gpu":
        raise CadenzaError(
            "kv_cache='host' (--kv-cache host) with several GPUs is not supported: each GPU keeps its layers' KV "
            "cache. Use --kv-cache gpu, or one GPU."
        )
    return out


def _visible() -> str:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES", "unset")


def layer_devices(model: nn.Module) -> list[torch.device] | None:
    """The devices of a causal LM's decoder layers where they are split over several (`LayerSplit.apply`), else
    None."""
    return getattr(getattr(model, "model", None), "layer_devices", None)


def moe_positions(model: nn.Module) -> list[int]:
    """The decoder layer index of each MoE layer, in order."""
    return [i for i, layer in enumerate(model.model.layers) if any(isinstance(m, Experts) for m in layer.modules())]


@dataclass(frozen=True)
class LayerSplit:
    """devices: the GPUs in order; counts: MoE layers per device (cadenza.moe.devices' blocks); layer_devices: the
    device of each decoder layer, layer_blocks its block (the device's number in `devices`: blocks, not device
    names, mark the boundaries, so a split emulated with one device named twice still crosses between them)."""

    devices: tuple[torch.device, ...]
    counts: tuple[int, ...]
    layer_devices: tuple[torch.device, ...]
    layer_blocks: tuple[int, ...]

    @classmethod
    def of(cls, model: nn.Module, devices: Sequence[torch.device], counts: Sequence[int]) -> LayerSplit:
        moe = moe_positions(model)
        if sum(counts) != len(moe) or len(counts) != len(devices) or min(counts) < 1:
            raise ValueError(f"a split of {len(moe)} MoE layers over {len(devices)} devices, got {list(counts)}")
        layer_blocks, start = [], 0
        owner = [b for b, n in enumerate(counts) for _ in range(n)]  # per MoE layer
        for m, block in zip(moe, owner, strict=True):  # dense layers before an MoE layer go with it
            layer_blocks += [block] * (m + 1 - start)
            start = m + 1
        layer_blocks += [len(devices) - 1] * (len(model.model.layers) - start)
        layer_devices = tuple(devices[b] for b in layer_blocks)
        return cls(tuple(devices), tuple(counts), layer_devices, tuple(layer_blocks))

    @property
    def moe_ranges(self) -> list[range]:
        """Per device, the MoE layers (their ordinal among MoE layers) it holds."""
        out, first = [], 0
        for n in self.counts:
            out.append(range(first, first + n))
            first += n
        return out

    def device_of(self, name: str) -> torch.device:
        """Where the checkpoint tensor `name` goes: its decoder layer's device, else the first device."""
        match = _LAYER.match(name)
        return self.layer_devices[int(match.group(2))] if match else self.devices[0]

    def apply(self, model: nn.Module) -> None:
        """The forward pass follows the split (DecoderModel.layer_devices), and weights already placed (a GGUF's
        attention blocks kept on the first GPU, loader.keep_dense_blocks) move to their layer's device."""
        model.model.layer_devices = list(self.layer_devices)
        model.model.layer_blocks = list(self.layer_blocks)
        for name, module in model.named_modules():
            tiles = getattr(module, "tiles", None)
            if isinstance(tiles, torch.Tensor) and not tiles.is_meta:
                module.tiles = tiles.to(self.device_of(f"{name}."))

    def describe(self) -> str:
        parts = [f"{d}: MoE layers {r.start}-{r.stop - 1}" for d, r in zip(self.devices, self.moe_ranges, strict=True)]
        return "; ".join(parts)


def edge_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of what sits outside the decoder layers (embeddings, final norm, LM head; tied weights once): what the
    first device holds beyond its layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    layers = {id(p) for p in model.model.layers.parameters()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in layers or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * elem
    if (
        getattr(model.config, "tie_word_embeddings", False)
        and model.lm_head.weight is not model.model.embed_tokens.weight
    ):
        total -= model.lm_head.weight.numel() * elem  # still separate on the meta model; tied at load
    return total


def budgets_for(gpu_memory, devices: Sequence[torch.device]) -> list[int]:
    """One budget a device from gpu_memory: one size for each ("24GiB"), one per device ("24GiB,16GiB" or a
    list), or None: each GPU's free memory less a margin (cadenza.moe.offload.planning.default_budget)."""
    from cadenza.moe.offload.planning import default_budget
    from cadenza.moe.placement import parse_size

    if gpu_memory is None:
        if any(d.type != "cuda" for d in devices):
            raise CadenzaError("gpu_memory (one budget a device) is needed for emulated devices on the CPU.")
        return [default_budget(d) for d in devices]
    items = gpu_memory.split(",") if isinstance(gpu_memory, str) else gpu_memory
    items = list(items) if isinstance(items, list | tuple) else [items]
    if len(items) == 1:
        items = items * len(devices)
    if len(items) != len(devices):
        raise CadenzaError(
            f"--gpu-memory gives {len(items)} budgets for {len(devices)} GPUs. Give one size for every GPU "
            "(--gpu-memory 24GiB) or one per GPU in --gpus order (--gpu-memory 24GiB,16GiB)."
        )
    return [parse_size(s.strip() if isinstance(s, str) else s, "--gpu-memory") for s in items]
