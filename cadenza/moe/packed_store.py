"""The disk cache of packed experts: a second start reads the int8 / int4 layers instead of packing them again.

Where: `cadenza.paths.experts_dir()` / <entry>/ (CADENZA_CACHE moves it), one file per MoE layer and a
meta.json. An entry is written into a temporary folder, meta.json last, then renamed into place: an entry either
is whole or does not exist. Its name ends in a key over the checkpoint's identity (resolved path; each safetensors
file's name, size and mtime_ns; config.json's contents), the format, the group and `LAYOUT_VERSION`, so a changed
checkpoint or a new layout never matches; entries of the same checkpoint folder with another identity or layout
are removed when a new one is written. Synthetic checkpoints have no identity and are never cached.

A layer file: MAGIC, the header's length (8 bytes, little-endian), a JSON header (shapes, format, and a zlib.crc32
per 64 MiB piece of the data) padded so the data starts on a 4 KiB boundary, then gate_up's bytes and down's. Reading
checks the header against the model and each piece's checksum, in parallel threads (os.preadv and crc32 release
the GIL). A problem is reported in one line, the entry deleted and the layers packed again. Failing to write (disk
full, read-only folder) is reported in one line and costs nothing else: the model loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from cadenza.kernels.layout import PackedExperts, empty_packed
from cadenza.moe.experts import Experts
from cadenza.moe.quantize import Progress, size_text
from cadenza.paths import experts_dir

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1  # bump when cadenza.kernels.layout's bytes or this file format change
MAGIC = b"CADENZA-PACKED\x00\x01"
PIECE = 64 << 20  # bytes per checksummed piece of a layer file
ALIGN = 4096  # the data starts at a multiple of this


class CacheProblem(Exception):
    """A cache entry that cannot be used: the message names the problem."""


def notice(text: str) -> None:
    """A problem with the cache that costs the user time (packing again): they should see it."""
    log.warning("%s", text)


def _threads() -> int:
    from cadenza.moe.cpu import physical_cores

    return max(2, physical_cores())


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous uint8 CPU tensor, writable, without a copy."""
    return memoryview(t.view(-1).numpy()).cast("B")


def _pieces(n: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + PIECE)) for a in range(0, n, PIECE)] or [(0, 0)]


def checkpoint_identity(checkpoint) -> dict | None:
    """What says a checkpoint folder is the same as before; None for checkpoints without files (synthetic)."""
    from cadenza.checkpoint import Checkpoint

    if not isinstance(checkpoint, Checkpoint):
        return None
    path = checkpoint.path.resolve()
    files = []
    for f in checkpoint.files():
        st = f.stat()
        files.append([f.name, st.st_size, st.st_mtime_ns])
    config = (path / "config.json").read_text()
    return {"path": str(path), "files": files, "config": config}


