"""Triton where it is installed; elsewhere a stand-in under which kernel modules still import (their kernels parse
and are never launched) and MISSING says why."""

try:
    import triton
    import triton.language as tl

    MISSING: str | None = None
except ImportError as err:

    class _NoTriton:
        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton
    MISSING = f"Triton is not importable ({err})"

__all__ = ["MISSING", "tl", "triton"]
