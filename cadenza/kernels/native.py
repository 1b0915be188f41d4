"""JIT builds of cadenza's C++ sources (plain C ABI, loaded with ctypes; no torch headers, so a build takes
seconds) into the cadenza cache: one folder per source, flags and machine, so a changed source or compiler flag
builds anew and an unchanged one loads at once."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from cadenza.paths import kernels_dir

log = logging.getLogger(__name__)


def build(source: str, cflags: list[str], ldflags: list[str], key: str = "", notice: str | None = None) -> ctypes.CDLL:
    """Compiles `source` (a file beside this module, with the headers beside it) with `cflags` and links it with
    `ldflags`; `key` adds what else the binary depends on (a CPU's model and flags). `notice` is logged (INFO: the
    CLI shows it) before a compile, not when the binary is already in the cache. Raises what the compiler or ninja
    raise."""
    from torch.utils.cpp_extension import load

    src = Path(__file__).with_name(source)
    headers = [h.read_text() for h in sorted(src.parent.glob("*.h"))]  # what the sources may include
    text = "\n".join([src.read_text(), *headers, " ".join(cflags), " ".join(ldflags), torch.__version__, key])
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    build_dir = kernels_dir() / f"{src.stem}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"cadenza_{src.stem}_{digest}"
    if notice is not None and not (build_dir / f"{name}.so").exists():
        log.info(notice)
    path = load(
        name=name,
        sources=[str(src)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return ctypes.CDLL(path)


class Library:
    """A library built at first use, once per process and thread-safe: `get()` gives it, or None where `unsupported`
    names a reason or the build fails (`reason` says which; `on_off` hears it once)."""

    def __init__(
        self,
        build_fn: Callable[[], ctypes.CDLL],
        unsupported: Callable[[], str | None] = lambda: None,
        on_off: Callable[[str], None] | None = None,
    ):
        self._build, self._unsupported, self._on_off = build_fn, unsupported, on_off
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._reason: str | None = None
        self._tried = False

    def get(self) -> ctypes.CDLL | None:
        if self._tried:
            return self._lib
        with self._lock:
            if not self._tried:
                self._reason = self._unsupported()
                if self._reason is None:
                    try:
                        self._lib = self._build()
                    except Exception as exc:  # a compiler or ninja problem: the callers' fallbacks still work
                        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                        self._reason = f"the build failed: {first[:200]}"
                if self._reason is not None and self._on_off is not None:
                    self._on_off(self._reason)
                self._tried = True
        return self._lib

    @property
    def reason(self) -> str | None:
        """Why the library is not available (building it first if need be), or None."""
        self.get()
        return self._reason