def _display_name(path: Path) -> str:
    """A checkpoint folder's name for its cache entries: a Hugging Face cache snapshot
    (models--ORG--NAME/snapshots/<commit>) goes by ORG--NAME, not by its commit hash."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--")
    return path.name


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class PackedStore:
    """One checkpoint's packed experts in one format, on disk (`open` it; None when it cannot be cached)."""

    def __init__(self, root: Path, identity: dict, fmt: str, group: int):
        self.root, self.fmt, self.group = root, fmt, group
        self.checkpoint_path = identity["path"]
        self.identity = _digest(identity)
        key = _digest({"identity": self.identity, "format": fmt, "group": group, "layout": LAYOUT_VERSION})[:20]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", _display_name(Path(self.checkpoint_path)))[:48] or "model"
        self.dir = root / f"{name}-{fmt}-g{group}-{key}"

    @classmethod
    def open(cls, checkpoint, fmt: str, group: int) -> PackedStore | None:
        identity = checkpoint_identity(checkpoint)
        if identity is None:
            return None
        return cls(experts_dir(), identity, fmt, group)

    def meta(self, num_layers: int, files: list[str], nbytes: int) -> dict:
        return {
            "version": LAYOUT_VERSION,
            "checkpoint": self.checkpoint_path,
            "identity": self.identity,
            "format": self.fmt,
            "group": self.group,
            "layers": num_layers,
            "files": files,
            "bytes": nbytes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    # --- reading ---------------------------------------------------------------------------------------------------

    def load(self, layers: list[Experts], dtype: torch.dtype | None = None) -> bool:
        """Reads and verifies every layer into `layers` (`Experts.set_packed`); False when there is no entry, or
        it was unusable (then it is reported and deleted, and `layers` are untouched)."""
        meta_file = self.dir / "meta.json"
        if not meta_file.exists():
            return False
        try:
            try:
                meta = json.loads(meta_file.read_text())
            except ValueError as e:
                raise CacheProblem(f"meta.json is not valid JSON: {e}") from None
            want = self.meta(len(layers), [layer_file(i) for i in range(len(layers))], 0)
            for k in ("version", "identity", "format", "group", "layers", "files"):
                if meta.get(k) != want[k]:
                    raise CacheProblem(f"meta.json's {k} is {meta.get(k)!r}, expected {want[k]!r}")
            progress = Progress(f"reading {self.fmt} experts from the cache", len(layers))
            packed = []
            with ThreadPoolExecutor(_threads(), thread_name_prefix="cadenza-cache") as pool:
                for i, layer in enumerate(layers):
                    packed.append(read_layer(self.dir / layer_file(i), layer, pool))
                    progress.update(i + 1)
        except (CacheProblem, OSError) as e:
            notice(f"the packed-expert cache {self.dir} is unusable ({e}); deleting it and packing the experts again.")
            shutil.rmtree(self.dir, ignore_errors=True)
            return False
        for layer, p in zip(layers, packed, strict=True):
            layer.set_packed(p, dtype)
        return True

    # --- writing ---------------------------------------------------------------------------------------------------

    def writer(self, num_layers: int) -> StoreWriter | None:
        """A writer of a new entry (None, with a notice, when the cache folder cannot be written). Removes stale
        entries of this checkpoint folder first (another identity or layout: they can never match again)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=self.root))
        except OSError as e:
            notice(f"cannot write the packed-expert cache in {self.root} ({_reason(e)}); loading without it.")
            return None
        return StoreWriter(self, tmp, num_layers)

    def _remove_stale(self) -> None:
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                pid = entry.name.split("-")[2] if entry.name.count("-") >= 2 else ""
                if pid.isdigit() and not _alive(int(pid)):  # left by a process that died while writing
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            if entry == self.dir:  # ours, without a usable meta.json (load found none): write it anew
                shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                meta = json.loads((entry / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("checkpoint") == self.checkpoint_path and (
                meta.get("identity") != self.identity or meta.get("version") != LAYOUT_VERSION
            ):
                shutil.rmtree(entry, ignore_errors=True)


class StoreWriter:
    """Writes one entry's layers into a temporary folder as they are packed; `commit` renames it into place. An
    OSError (disk full, ...) reports once and turns the rest into no-ops: the model loads without the cache."""

    def __init__(self, store: PackedStore, tmp: Path, num_layers: int):
        self.store, self.tmp, self.num_layers = store, tmp, num_layers
        self.written: dict[int, int] = {}  # layer -> bytes
        self.failed = False

    def write(self, index: int, layer: Experts) -> None:
        if self.failed:
            return
        try:
            with ThreadPoolExecutor(_threads(), thread_name_prefix="cadenza-cache") as pool:
                self.written[index] = write_layer(self.tmp / layer_file(index), layer.packed, pool)
        except OSError as e:
            self._fail(e)

    def commit(self) -> None:
        """meta.json, then the rename that makes the entry visible."""
        if self.failed:
            return
        try:
            if sorted(self.written) != list(range(self.num_layers)):
                raise OSError(f"only {len(self.written)} of {self.num_layers} layers were written")
            files = [layer_file(i) for i in range(self.num_layers)]
            meta = self.store.meta(self.num_layers, files, sum(self.written.values()))
            with open(self.tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.rename(self.tmp, self.store.dir)
            log.info(
                "kept the %s experts in the disk cache for later loads: %s in %s (CADENZA_CACHE moves it, "
                "--no-cache skips it)", self.store.fmt, size_text(meta["bytes"]), self.store.dir,
            )  # fmt: skip
        except OSError as e:
            if self.store.dir.exists():  # another process wrote the same entry meanwhile: keep theirs
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            self._fail(e)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.failed = True

    def _fail(self, e: OSError) -> None:
        self.failed = True
        shutil.rmtree(self.tmp, ignore_errors=True)
        notice(f"cannot write the packed-expert cache in {self.store.root} ({_reason(e)}); loading without it.")


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def layer_file(index: int) -> str:
    return f"layer-{index:03d}.bin"


# --- one layer file ------------------------------------------------------------------------------------------------


def _header(p: PackedExperts, crcs: dict[str, list[int]]) -> dict:
    return {
        "version": LAYOUT_VERSION,
        "format": p.fmt,
        "group": p.group,
        "num_experts": p.num_experts,
        "hidden": p.hidden,
        "intermediate": p.intermediate,
        "gate_up": list(p.gate_up.shape),
        "down": list(p.down.shape),
        "gu_header": p.gu_header,
        "dn_header": p.dn_header,
        "piece": PIECE,
        "crc32": crcs,
    }


def write_layer(path: Path, p: PackedExperts, pool: ThreadPoolExecutor) -> int:
    """Writes a packed layer (checksums computed in `pool`); returns the file's size."""
    mats = {"gate_up": _bytes(p.gate_up.contiguous()), "down": _bytes(p.down.contiguous())}
    crcs = {
        name: list(pool.map(lambda ab, m=m: zlib.crc32(m[ab[0] : ab[1]]), _pieces(len(m)))) for name, m in mats.items()
    }
    header = json.dumps(_header(p, crcs)).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // ALIGN) * ALIGN
    header += b" " * (start - len(MAGIC) - 8 - len(header))
    with open(path, "wb") as f:
        f.write(MAGIC + len(header).to_bytes(8, "little") + header)
        for m in mats.values():
            f.write(m)
        f.flush()
        os.fsync(f.fileno())
    return start + sum(len(m) for m in mats.values())


def read_layer(path: Path, layer: Experts, pool: ThreadPoolExecutor) -> PackedExperts:
    """Reads and verifies one layer file against `layer`'s shapes; CacheProblem names what is wrong."""
    name = path.name
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, len(MAGIC) + 8, 0)
        if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
            raise CacheProblem(f"{name} is not a packed-expert file")
        n = int.from_bytes(head[len(MAGIC) :], "little")
        if n > 1 << 24:
            raise CacheProblem(f"{name}'s header length {n} is implausible")
        try:
            header = json.loads(os.pread(fd, n, len(MAGIC) + 8))
            fmt, group = header["format"], header["group"]
        except (ValueError, KeyError, TypeError) as e:
            raise CacheProblem(f"{name}'s header is unreadable ({e})") from None
        if header.get("version") != LAYOUT_VERSION:
            raise CacheProblem(f"{name} has layout version {header.get('version')}, expected {LAYOUT_VERSION}")
        try:
            out = empty_packed(fmt, group, layer.num_experts, layer.hidden_size, layer.intermediate_size)
        except ValueError as e:
            raise CacheProblem(f"{name}: {e}") from None
        want = _header(out, header.get("crc32"))
        for k, v in want.items():
            if header.get(k) != v:
                raise CacheProblem(f"{name}'s {k} is {header.get(k)!r}, the model needs {v!r}")
        start = len(MAGIC) + 8 + n
        mats = {"gate_up": out.gate_up, "down": out.down}
        expect = start + sum(t.numel() for t in mats.values())
        if size != expect:
            raise CacheProblem(f"{name} has {size} bytes, expected {expect} (truncated or overwritten)")
        jobs, offset = [], start
        for key, t in mats.items():
            m, crcs = _bytes(t), header["crc32"][key]
            spans = _pieces(len(m))
            if not isinstance(crcs, list) or len(crcs) != len(spans):
                raise CacheProblem(f"{name}'s {key} checksums do not cover its bytes")
            for (a, b), crc in zip(spans, crcs, strict=True):
                jobs.append((m[a:b], offset + a, crc, key))
            offset += len(m)
        piece = header["piece"]

        def read(job) -> str | None:
            view, at, crc, key = job
            got = 0
            while got < len(view):
                k = os.preadv(fd, [view[got:]], at + got)
                if k <= 0:
                    return f"{name} ended early"
                got += k
            if zlib.crc32(view) != crc:
                return f"{name}: checksum mismatch in {key} at byte {at - start} (piece of {piece} bytes)"
            return None

        problems = [p for p in pool.map(read, jobs) if p]
        if problems:
            raise CacheProblem(problems[0])
        return out
    finally:
        os.close(fd)
