"""A Hugging Face checkpoint folder as users download it: config.json plus safetensors shards.

Sizes come from the safetensors headers (the first 8 + N bytes of each file) before any tensor is read, so the
planner and `cadenza info` know the model without touching its weights. Tensors are then read shard by shard.
Block-quantized fp8 weights (DeepSeek-V3's published format, `BlockFP8`) are dequantized as they are read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cadenza.errors import CadenzaError

# safetensors dtype tags -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
if hasattr(torch, "float8_e8m0fnu"):  # power-of-two block scales ("scale_fmt": "ue8m0")
    SAFETENSORS_DTYPES["F8_E8M0"] = (torch.float8_e8m0fnu, 1)
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors tag, e.g. "BF16"
    file: Path

    @property
    def nbytes(self) -> int:
        n = SAFETENSORS_DTYPES[self.dtype][1] if self.dtype in SAFETENSORS_DTYPES else 1
        for d in self.shape:
            n *= d
        return n


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Reads only the JSON header of a .safetensors file, and checks that the file is as long as the header says
    (an interrupted download leaves a file that ends early: refused here, naming the file, not at the first read)."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            size = os.fstat(f.fileno()).st_size
        infos, end = {}, 0
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            infos[name] = TensorInfo(name, tuple(meta["shape"]), meta["dtype"], file)
            end = max(end, int(meta["data_offsets"][1]))
    except (OSError, ValueError, TypeError, KeyError, IndexError) as e:
        raise CadenzaError(
            f"{file} is not a readable safetensors file ({e}). The download may be incomplete or corrupt: "
            "download this file again from the model's repository."
        ) from None
    expected = 8 + n + end
    if size != expected:
        how = (
            "is truncated: the download was probably interrupted"
            if size < expected
            else "is longer than its header says: it is damaged or was written by something else"
        )
        raise CadenzaError(
            f"{file} {how}. Its header says the file holds {expected:,} bytes, but it has {size:,}. Download this "
            "file again from the model's repository (delete it first if your download tool only resumes)."
        )
    return infos


class TensorSizes:
    """Sizes read from a checkpoint's table of tensors (`self.tensors`: name -> an entry with dtype and nbytes),
    whatever the file format."""

    tensors: dict
    hub_id = None  # the Hugging Face id (cadenza.hub.HubId) it was opened by, None for a local path

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return out

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class Checkpoint(TensorSizes):
    """An HF model folder: `config.json`, `model.safetensors` or shards listed in `model.safetensors.index.json`,
    and `generation_config.json` when present. Opening it reads only JSON and safetensors headers."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise CadenzaError(
                f"Model folder {self.path} does not exist. Pass --model the folder that holds config.json and the "
                "*.safetensors files (for example the folder `huggingface-cli download` created)."
            )
        if not self.path.is_dir():
            raise CadenzaError(
                f"{self.path} is a file, not a model folder or a .gguf file. Pass --model the folder that holds "
                "config.json and the *.safetensors files, or a GGUF model file (NAME.gguf)."
            )
        self.config = self._read_json("config.json", required=True)
        self.generation_config = self._read_json("generation_config.json", required=False) or {}
        self.tensors = self._read_headers()

    def _read_json(self, name: str, required: bool) -> dict | None:
        file = self.path / name
        if not file.exists():
            if required:
                raise CadenzaError(
                    f"No {name} in {self.path}. A Hugging Face model folder has config.json next to its "
                    "*.safetensors files: download the whole repository, not only the weights."
                )
            return None
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise CadenzaError(
                f"{file} is not valid JSON ({e}). Download it again from the model's repository."
            ) from None
        if not isinstance(data, dict):
            raise CadenzaError(f"{file} should hold a JSON object. Download it again from the model's repository.")
        return data

    def _read_headers(self) -> dict[str, TensorInfo]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            weight_map = (self._read_json(index.name, required=True) or {}).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CadenzaError(f"{index} has no weight_map. Download it again from the model's repository.")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).exists()]
            if missing:
                raise CadenzaError(
                    f"{len(missing)} of the {len(files)} weight shards listed in {index.name} are missing from "
                    f"{self.path}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. The download is "
                    "incomplete: download the missing files (re-running the download resumes it)."
                )
            tensors: dict[str, TensorInfo] = {}
            for f in files:
                tensors.update(read_safetensors_header(self.path / f))
            absent = [n for n, f in weight_map.items() if n not in tensors]
            if absent:
                raise CadenzaError(
                    f"{len(absent)} tensors listed in {index.name} are not in their shard (first: {absent[0]} in "
                    f"{weight_map[absent[0]]}). That shard is corrupt or from another version: download it again."
                )
            return tensors
        if single.exists():
            return read_safetensors_header(single)
        others = sorted(p.name for p in self.path.glob("*.safetensors"))
        if others:
            tensors = {}
            for f in others:
                tensors.update(read_safetensors_header(self.path / f))
            return tensors
        bins = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
        hint = (
            f" The folder has PyTorch pickle weights ({bins[0]}); cadenza reads only safetensors: download the "
            "repository's *.safetensors files instead."
            if bins
            else " Download the repository's *.safetensors files (and model.safetensors.index.json when sharded)."
        )
        raise CadenzaError(f"No safetensors weights in {self.path}.{hint}")

    # --- facts for planning -------------------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if archs:
            return str(archs[0])
        return str(self.config.get("model_type", "unknown"))

    def torch_dtype(self) -> torch.dtype:
        """The checkpoint's dtype: config.json's (torch_)dtype, else that of most of its bytes."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
        by_dtype = self.bytes_by_dtype()
        floats = {k: v for k, v in by_dtype.items() if k in ("F32", "F16", "BF16")}
        if not floats:
            return torch.bfloat16
        return SAFETENSORS_DTYPES[max(floats, key=floats.get)][0]

    # --- reading ------------------------------------------------------------------------------------------------

    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def iter_tensors(self, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor) shard by shard, so one shard's worth of file pages is in flight at a time."""
        from safetensors import SafetensorError, safe_open

        for file in self.files():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                        if names is None or name in names:
                            yield name, f.get_tensor(name)
            except SafetensorError as e:  # changed on disk since it was opened, or damaged in a way sizes miss
                raise CadenzaError(
                    f"{file} could not be read ({e}). It is damaged or changed while loading: download this file "
                    "again from the model's repository."
                ) from None


