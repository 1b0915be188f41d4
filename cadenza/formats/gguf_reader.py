"""A GGUF file's header read by cadenza: its metadata as plain Python values, its tensors as memory-mapped arrays.

Written here because gguf-py's GGUFReader makes a few numpy arrays for every item of every metadata array: a
Qwen3 file's 151,936 tokens and 151,387 merges took it 6.3 s to open on the development machine (2 s for Mixtral's
32,000), where one pass over the bytes takes a fraction of a second. The tensors it gives look like gguf-py's
(`ReaderTensor`'s name, tensor_type, shape, n_elements, n_bytes, data_offset, data), and the type tables are
gguf-py's (`GGMLQuantizationType`, `GGML_QUANT_SIZES`); tests/formats/test_gguf.py checks both readers agree.

Layout (little-endian; version 2 or 3): magic "GGUF", version u32, tensor count u64, key/value count u64; each
key/value: a string key (u64 length + UTF-8 bytes), a u32 value type, the value (an array: item type u32, count
u64, items); each tensor: name, dimension count u32, dimensions u64 (innermost first), type u32, offset u64 from
the data section, which starts at the next multiple of general.alignment (32 unless given).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = 0x46554747  # "GGUF" read as a little-endian u32
# value type -> (struct format, size); 8: string, 9: array
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
    7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_ELEMENTS = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
             "I32": np.int32, "I64": np.int64}  # fmt: skip


@dataclass
class ReaderTensor:
    """One tensor, as gguf-py's ReaderTensor: shape innermost first; data a read-only view of the mapped file
    (outermost first; element types as numpy arrays, block types as bytes: [..., bytes per row])."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GgufReader:
    """The header of one GGUF file: `metadata` (key -> value) and `tensors` (in file order)."""

    def __init__(self, path: str | Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._map)
        self._at = 0
        if self._u32() != MAGIC:
            raise ValueError("the file does not start with GGUF's magic bytes")
        version = self._u32()
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (a big-endian file, or an old or unknown version) is not read")
        n_tensors, n_kv = self._u64(), self._u64()
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._str()
            self.metadata[key] = self._value(self._u32())
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            dims = [self._u64() for _ in range(self._u32())]
            infos.append((name, dims, self._u32(), self._u64()))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-self._at // align) * align
        self.tensors: list[ReaderTensor] = []
        seen: set[str] = set()
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise ValueError(f"tensor {name} appears twice")
            seen.add(name)
            qtype = GGMLQuantizationType(raw_type)
            block, size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            n_bytes = n * size // block
            shape = tuple(reversed(dims))
            begin = start + offset
            if begin + n_bytes > len(self._map):
                raise ValueError(f"tensor {name} ends past the end of the file")
            raw = self._map[begin : begin + n_bytes]
            element = _ELEMENTS.get(qtype.name)
            if element is not None:
                data = raw.view(element).reshape(shape)
            else:  # block types (and BF16, which numpy lacks): bytes, the last dimension in bytes
                data = raw.reshape(*shape[:-1], shape[-1] // block * size)
            self.tensors.append(ReaderTensor(name, qtype, np.array(dims, np.uint64), n, n_bytes, begin, data))

    # --- the header's pieces ---------------------------------------------------------------------------------------

    def _take(self, n: int) -> memoryview:
        if self._at + n > len(self._buf):
            raise ValueError("the header runs past the end of the file")
        out = self._buf[self._at : self._at + n]
        self._at += n
        return out

    def _u32(self) -> int:
        return int.from_bytes(self._take(4), "little")

    def _u64(self) -> int:
        return int.from_bytes(self._take(8), "little")

    def _str(self) -> str:
        return bytes(self._take(self._u64())).decode("utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype == 8:
            return self._str()
        if vtype == 9:
            return self._array(self._u32(), self._u64())
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return struct.unpack(fmt[0], self._take(fmt[1]))[0]

    def _array(self, item: int, count: int) -> list:
        if item in _NUMPY:  # numbers: one view, one conversion
            size = np.dtype(_NUMPY[item]).itemsize
            return np.frombuffer(self._take(size * count), dtype=_NUMPY[item]).tolist()
        if item == 8:  # strings: one pass over the bytes
            buf, at, out = self._buf, self._at, []
            end = len(buf)
            for _ in range(count):
                if at + 8 > end:
                    raise ValueError("the header runs past the end of the file")
                n = int.from_bytes(buf[at : at + 8], "little")
                if at + 8 + n > end:
                    raise ValueError("the header runs past the end of the file")
                out.append(bytes(buf[at + 8 : at + 8 + n]).decode("utf-8"))
                at += 8 + n
            self._at = at
            return out
        return [self._value(item) for _ in range(count)]  # arrays of arrays
