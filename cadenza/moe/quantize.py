"""Routed experts quantized at load (`--experts int8 | int4`), layer by layer, never holding the model twice.

The loader fills a layer's stacked experts as the checkpoint's tensors arrive (shard by shard); the moment the last
one lands, `LayerPacker.submit` hands the layer to a background thread that packs it (cadenza.kernels.layout, with
several threads of its own) and drops its stacks, while reading goes on. One layer packs at a time and a second one
waits for it, so at most about two layers' plain stacks are alive at once: a 45 B-parameter Mixtral (90 GB of bf16
experts, 47 GB as int8) loads into 128 GiB of host memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from cadenza.errors import CadenzaError
from cadenza.kernels.layout import DEFAULT_GROUP, FORMATS, INT4_GROUPS, INT8_GROUPS, resolve_group
from cadenza.moe.experts import Experts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertFormat:
    """How routed experts are stored: `fmt` "bf16" (plain stacked parameters in the compute dtype), "int8" or
    "int4" (packed tiles, scale group `group`: 0 = per output channel), "blocks" (a GGUF's own blocks kept,
    `layer_formats` naming each layer's block format, cadenza.kernels.blocks), or "auto" until `resolve` picks
    "blocks" where the file allows it and "bf16" elsewhere; `cache`: keep packed layers on disk."""

    fmt: str = "bf16"
    group: int = 0
    cache: bool = True
    layer_formats: tuple[str, ...] = ()

    @classmethod
    def of(cls, experts: str = "auto", group: int | None = None, cache: bool = True) -> ExpertFormat:
        """Validates user values (LLM's experts / expert_group / expert_cache) with messages naming the allowed
        ones; group None takes the format's default (int8: per output channel, int4: 64)."""
        if experts == "auto":
            if group not in (None, 0):
                raise CadenzaError(
                    f"expert_group={group} applies to experts quantized at load. Use experts='int8' or 'int4' with "
                    "it, or leave expert_group unset."
                )
            return cls("auto", 0, cache)
        if experts not in FORMATS:
            raise CadenzaError(
                f"experts={experts!r} is not a storage format for routed experts. Use one of: auto (default: a "
                "GGUF's blocks as they are, else as the checkpoint), bf16 (in the compute dtype), int8 or int4."
            )
        if group is not None and (not isinstance(group, int) or isinstance(group, bool)):
            raise CadenzaError(f"expert_group={group!r} is not valid. Use a whole number (or leave it unset).")
        if experts == "bf16":
            if group not in (None, 0):
                raise CadenzaError(
                    f"expert_group={group} applies to quantized experts only. Use experts='int8' or 'int4' with it, "
                    "or leave expert_group unset."
                )
            group = None
        try:
            resolved = resolve_group(experts, group)
        except ValueError:
            allowed = {"int8": INT8_GROUPS, "int4": INT4_GROUPS}[experts]
            names = ", ".join(str(g) + (" (per output channel)" if g == 0 else "") for g in allowed)
            raise CadenzaError(
                f"expert_group={group} is not supported for {experts} experts. Use one of: {names}; default "
                f"{DEFAULT_GROUP[experts] or 'per output channel'}."
            ) from None
        if not isinstance(cache, bool):
            raise CadenzaError(f"expert_cache={cache!r} is not valid. Use True or False.")
        return cls(experts, resolved, cache)

    @property
    def packed(self) -> bool:
        return self.fmt not in ("bf16", "auto")

    def resolve(self, checkpoint, model) -> ExpertFormat:
        """ "auto" made concrete for this checkpoint and (meta) model: "blocks" when the checkpoint can keep every
        routed-experts layer in its own block format (a GGUF of Q4_0 / Q4_K / Q6_K / MXFP4 experts), else "bf16"."""
        if self.fmt != "auto":
            return self
        from cadenza.loader import expert_layers

        kept = getattr(checkpoint, "kept_formats", lambda layers: None)(expert_layers(model))
        if kept:
            return ExpertFormat("blocks", 0, False, tuple(kept))
        return ExpertFormat("bf16", 0, self.cache)

    def describe(self) -> str:
        if self.fmt != "blocks":
            return self.fmt
        return ", ".join(sorted(set(self.layer_formats)))  # e.g. "q4_k+q6_k"


class Progress:
    """Progress of work of `total` steps: a tqdm bar on a terminal (redrawn at most every `every_s` seconds), a
    log line every ~10% otherwise (`terminal_only`: nothing); silent unless the work has taken more than `after_s`
    seconds (default 1, or CADENZA_PROGRESS_AFTER: tiny models print nothing). `unit` "layer" counts layers,
    "bytes" bytes (with their rate). Written to `stream` when given, else to stderr where INFO records of
    cadenza.moe.quantize are shown (the CLI shows them, the Python API by default not)."""

    def __init__(
        self,
        label: str,
        total: int,
        after_s: float | None = None,
        stream=None,
        unit: str = "layer",
        terminal_only: bool = False,
        every_s: float = 0.0,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.after_s = after_s if after_s is not None else _progress_after()
        self.stream, self.every_s = stream, every_s
        shown_on = stream if stream is not None else sys.stderr  # where a logged line lands with the CLI's handler
        self.tty = bool(getattr(shown_on, "isatty", lambda: False)())
        self.quiet = terminal_only and not self.tty
        # the bar's terminal: the stream, or stderr where the logged lines would show (None: they would not)
        self.bar_file = stream if stream is not None else (sys.stderr if log.isEnabledFor(logging.INFO) else None)
        self.bar = None
        self.start = time.perf_counter()
        self.shown = False
        self.last_decile = -1

    def update(self, done: int, note: str = "", final: bool | None = None) -> None:
        """`done` steps of `total`; `note` is appended to the line; `final` (default: done reaches total) ends
        the line."""
        final = done >= self.total if final is None else final
        elapsed = time.perf_counter() - self.start
        if self.quiet or (not self.shown and elapsed < self.after_s):
            return
        if self.tty:
            self._bar_update(done, note, final)
            return
        decile = done * 10 // max(1, self.total)
        if decile == self.last_decile and not final:
            return
        self.last_decile = decile
        text = f"{self.label}: {self._count(done, elapsed)}{note} ({elapsed:.0f} s)"
        if self.stream is None:
            log.info("%s", text)
        else:
            self.stream.write(f"cadenza: {text}\n")
            self.stream.flush()
        self.shown = True

    def _bar_update(self, done: int, note: str, final: bool) -> None:
        if self.bar_file is None:
            return
        if self.bar is None:
            from cadenza.log import terminal_bar

            bytes_ = self.unit == "bytes"
            self.bar = terminal_bar(
                self.bar_file, self.total, f"cadenza: {self.label}", "B" if bytes_ else f" {self.unit}s",
                leave=True, unit_scale=bytes_, unit_divisor=1000, mininterval=self.every_s,
            )  # fmt: skip
            self.bar.start_t -= time.perf_counter() - self.start  # the work began before the bar showed
        if note:
            self.bar.set_postfix_str(note.strip(" ,;:"), refresh=False)
        self.bar.update(done - self.bar.n)
        self.shown = True
        if final:
            self.bar.close()

    def _count(self, done: int, elapsed: float) -> str:
        if self.unit == "bytes":
            rate = done / elapsed if elapsed > 0 else 0.0
            return f"{size_text(done)} of {size_text(self.total)}, {size_text(rate)}/s"
        return f"{self.unit} {done}/{self.total}"


def size_text(n: float) -> str:
    """Bytes for people: 950 kB, 12 MB, 3.4 GB."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} kB"


def _progress_after() -> float:
    """Seconds of work before a progress line shows: CADENZA_PROGRESS_AFTER, default 1."""
    try:
        return float(os.environ.get("CADENZA_PROGRESS_AFTER", "1"))
    except ValueError:
        return 1.0


class LayerPacker:
    """Packs completed MoE layers in one background thread, one layer at a time (each with `threads` threads),
    while the caller reads on. `submit` waits while an earlier layer is still packing: at most one layer packs while
    the next fills. `on_packed(index, layer)` (the disk cache's writer) runs in that thread after each layer.

    A packed layer's plain stacks are recycled: `take` hands them to the next layer's loading (the loader's
    `alloc`), because filling fresh memory costs a page fault per 4 KiB: copies into new pages run several times
    slower than into reused ones."""

    def __init__(
        self,
        layers: list[Experts],
        fmt: str,
        group: int,
        threads: int | None = None,
        on_packed: Callable[[int, Experts], None] | None = None,
    ):
        from cadenza.moe.cpu import physical_cores

        self.index = {id(m): i for i, m in enumerate(layers)}
        self.fmt, self.group = fmt, group
        self.threads = threads or physical_cores()
        self.on_packed = on_packed
        self.done = 0
        self.pack_s = 0.0  # seconds the layers took to pack (on_packed's writing apart), and the reader waited
        self.wait_s = 0.0  # for them: where a load's time goes (the H200 box: Mixtral packing-bound, Qwen3 not)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cadenza-packer")
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []  # stacks of the last packed layer, for the next layer

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor for a layer's stack: a recycled one of this shape and dtype, else a new one."""
        with self._lock:
            for i, t in enumerate(self._free):
                if t.shape == shape and t.dtype == dtype and t.device == device:
                    return self._free.pop(i)
        return torch.empty(shape, dtype=dtype, device=device)

    def submit(self, layer: Experts) -> None:
        """Queues a layer whose every expert tensor has arrived; blocks until the previous one is packed (and
        raises its error, if it failed)."""
        self._wait()
        self._pending = self._pool.submit(self._pack, self.index[id(layer)], layer)

    def _pack(self, index: int, layer: Experts) -> None:
        stacks = [w.data for w in (layer.gate, layer.up, layer.down)]
        t0 = time.perf_counter()
        layer.quantize(self.fmt, self.group, self.threads)
        self.pack_s += time.perf_counter() - t0
        with self._lock:
            self._free = stacks  # replaces any not taken: at most one layer's stacks wait here
        del stacks
        if self.on_packed is not None:
            self.on_packed(index, layer)
        with self._lock:
            self.done += 1  # the loader's progress line reads it

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            t0 = time.perf_counter()
            try:
                pending.result()
            finally:
                self.wait_s += time.perf_counter() - t0

    def timing(self) -> str:
        """Where the packing's time went, for the load's last line."""
        per = self.pack_s / max(1, self.done)
        return f"packing {per:.2f} s a layer in {self.threads} threads; reading waited {self.wait_s:.0f} s for it"

    def finish(self) -> None:
        """Waits for the last layer; raises a packing error."""
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
            self._free = []

    def abandon(self) -> None:
        """After an error elsewhere: waits for the running layer quietly, stops the thread."""
        with contextlib.suppress(Exception):
            self._wait()
        self._pool.shutdown(wait=True)
        self._free = []