# --- quantized checkpoints ------------------------------------------------------------------------------------------

SCALE_SUFFIX = "_scale_inv"  # `<name>_scale_inv`: the block scales of the fp8 tensor `<name>`
_FP8_HINT = (
    'cadenza reads unquantized checkpoints (bf16, fp16, fp32) and block-quantized fp8 ones (quant_method "fp8" '
    "with weight_block_size, DeepSeek-V3's format): use the model's bf16 release or such an fp8 one."
)


@dataclass(frozen=True)
class BlockFP8:
    """Block-quantized fp8, as DeepSeek-V3 publishes its weights: config.json's `quantization_config` is
    {"quant_method": "fp8", "weight_block_size": [128, 128], ...}; a quantized `<name>` ([out, in], float8_e4m3fn)
    comes with `<name>_scale_inv` ([ceil(out / 128), ceil(in / 128)], float32), one factor per block (edge blocks
    partial), and the real weight is fp8 * scale_inv. Unquantized tensors (embeddings, norms, routers, LM head) are
    stored as they are. cadenza dequantizes at load into the compute dtype."""

    block: tuple[int, int]  # rows, columns

    @classmethod
    def from_config(cls, config: dict) -> BlockFP8 | None:
        """The checkpoint's quantization, from config.json: None when unquantized; a clear error for formats cadenza
        cannot read."""
        q = config.get("quantization_config")
        if not q:
            return None
        method = q.get("quant_method") if isinstance(q, dict) else None
        if method == "mxfp4":  # read by the family's experts (gpt-oss); the loader checks the family reads it
            return None
        if method != "fp8":
            raise CadenzaError(f"config.json says the weights are quantized with {method!r}. {_FP8_HINT}")
        block = q.get("weight_block_size")
        if not (
            isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
        ):
            raise CadenzaError(
                f"config.json's fp8 quantization_config has weight_block_size={block!r}; cadenza reads fp8 with block "
                f"scales only (two positive ints, e.g. [128, 128]). {_FP8_HINT}"
            )
        if q.get("expert_dtype", "fp8") != "fp8":
            raise CadenzaError(f"config.json's experts are stored as {q['expert_dtype']!r}, not fp8. {_FP8_HINT}")
        return cls((block[0], block[1]))

    @staticmethod
    def scale_name(name: str) -> str:
        return name + SCALE_SUFFIX

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale tensor's shape for a weight of `shape` ([out, in]): one factor per block."""
        return tuple(math.ceil(d / b) for d, b in zip(shape, self.block, strict=True))

    def dequantize(self, weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """weight [out, in] fp8, scale_inv [ceil(out/bm), ceil(in/bn)] -> weight * its block's factor, computed in
        float32 (as DeepSeek's own dequantization), then cast to `dtype`."""
        (bm, bn), (rows, cols) = self.block, weight.shape
        scale = scale_inv.float().repeat_interleave(bm, dim=0)[:rows]  # [out, ceil(in/bn)]
        w = weight.float()  # [out, in]
        full = cols // bn
        # full column blocks through a view (no weight-sized copy of the scales), then the partial edge block
        w[:, : full * bn].view(rows, full, bn).mul_(scale[:, :full, None])
        if full * bn < cols:
            w[:, full * bn :].mul_(scale[:, full:])
        return w.to(dtype)


def read_weights(checkpoint, names: set[str], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for `names`, shard by shard, with block-fp8 weights dequantized to `dtype` and their scales
    (the `*_scale_inv` among `names`) consumed. The scales are read first, all of them, so that a weight never waits
    for a scale stored in another shard: 4 bytes per 128x128 block, 164 MB for DeepSeek-V3's 671 B weights."""
    quant = BlockFP8.from_config(checkpoint.config)
    scale_names = {n for n in names if n.endswith(SCALE_SUFFIX)} if quant is not None else set()
    if not scale_names:
        yield from checkpoint.iter_tensors(names)
        return
    scales = dict(checkpoint.iter_tensors(scale_names))
    for name, tensor in checkpoint.iter_tensors(names - scale_names):
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = quant.dequantize(tensor, scales.pop(quant.scale_name(name)), dtype)
        yield name, tensor
