"""A GGUF model file (llama.cpp's format) as a checkpoint: the same interface as `cadenza.checkpoint.Checkpoint`,
so planning, `cadenza info` and the loader take it unchanged.

Files are opened with cadenza's header reader (`gguf_reader.GgufReader`: gguf-py's GGUFReader, the reference that
llama.cpp's own Python tools use, takes seconds over a large vocabulary; gguf-py's type tables and dequantizers are
still used): the file is memory-mapped and only the header parsed, so opening a 100 GB model reads a few MB
(metadata, vocabulary, tensor directory), and tensor bytes are paged in when a tensor is read.

The GGUF side is turned into the HF side that cadenza's families take (`gguf_arch`): metadata -> config.json,
GGUF tensor names -> HF names, each layer's stacked experts (`blk.N.ffn_{gate,up,down}_exps`, [E, out, in]) ->
`experts.{e}.*` rows, and the llama architecture's q/k rows put back in HF's rotary order (llama.cpp's converter
interleaves the two halves of each head; see cadenza/bench/gguf_export.py); the converter's other value transforms
(DeepSeek's split kv_b, Qwen3-Next's and Qwen3.5's norms, decay rates and DeltaNet projections) are undone as a
tensor is read (`gguf_fixes`). F32 / F16 / BF16 tensors are read as
they are stored; block-quantized ones (Q8_0, Q4_K, ...) are dequantized with `gguf.quants` as they are read.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cadenza.checkpoint import TensorSizes
from cadenza.errors import CadenzaError
from cadenza.formats.gguf_arch import Mapped, hf_config, hf_name
from cadenza.formats.gguf_fixes import fixed_shape, undo

if TYPE_CHECKING:
    from cadenza.kernels.layout import PackedExperts

logger = logging.getLogger(__name__)

_SPLIT = re.compile(r"(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# the dense weights a GPU keeps in their blocks (dense_blocks): attention projections and an untied LM head
_ATTENTION_PROJECTION = re.compile(r"(\.self_attn\.(q|k|v|o)_proj|^lm_head)\.weight$")


def import_gguf() -> types.ModuleType:
    """The `gguf` package: from PyPI (`pip install gguf`) or llama.cpp's own gguf-py on PYTHONPATH.

    gguf-py imports pyyaml at the top of a module that only reads model cards; a box without pyyaml still writes
    files through a stand-in `yaml` that is removed again once gguf is imported."""
    try:
        import gguf
    except ModuleNotFoundError as e:
        if e.name != "yaml":
            raise CadenzaError(
                "GGUF files are read and written with the gguf package: pip install gguf, or put llama.cpp's own "
                "gguf-py on PYTHONPATH (PYTHONPATH=<llama.cpp>/gguf-py)."
            ) from e
        sys.modules["yaml"] = types.ModuleType("yaml")
        try:
            import gguf
        finally:
            del sys.modules["yaml"]
    return gguf


@functools.cache
def readable(type_name: str) -> bool:
    """Whether cadenza can read tensors of this GGUF type: plain floats, or a block type `gguf.quants` dequantizes
    (probed on one zero block, since gguf-py's list of implemented types changes between versions)."""
    if type_name in _PLAIN:
        return True
    gguf = import_gguf()
    qtype = gguf.GGMLQuantizationType[type_name]
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def readable_types() -> list[str]:
    return [t.name for t in import_gguf().GGMLQuantizationType if readable(t.name)]


def is_gguf(path: Path) -> bool:
    """Whether a model source is GGUF: a .gguf file, or a folder of them without config.json."""
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def gguf_parts(path: Path) -> list[Path]:
    """The files of a GGUF model: the file itself, or every part of a split set (`NAME-00001-of-0000N.gguf`, found
    from any part); a folder must hold one model."""
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        firsts = [f for f in files if (m := _SPLIT.fullmatch(f.name)) is None or int(m["no"]) == 1]
        if len(firsts) != 1:
            raise CadenzaError(
                f"{path} holds {len(firsts)} GGUF models ({', '.join(f.name for f in firsts[:4])}). Pass --model the "
                "one .gguf file to run."
            )
        path = firsts[0]
    m = _SPLIT.fullmatch(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise CadenzaError(
            f"{path.name} is one of {count} parts of a split GGUF, and {len(missing)} are missing from {path.parent}: "
            f"{', '.join(missing[:5])}. Download every part into the same folder."
        )
    return parts


def _open(file: Path):
    import_gguf()  # (the type tables; a clear message where the package is missing)
    from cadenza.formats.gguf_reader import GgufReader

    try:
        reader = GgufReader(file)  # (refuses a directory whose tensors end past the file: a cut-off download)
    except CadenzaError:
        raise
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError, ... on damaged files
        raise CadenzaError(
            f"{file} is not a readable GGUF file ({type(e).__name__}: {e}). The download may be incomplete or the "
            "file is not GGUF: download it again."
        ) from None
    return reader


@dataclass(frozen=True)
class GgufTensorInfo:
    """One HF tensor of a GGUF file: shape as HF has it (outermost first), GGUF type name, and where it comes
    from (an expert's row of a stacked tensor when `expert` is set)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # GGUF type name: F32, F16, BF16, Q8_0, Q4_K, ...
    file: Path
    source: str  # the GGUF tensor's name
    nbytes: int  # as stored in the file
    expert: int | None = None
    rope_heads: int = 0  # > 0: llama.cpp's interleaved q/k rows of this many heads, put back in HF order
    # the converter's value transforms to undo as the tensor is read (cadenza.formats.gguf_fixes), and the second
    # GGUF tensor some of them read (DeepSeek's split kv_b: attn_v_b; Qwen3-Next's in_proj_qkvz: attn_gate)
    fixes: tuple[str, ...] = ()
    also: str | None = None
    # an expert's gate or up half of a fused ffn_gate_up_exps (llama.cpp's --fuse-gate-up-exps): its rows of the
    # expert's [2 I, H] matrix
    rows: tuple[int, int] | None = None
    # gpt-oss's MXFP4 experts kept in their blocks: "blocks" or "scales" of the expert's matrix, in the HF
    # checkpoint's MXFP4 layout (`_mxfp4_part`)
    mxfp4: str | None = None


class GgufCheckpoint(TensorSizes):
    """A GGUF model: one file or a split set. Opening it reads only the headers (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise CadenzaError(f"{self.path} does not exist. Pass --model a .gguf file or the folder holding it.")
        self.parts = gguf_parts(self.path)
        self.readers = [_open(p) for p in self.parts]
        # the first part holds the model's metadata; later parts only their split.* keys
        self.metadata = self.readers[0].metadata
        self._raw = {t.name: (t, part) for r, part in zip(self.readers, self.parts, strict=True) for t in r.tensors}
        shapes = {n: tuple(int(d) for d in reversed(t.shape)) for n, (t, _) in self._raw.items()}
        self.config = hf_config(self.metadata, shapes, str(self.path))
        self.architecture = self.config["architectures"][0]
        exps = [t.tensor_type.name for n, (t, _) in self._raw.items() if n.endswith("_exps.weight")]
        # gpt-oss's MXFP4 experts stay MXFP4: the family keeps the blocks (models/gpt_oss.py)
        self.mxfp4 = self.architecture == "GptOssForCausalLM" and bool(exps) and set(exps) == {"MXFP4"}
        if self.mxfp4:
            self.config["quantization_config"] = {"quant_method": "mxfp4"}
        self.generation_config: dict = {}
        self.tensors = self._map_tensors(shapes)
        self._warned = self._warned_rerounded = False

    def _map_tensors(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, GgufTensorInfo]:
        arch, cfg = self.architecture, self.config
        split_kv_b = not any(n.endswith("attn_kv_b.weight") for n in shapes)
        out: dict[str, GgufTensorInfo] = {}
        bad: list[str] = []
        for name, (t, part) in self._raw.items():
            if split_kv_b and name.endswith("attn_k_b.weight"):
                hf = name.replace("blk.", "model.layers.").replace("attn_k_b.weight", "self_attn.kv_b_proj.weight")
                mapped = Mapped(hf, fixes=("kv_b",), also=name.replace("attn_k_b", "attn_v_b"))
            else:
                mapped = hf_name(arch, name)
            if mapped is None:
                continue
            type_name, shape = t.tensor_type.name, shapes[name]
            if mapped.also is not None:
                if mapped.also not in shapes:
                    raise CadenzaError(
                        f"{self.path} has {name} but no {mapped.also}: the file is incomplete. Download it again."
                    )
                also_type = self._raw[mapped.also][0].tensor_type.name
                if not readable(also_type):
                    bad.append(f"{mapped.also} ({also_type})")
                    continue
            if not readable(type_name):
                bad.append(f"{name} ({type_name})")
                continue
            if mapped.fixes:
                also_shape = shapes[mapped.also] if mapped.also else None
                nbytes = int(t.n_bytes) + (int(self._raw[mapped.also][0].n_bytes) if mapped.also else 0)
                shape = fixed_shape(mapped.fixes, shape, also_shape)
                out[mapped.name] = GgufTensorInfo(
                    mapped.name, shape, type_name, part, name, nbytes, fixes=mapped.fixes, also=mapped.also
                )
                continue
            if mapped.experts and self.mxfp4 and name.endswith("_exps.weight"):
                rows, cols = shape[1], shape[2]
                base = mapped.name.rsplit(".", 2)[0]  # ...experts.{e}
                kind = mapped.name.rsplit(".", 2)[1].removesuffix("_proj")  # gate / up / down
                per = int(t.n_bytes) // shape[0]
                for e in range(shape[0]):
                    for piece, pshape, nb in (
                        ("blocks", (rows, cols // 32, 16), per * 16 // 17),
                        ("scales", (rows, cols // 32), per // 17),
                    ):
                        n = f"{base.format(e=e)}.{kind}_{piece}"
                        out[n] = GgufTensorInfo(n, pshape, type_name, part, name, nb, e, mxfp4=piece)
                continue
            if mapped.experts:
                halves = [(mapped.name, None)]
                if mapped.fused_up is not None:  # each expert's gate rows, then its up rows
                    inter = shape[1] // 2
                    halves = [(mapped.name, (0, inter)), (mapped.fused_up, (inter, 2 * inter))]
                per = int(t.n_bytes) // shape[0] // len(halves)
                for e in range(shape[0]):
                    for pattern, rows in halves:
                        n, sub = pattern.format(e=e), shape[1:] if rows is None else (rows[1] - rows[0], *shape[2:])
                        out[n] = GgufTensorInfo(n, sub, type_name, part, name, per, e, rows=rows)
                continue
            heads = 0
            if arch == "MixtralForCausalLM" and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg["num_attention_heads"] if "attn_q" in name else cfg["num_key_value_heads"]
            if name.endswith("ffn_gate_inp_shexp.weight") and len(shape) == 1:
                shape = (1, shape[0])  # llama.cpp stores Qwen2-MoE's shared expert gate [1, H] as a vector
            out[mapped.name] = GgufTensorInfo(mapped.name, shape, type_name, part, name, int(t.n_bytes), None, heads)
        if bad:
            raise CadenzaError(
                f"{self.path} stores {len(bad)} tensors in types cadenza cannot read (first: {bad[0]}). Readable "
                f"types: {', '.join(readable_types())}. Use a GGUF quantized to one of these (Q8_0, Q4_K_M, ...)."
            )
        return out

    # --- facts for planning -------------------------------------------------------------------------------------

    def torch_dtype(self) -> torch.dtype:
        """The float type most of the plain tensors' bytes are in; bfloat16 when most bytes are block-quantized
        (those are dequantized, and bf16 keeps their range)."""
        by = self.bytes_by_dtype()
        plain = {k: v for k, v in by.items() if k in _PLAIN}
        if not plain or sum(plain.values()) * 2 < sum(by.values()):
            return torch.bfloat16
        return _PLAIN[max(plain, key=plain.get)]

    def types_by_group(self) -> dict[str, dict[str, int]]:
        """Bytes per GGUF type in each group: routed experts, attention, other (embeddings, norms, routers, ...)."""
        out: dict[str, dict[str, int]] = {"experts": {}, "attention": {}, "other": {}}
        for t in self.tensors.values():
            group = "experts" if t.expert is not None else "attention" if ".self_attn." in t.name else "other"
            out[group][t.dtype] = out[group].get(t.dtype, 0) + t.nbytes
        return out

    # --- reading ------------------------------------------------------------------------------------------------

    def files(self) -> list[Path]:
        return list(self.parts)

    def iter_tensors(self, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (name, tensor) in file order. A quantized stacked-experts tensor is dequantized one expert at a
        time (float32, one expert's worth of memory), which the loader copies into its stack in the compute dtype."""
        wanted: dict[str, list[GgufTensorInfo]] = {}
        for info in self.tensors.values():
            if names is None or info.name in names:
                wanted.setdefault(info.source, []).append(info)
        for source, (raw, _) in self._raw.items():
            for info in sorted(wanted.get(source, ()), key=lambda i: i.expert or 0):
                if info.mxfp4 is not None:
                    yield info.name, _mxfp4_part(raw, info.expert, info.mxfp4)
                    continue
                if info.expert is not None:
                    if info.dtype not in _PLAIN:
                        self._warn_dequantize(info.dtype)
                    yield info.name, _tensor(raw, info.expert, info.rows)  # the loader copies it into its stack
                    continue
                t = _tensor(raw, None)
                if info.fixes:
                    also = _tensor(self._raw[info.also][0], None) if info.also else None
                    t = undo(info.fixes, t, also, self.config)
                if info.rope_heads:
                    t = _unpermute_rope(t, info.rope_heads)
                # a parameter must own its memory, not alias the read-only file mapping (a dequantized tensor
                # already does)
                aliases = info.dtype in _PLAIN
                yield info.name, t.reshape(info.shape).clone() if aliases else t.reshape(info.shape)

    # --- experts kept in their blocks ---------------------------------------------------------------------------

    def repacks(self, fmt: str, group: int) -> bool:
        """Whether the routed experts go into `fmt` / `group` from their blocks without rounding: Q8_0 (int8 codes
        with an fp16 scale per 32 columns) into int8 experts with 32-column groups (1.125 bytes a weight against
        Q8_0's 1.0625: the scale is stored as fp32)."""
        types = {t.dtype for t in self.tensors.values() if t.expert is not None}
        return fmt == "int8" and group == 32 and types == {"Q8_0"}

    def kept_formats(self, layers) -> list[str] | None:
        """Per routed-experts layer ((HF prefix, Experts module), in order), the block format that keeps its GGUF
        blocks as they are ("q4_k", "q4_k+q6_k", ...: cadenza.kernels.blocks), or None when some layer cannot be
        kept (a type without a block format, gate and up of different types, an activation the kernels do not
        compute, or matrices not a whole number of blocks). Biases (gpt-oss) stay beside the blocks."""
        from cadenza.kernels.blocks import BLOCK_FORMATS, BY_GGUF

        out = []
        for prefix, layer in layers:
            if not layer.kernel_math:
                return None
            infos = [
                self.tensors.get(f"{prefix}0.{n}.weight") for n in (layer.gate_name, layer.up_name, layer.down_name)
            ]
            if any(i is None or i.dtype not in BY_GGUF for i in infos) or infos[0].dtype != infos[1].dtype:
                return None
            gu, dn = BY_GGUF[infos[0].dtype], BY_GGUF[infos[2].dtype]
            if layer.hidden_size % BLOCK_FORMATS[gu].align or layer.intermediate_size % BLOCK_FORMATS[dn].align:
                return None
            out.append(gu if gu == dn else f"{gu}+{dn}")
        return out or None

    # --- dense weights kept in their blocks (a GPU's attention projections: cadenza.kernels.gpu_linear) ---------

    def dense_blocks(self, names) -> dict[str, str]:
        """Of the HF weight names `names`, the attention projections and LM head a GPU can keep in their blocks,
        with their GGUF types: a type gpu_linear keeps, stored as one matrix as HF has it (not DeepSeek's split
        kv_b, nothing the converter transformed)."""
        from cadenza.kernels.gpu_linear import KEPT

        out = {}
        for name in names:
            info = self.tensors.get(name)
            if info is None or info.expert is not None or info.fixes or info.mxfp4 is not None:
                continue
            if _ATTENTION_PROJECTION.search(name) and info.dtype in KEPT and len(info.shape) == 2:
                out[name] = info.dtype
        return out

    def block_rows(self, name: str) -> np.ndarray:
        """A dense weight's blocks as stored, uint8 [rows, bytes a row], its rows in HF's order."""
        info = self.tensors[name]
        data = np.asarray(self._raw[info.source][0].data).reshape(info.shape[0], -1)
        if info.rope_heads:
            data = _unpermute_rope(torch.from_numpy(np.array(data)), info.rope_heads).numpy()
        return data

    def packed_experts(self, prefix: str, layer, fmt: str | None = None) -> PackedExperts:
        """The experts of one layer (`layer`: its Experts module, `prefix`: its HF name + "."), from their blocks:
        in `fmt`, a block format (`kept_formats`), their bits moved into tiles by a few threads; or (None) as int8
        with 32-column groups from Q8_0 blocks (`_int8_from_q8_0`)."""
        if fmt is None:
            return self._int8_from_q8_0(prefix, layer)
        from concurrent.futures import ThreadPoolExecutor

        from cadenza.kernels.blocks import from_gguf
        from cadenza.kernels.layout import empty_packed, write_block_expert
        from cadenza.moe.cpu import physical_cores

        num = layer.num_experts
        out = empty_packed(fmt, None, num, layer.hidden_size, layer.intermediate_size)
        names = (layer.gate_name, layer.up_name, layer.down_name)
        cols = (layer.hidden_size, layer.hidden_size, layer.intermediate_size)
        if self._repack_whole(prefix, out, names, cols):
            return out

        def convert(job: tuple[int, int, int]):  # numpy and torch release the GIL in their array work
            e0, e1, m = job  # experts [e0, e1) of matrix m: one stacked tensor's rows, converted in one go
            info = self.tensors[f"{prefix}{e0}.{names[m]}.weight"]
            raw = _rows(np.asarray(self._raw[info.source][0].data[e0:e1]), info.rows)
            return from_gguf(info.dtype, raw.reshape(-1, raw.shape[-1]), cols[m])

        def run(span: tuple[int, int]) -> None:
            e0, e1 = span
            write_block_expert(out, e0, *pool.map(convert, [(e0, e1, m) for m in range(3)]))

        # a run of experts' three matrices convert side by side, several runs at a time; runs of ~16 MB, so Python
        # pays per run, not per small expert (Qwen3's 128 of 3 MB), and every core has work even where a layer has
        # fewer experts than the machine has cores (Mixtral's 8)
        threads = physical_cores()
        step = max(1, min(num // max(1, threads // 3), (16 << 20) // max(1, out.expert_bytes)))
        spans = [(e, min(num, e + step)) for e in range(0, num, step)]
        with ThreadPoolExecutor(threads) as pool, ThreadPoolExecutor(max(1, min(len(spans), threads // 3))) as outer:
            list(outer.map(run, spans))
        return out

    def _repack_whole(self, prefix: str, out: PackedExperts, names: tuple, cols: tuple) -> bool:
        """The layer's three stacked matrices moved into `out`'s tiles by repack.cpp, each in one call on every
        core, where it moves their types (Q4_K, Q6_K) and no row or column needs padding; False: the caller's
        path."""
        from cadenza.kernels import repack
        from cadenza.kernels.blocks import BY_GGUF
        from cadenza.kernels.layout import matrix_formats
        from cadenza.moe.cpu import physical_cores

        (gf, _), (df, _) = matrix_formats(out.fmt, out.group)
        infos = [self.tensors[f"{prefix}0.{n}.weight"] for n in names]
        if out.hidden != out.hidden_pad or out.intermediate != out.inter_pad:
            return False
        for info, k, f in zip(infos, cols, (gf, gf, df), strict=True):
            if BY_GGUF.get(info.dtype) != f or not repack.moves(info.dtype, k):
                return False
        raws = [_rows(np.asarray(self._raw[info.source][0].data), info.rows) for info in infos]
        mats = [(info.dtype, raw.reshape(-1, raw.shape[-1]), k) for info, raw, k in zip(infos, raws, cols, strict=True)]
        repack.repack_layer(out, mats, physical_cores())
        return True

    def _int8_from_q8_0(self, prefix: str, layer) -> PackedExperts:
        """int8 experts with 32-column groups from Q8_0 blocks, one expert at a time. q * d is exact in float32,
        and packing a group whose largest code is +-127 (what llama.cpp's and gguf-py's Q8_0 quantizers write)
        gives back the same codes and d: the packed values equal the file's. Groups with other largest codes are
        re-rounded, and said so once."""
        from cadenza.kernels.layout import empty_packed, pack_layer

        e_count, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
        out = empty_packed("int8", 32, e_count, h, i)
        names = (layer.gate_name, layer.up_name, layer.down_name)
        for e in range(e_count):
            mats = []
            for n in names:
                info = self.tensors[f"{prefix}{e}.{n}.weight"]
                raw = self._raw[info.source][0]
                self._count_rerounded(_rows(np.asarray(raw.data[e]), info.rows))
                mats.append(_tensor(raw, e, info.rows))
            one = pack_layer([mats[0]], [mats[1]], [mats[2]], "int8", 32)
            out.gate_up[e].copy_(one.gate_up[0])
            out.down[e].copy_(one.down[0])
        return out

    def _count_rerounded(self, blocks: np.ndarray) -> None:
        codes = np.abs(blocks.reshape(-1, 34)[:, 2:].view(np.int8).astype(np.int16)).max(axis=1)
        bad = int(np.count_nonzero((codes != 127) & (codes != 0)))
        if bad and not self._warned_rerounded:
            self._warned_rerounded = True
            logger.warning(
                "%s: %d Q8_0 blocks of an expert have no +-127 code, so packing them as int8 re-rounds them (a "
                "quantization step at most); files written by llama.cpp's quantizer have none.",
                self.path.name,
                bad,
            )

    def _warn_dequantize(self, type_name: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "%s: its routed experts (%s) are dequantized to the compute dtype at load, so they take bf16-size "
                "memory, not their GGUF size. cadenza keeps Q4_0, Q4_K, Q5_K, Q6_K, Q8_0 and MXFP4 experts as they are "
                "(--experts auto, the default) where every layer's experts are of those types and the kernels "
                "compute the family's experts; --experts int8 or --experts int4 re-quantizes them instead.",
                self.path.name,
                type_name,
            )


def _rows(data: np.ndarray, rows: tuple[int, int] | None) -> np.ndarray:
    """A stored expert's (or a run of experts') rows `rows` (GgufTensorInfo.rows), all of them where None."""
    return data if rows is None else data[..., rows[0] : rows[1], :]


def _tensor(raw, expert: int | None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One GGUF tensor (or one expert's row of a stacked one, or `rows` of that) as a torch tensor: a view of the
    mapped file for plain types, a float32 dequantized copy for block types."""
    data = _rows(raw.data if expert is None else raw.data[expert], rows)
    name = raw.tensor_type.name
    with warnings.catch_warnings():  # the mapping is read-only; callers copy before anything could write
        warnings.simplefilter("ignore", UserWarning)
        if name == "BF16":  # numpy has no bfloat16: the reader hands out raw bytes
            return torch.from_numpy(np.asarray(data).view(np.int16)).view(torch.bfloat16)
        if name in _PLAIN:
            return torch.from_numpy(np.asarray(data))
    from cadenza.kernels import repack

    data = np.asarray(data)
    fast = repack.dequantize(name, data, int(raw.shape[0]))  # (shape: innermost first, the columns)
    if fast is not None:  # (the same values as gguf-py's, on every core)
        return fast
    gguf = import_gguf()
    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]))


def _mxfp4_part(raw, expert: int, piece: str) -> torch.Tensor:
    """One expert's MXFP4 matrix from ggml's blocks (per 32 values: the e8m0 scale byte, then 16 bytes whose low
    nibbles are values 0-15 and high nibbles values 16-31) in the HF checkpoint's layout: scales [rows, groups], or
    blocks [rows, groups, 16] with byte j holding values 2j (low nibble) and 2j + 1. The same bits, rearranged."""
    data = torch.from_numpy(np.asarray(raw.data[expert]))
    blocks = data.reshape(data.shape[0], -1, 17)
    if piece == "scales":
        return blocks[..., 0].clone()
    qs = blocks[..., 1:]
    values = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # [rows, groups, 32]: value k's nibble
    return values[..., 0::2] | (values[..., 1::2] << 4)


def _unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order -> HF's: within each head, rows (pair 0 first, pair 0 second, pair 1 first, ...)
    become (first half, second half), undoing the interleave its converter applies."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
