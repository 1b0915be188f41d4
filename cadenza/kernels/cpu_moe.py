"""The fused CPU MoE step: all of a layer's CPU experts, for all their tokens, in one parallel pass.

`pack_layer` (cadenza.kernels.layout, re-exported here) lays a layer's expert weights out for streaming (bf16,
int8 or int4); `plain_layer` (`PlainExperts.of`) wraps a bf16 model's stacked gate, up [E, I, H] and down [E, H, I]
as they are, read in place (no second copy in host memory). `moe_forward` computes, from either,
`y [T, H] = sum over (t, slot) routed to a computed expert e of w[t, slot] * down_e(act(gate_e x_t) * up_e x_t)`.
Three routes compute it:

- "kernel": the C++ extension (cpu_moe.cpp, AVX-512 + OpenMP), JIT-built once per machine into the cadenza cache;
  a run of GEMVs at DRAM bandwidth at one token, blocked over tokens beyond that.
- "mm": chunks of an expert dequantized to bf16 (by the extension) and multiplied by torch.mm, which is oneDNN
  with AMX on Xeons that have it: the route for experts with many tokens (prefill).
- "torch": the PyTorch fallback: the same chunked dequantize-and-multiply in fp32, the reference in tests and the
  path on CPUs without AVX-512 or where the build fails (`available()` says which, with a one-line notice).

Shape legend: E experts, H hidden, I intermediate, T tokens, k experts per token, Hp / Ip padded H / I.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import sys

import torch

from cadenza.kernels import native
from cadenza.kernels.layout import (
    DEFAULT_GROUP,
    FORMATS,
    KERNEL_FORMATS,
    ROWS,
    PackedExperts,
    PlainExperts,
    dequantize,
    dequantize_tiles,
    pack_layer,
    plain_layer,
)

__all__ = [
    "DEFAULT_GROUP",
    "FORMATS",
    "PackedExperts",
    "PlainExperts",
    "available",
    "default_mm_min_tokens",
    "job_free",
    "job_function",
    "job_new",
    "job_run",
    "dequantize",
    "dequantize_tiles",
    "moe_forward",
    "pack_layer",
    "plain_layer",
]

log = logging.getLogger(__name__)

ROUTES = ("auto", "kernel", "mm", "torch")
# activation name (config.json's hidden_act) -> the kernel's code
ACT_CODES = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu": 2, "relu": 3}
CLAMPED_SWIGLU_CODE = 4  # gpt-oss's gated unit, named "clamped_swiglu:ALPHA:LIMIT" (models.common.glu_fn)


class _Extra(ctypes.Structure):
    """cpu_moe.cpp's Extra: biases after gate, up and down, and the clamped SwiGLU's alpha and limit."""

    _fields_ = [("gate_bias", ctypes.c_void_p), ("up_bias", ctypes.c_void_p), ("down_bias", ctypes.c_void_p),
                ("alpha", ctypes.c_float), ("limit", ctypes.c_float)]  # fmt: skip


@functools.lru_cache(maxsize=64)  # looked up at every call of a decode step
def kernel_act(act: str) -> tuple[int, float, float] | None:
    """(the kernel's activation code, alpha, limit) of an expert activation name, or None where it has none."""
    if act in ACT_CODES:
        return ACT_CODES[act], 0.0, 0.0
    if act.startswith("clamped_swiglu:"):
        _, alpha, limit = act.split(":")
        return CLAMPED_SWIGLU_CODE, float(alpha), float(limit)
    return None


def _extra(act: str, biases) -> tuple[_Extra, tuple]:
    """The Extra for an activation and biases (gate [E, I], up [E, I], down [E, H], each or all None), and the fp32
    contiguous tensors it points into (keep them alive while the kernel may run)."""
    _, alpha, limit = kernel_act(act)
    held = tuple(None if b is None else b.detach().float().contiguous() for b in (biases or (None, None, None)))
    if any(b is not None and b.device.type != "cpu" for b in held):
        raise ValueError("expert biases for the CPU kernel must be CPU tensors")
    ptrs = [None if b is None else b.data_ptr() for b in held]
    return _Extra(*ptrs, alpha, limit), held


_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
_CHUNK_BYTES = 16 << 20  # dequantized rows per torch.mm in the mm / torch routes (stays in the last-level cache)


# --- the extension: build once per machine, load, detect -----------------------------------------------------------


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def has_amx() -> bool:
    """Whether the CPU has AMX for bf16 (oneDNN then runs torch.mm on bf16 with the matrix units)."""
    return "amx_bf16" in cpu_flags()


def has_bf16_dot() -> bool:
    """Whether the CPU has AVX512_BF16 (vdpbf16ps), which the int4 kernel uses where present."""
    return "avx512_bf16" in cpu_flags()


KQUANT_FORMATS = ("q4_k", "q5_k", "q6_k")
INT8_FORMATS = KQUANT_FORMATS + ("int8", "q8_0")  # the tiles with an int8-activation kernel (cpu_moe_q8.h)
ACTIVATIONS_ENV = "CADENZA_CPU_ACTIVATIONS"
ACTIVATION_MODES = ("auto", "exact", "int8")
# the kernel's `dot` bits: 1 bf16 dot products; 2 int8 activations for K-quant tiles; 4 for int8 and q8_0 tiles
DOT_BF16, DOT_INT8_KQUANT, DOT_INT8_BYTES = 1, 2, 4


def has_int8_dot() -> bool:
    """Whether the CPU can run the int8-activation kernel (AVX512-VNNI and AVX512_VBMI)."""
    return {"avx512_vnni", "avx512vbmi"} <= cpu_flags()


def activation_mode(mode: str | bool | None = None) -> str:
    """auto, exact or int8: `mode` as given (True: int8, False: exact), or CADENZA_CPU_ACTIVATIONS where None (default
    auto); checked."""
    if isinstance(mode, bool):
        return "int8" if mode else "exact"
    value = os.environ.get(ACTIVATIONS_ENV, "auto") if mode is None else mode
    value = value.strip().lower()
    if value not in ACTIVATION_MODES:
        where = f"{ACTIVATIONS_ENV}={value!r}" if mode is None else f"cpu_activations={value!r}"
        raise ValueError(f"{where}: use auto, exact or int8")
    return value


def int8_bits(mode: str | bool | None, dtype: torch.dtype) -> int:
    """The kernel's int8 `dot` bits for activations of `dtype` under `mode` (`activation_mode`'s). int8: int8
    activations for every tile format that has them (INT8_FORMATS; approximate, 8 bits an activation per 256 columns,
    as llama.cpp's CPU kernels); exact: none; auto (the default): int8 for the K-quant tiles where the activations
    are bf16 or fp16 (measured on the H200 box's Xeon: 1.2x the exact path's rate on Mixtral's Q4_K_M layer; int8
    and q8_0 tiles keep the exact products until measured there) and none for fp32 ones (what the exactness tests
    and an fp32 run ask for). Raises where int8 is asked by value and the CPU lacks it; the environment's int8 on
    such a CPU gives the exact products."""
    asked = mode
    mode = activation_mode(mode)
    if mode == "auto":
        return DOT_INT8_KQUANT if dtype in (torch.bfloat16, torch.float16) and has_int8_dot() else 0
    if mode == "exact":
        return 0
    if not has_int8_dot():
        if asked is None:
            return 0
        raise RuntimeError("int8 activations need a CPU with AVX512-VNNI and AVX512_VBMI; this one lacks them")
    return DOT_INT8_KQUANT | DOT_INT8_BYTES


def int8_formats(formats, dtype: torch.dtype, mode: str | bool | None = None) -> list[str]:
    """Which of the tile `formats` (names, "a+b" pairs split) take int8 activations of `dtype` under `mode`."""
    bits = int8_bits(mode, dtype)
    kinds = (KQUANT_FORMATS if bits & DOT_INT8_KQUANT else ()) + (("int8", "q8_0") if bits & DOT_INT8_BYTES else ())
    return sorted({f for name in formats for f in name.split("+")} & set(kinds))


def activations_label(dtype: torch.dtype, mode: str | bool | None = None) -> str:
    """What the CPU kernel does with activations of `dtype` under `mode`, in words (bench rows)."""
    bits = int8_bits(mode, dtype)
    if bits == DOT_INT8_KQUANT | DOT_INT8_BYTES:
        return "int8"
    return "int8 for K-quant tiles" if bits else "exact"


def unsupported(flags: tuple[str, ...] = _REQUIRED_FLAGS) -> str | None:
    """Why cadenza's AVX-512 kernels (this one, cpu_attention) cannot run here, needing `flags`; None if they can."""
    if os.environ.get("CADENZA_CPU_KERNEL", "1") == "0":
        return "disabled by CADENZA_CPU_KERNEL=0"
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux":
        return f"needs Linux on x86-64 with AVX-512, this is {sys.platform} on {platform.machine()}"
    missing = [f for f in flags if f not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    return None


def _build_flags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    have = cpu_flags()
    if "avx512_bf16" in have:
        flags.append("-mavx512bf16")
    if "avx512_vnni" in have:
        flags.append("-mavx512vnni")
    return flags


def _build() -> ctypes.CDLL:
    lib = native.build(
        "cpu_moe.cpp", _build_flags(), ["-fopenmp"], key=_cpu_model() + " ".join(sorted(cpu_flags())),
        notice="compiling cadenza's CPU kernel (first use, ~30 s; cached for the next runs)...",
    )  # fmt: skip
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.cadenza_moe_forward.restype = i32
    layer = [i32] * 9 + [ptr, i64, i64, i64] * 2  # formats and groups, shapes, gate_up and down matrices
    call = [ptr, i32, i32, ptr, ptr, i32, ptr, i32, i32, i32, i32, ptr, ptr]  # x .. y, the Extra
    lib.cadenza_moe_forward.argtypes = layer + call
    lib.cadenza_moe_forward_plain.restype = i32
    lib.cadenza_moe_forward_plain.argtypes = [i32, i32, i32, ptr, ptr, ptr] + call  # shapes, gate, up, down
    lib.cadenza_dequant_bf16.restype = i32
    lib.cadenza_dequant_bf16.argtypes = [i32, i32, ptr, i64, i64, i32, i64, i64, ptr, i32]
    lib.cadenza_cpu_moe_features.restype = i32
    job = call + [
        ptr,
        i32,
    ]  # x .. y, the Extra, then the stats array and its ring's length (cadenza.moe.offload.streamed)
    lib.cadenza_job_new_packed.restype = ptr
    lib.cadenza_job_new_packed.argtypes = layer + job
    lib.cadenza_job_new_plain.restype = ptr
    lib.cadenza_job_new_plain.argtypes = [i32, i32, i32, ptr, ptr, ptr] + job
    lib.cadenza_job_free.argtypes = [ptr]
    lib.cadenza_job_run.argtypes = [ptr]
    lib.cadenza_read_spans.restype = ctypes.c_uint64
    lib.cadenza_read_spans.argtypes = [ptr, ptr, i32, i32]
    return lib


def _notice(reason: str) -> None:
    log.warning("the fused CPU expert kernel is off (%s); using PyTorch.", reason)


_library = native.Library(_build, unsupported, _notice)
_load = _library.get


def available() -> bool:
    """Whether the C++ kernel runs here (builds it at first call; False, with a one-line notice, otherwise)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    return _library.reason


def default_mm_min_tokens() -> int | None:
    """Tokens per expert from which the "auto" route hands an expert to torch.mm (oneDNN); None: never.

    Where oneDNN has bf16 matrix or dot-product units (AMX, AVX512_BF16), its GEMM overtakes the vector kernel once
    an expert has a few dozen tokens: on the CI's AMD EPYC (AVX512_BF16) between 16 and 32 tokens per expert for
    Mixtral shapes (cadenza.bench.cpu_kernel). Elsewhere torch.mm on bf16 is slow: the kernel takes every count.
    """
    return 32 if has_amx() or has_bf16_dot() else None


# --- forward ---------------------------------------------------------------------------------------------------


def moe_forward(
    layer: PackedExperts | PlainExperts,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: list[int] | None = None,
    act: str = "silu",
    threads: int | None = None,
    *,
    route: str = "auto",
    mm_min_tokens: int | None = -1,
    prefetch: int = 0,
    bf16_dot: bool | None = None,
    activations: str | bool | None = None,
    biases: tuple | None = None,
) -> torch.Tensor:
    """y [T, H] float32 = sum over (t, slot) with topk_ids[t, slot] in `experts` (None: all) of
    topk_weights[t, slot] * down(act(gate x_t) * up x_t).

    act: an activation name (ACT_CODES), or "clamped_swiglu:ALPHA:LIMIT" (gpt-oss); biases: (gate [E, I], up [E, I],
    down [E, H]) added after each product (gpt-oss; any may be None).

    layer: packed tiles (`pack_layer`) or a bf16 model's stacked tensors read in place (`plain_layer`), same
    semantics. x [T, H] float32 or bfloat16; topk_ids [T, k] int; topk_weights [T, k]; all on the CPU. threads: the
    kernel's OpenMP threads (default: physical cores); the mm and torch routes use torch's intra-op threads of the
    caller. route: "auto" (kernel, and torch.mm for experts with at least `mm_min_tokens` tokens; -1: the machine's
    default, `default_mm_min_tokens()`), "kernel", "mm", or "torch" (the fallback; "auto" falls back to it where
    the kernel is unavailable). prefetch: software prefetch distance in bytes inside the kernel (0: none).
    bf16_dot: bf16 weights (tiled or plain) and 4-bit tiles multiply with AVX512_BF16 dot products (None: where the
    CPU has them and x is bf16, whose products they compute exactly; False: fp32 lanes). activations: "int8" (or
    True): the tiles of INT8_FORMATS multiply activations quantized to int8 per 256 columns (approximate); "exact"
    (False): as they are; "auto": `int8_bits`' rule; None: CADENZA_CPU_ACTIVATIONS, else auto.
    """
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}: use one of {', '.join(ROUTES)}")
    if kernel_act(act) is None:
        raise ValueError(
            f"activation {act!r} is not supported: use one of {', '.join(ACT_CODES)}, or clamped_swiglu:ALPHA:LIMIT"
        )
    plain = isinstance(layer, PlainExperts)
    if plain:
        layer.check()  # the kernel reads these tensors' memory in place
    elif not isinstance(layer, PackedExperts):
        raise ValueError(f"layer must be PackedExperts (pack_layer) or PlainExperts (plain_layer), not {type(layer)}")
    t, h = x.shape
    if h != layer.hidden:
        raise ValueError(f"x has {h} features, the experts {layer.hidden}")
    lib = _load() if route != "torch" else None
    if route == "kernel" and lib is None:
        raise RuntimeError(f"the CPU kernel is unavailable: {_library.reason}")
    if lib is None and route in ("auto", "kernel"):
        route = "torch"
    experts = list(range(layer.num_experts)) if experts is None else [int(e) for e in experts]
    x = x.contiguous() if x.dtype in (torch.float32, torch.bfloat16) else x.float().contiguous()
    ids = topk_ids.to(torch.int64).contiguous()
    w = topk_weights.to(torch.float32).contiguous()
    y = torch.zeros(t, h, dtype=torch.float32)
    if t == 0 or not experts:
        return y
    chunked = _plain_forward if plain else _chunked_forward
    if route == "torch":
        chunked(layer, x, ids, w, experts, act, y, mm_dtype=torch.float32, biases=biases)
        return y
    threads = threads or _default_threads()
    if route == "mm":
        chunked(layer, x, ids, w, experts, act, y, mm_dtype=torch.bfloat16, lib=lib, threads=threads, biases=biases)
        return y
    big: list[int] = []
    if route == "auto":
        limit = default_mm_min_tokens() if mm_min_tokens == -1 else mm_min_tokens
        if limit is not None and t >= limit:
            counts = torch.bincount(ids.view(-1), minlength=layer.num_experts).tolist()
            big = [e for e in experts if counts[e] >= limit]
    small = [e for e in experts if e not in big]
    if small:
        # bf16 inputs multiply exactly with vdpbf16ps; fp32 ones would lose bits past 16 (hi + lo): fp32 lanes
        bf16_dot = has_bf16_dot() and x.dtype == torch.bfloat16 if bf16_dot is None else bf16_dot
        dot = int(bf16_dot) * DOT_BF16 | int8_bits(activations, x.dtype)
        kernel = _plain_kernel_forward if plain else _kernel_forward
        kernel(lib, layer, x, ids, w, small, act, threads, prefetch, dot, y, biases)
    if big:
        chunked(layer, x, ids, w, big, act, y, mm_dtype=torch.bfloat16, lib=lib, threads=threads, biases=biases)
    return y


def _default_threads() -> int:
    from cadenza.moe.cpu import physical_cores

    return physical_cores()


def _mask(num_experts: int, experts: list[int]) -> ctypes.Array:
    mask = (ctypes.c_uint8 * num_experts)()
    for e in experts:
        if not 0 <= e < num_experts:
            raise ValueError(f"expert {e} out of range 0..{num_experts - 1}")
        mask[e] = 1
    return mask


def _call_args(x, ids, w, mask, act, threads, prefetch, dot, y, extra) -> tuple:
    """The kernel entries' common tail: x .. y, then the Extra. dot: the DOT_* bits."""
    return (
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        x.shape[0],
        ids.data_ptr(),
        w.data_ptr(),
        ids.shape[1],
        ctypes.addressof(mask),
        kernel_act(act)[0],
        threads,
        prefetch,
        int(dot),
        y.data_ptr(),
        ctypes.byref(extra),
    )


def _layer_args(p: PackedExperts) -> tuple:
    """The packed entries' leading arguments: format, shapes, the gate/up and down matrices."""
    gu, dn = p.gate_up, p.down
    for m in (gu, dn):  # the kernel walks tiles by byte offsets from each expert's first tile
        if m.device.type != "cpu" or m.stride(2) != 1 or m.stride(1) != m.shape[2]:
            raise ValueError("packed experts must be CPU tensors with contiguous tiles (as pack_layer makes them)")
    (gf, gg), (df, dg) = p.matrix_format("gate_up"), p.matrix_format("down")
    return (
        KERNEL_FORMATS.index(gf),
        gg,
        KERNEL_FORMATS.index(df),
        dg,
        p.num_experts,
        p.hidden,
        p.intermediate,
        p.hidden_pad,
        p.inter_pad,
        gu.data_ptr(),
        gu.stride(0),
        gu.shape[2],
        p.gu_header,
        dn.data_ptr(),
        dn.stride(0),
        dn.shape[2],
        p.dn_header,
    )


def _plain_args(p: PlainExperts) -> tuple:
    return p.num_experts, p.hidden, p.intermediate, p.gate.data_ptr(), p.up.data_ptr(), p.down.data_ptr()


def _kernel_forward(lib, p: PackedExperts, x, ids, w, experts, act, threads, prefetch, dot, y, biases) -> None:
    mask = _mask(p.num_experts, experts)
    extra, _held = _extra(act, biases)
    rc = lib.cadenza_moe_forward(*_layer_args(p), *_call_args(x, ids, w, mask, act, threads, prefetch, dot, y, extra))
    if rc != 0:
        raise RuntimeError(f"cadenza_moe_forward failed ({rc})")


def _plain_kernel_forward(lib, p: PlainExperts, x, ids, w, experts, act, threads, prefetch, dot, y, biases):
    mask = _mask(p.num_experts, experts)
    extra, _held = _extra(act, biases)
    rc = lib.cadenza_moe_forward_plain(
        *_plain_args(p), *_call_args(x, ids, w, mask, act, threads, prefetch, dot, y, extra)
    )
    if rc != 0:
        raise RuntimeError(f"cadenza_moe_forward_plain failed ({rc})")


# --- jobs: a layer's step with fixed buffers, run by whoever holds the pointer (cadenza.moe.offload.streamed) ---


_JOB_HELD: dict[int, tuple] = {}  # job address -> the bias tensors its Extra points into, until job_free


def job_new(
    layer,
    x,
    ids,
    w,
    mask,
    act: str,
    threads: int,
    y,
    stats,
    ring: int,
    prefetch: int = 0,
    biases=None,
    activations=None,
) -> int:
    """A job computing y [T, H] fp32 = the pairs of ids [T, k] routed to experts with mask[e] != 0, from x [T, H]
    (fp32 or bf16) and w [T, k] fp32, whenever `job_run` (or a CUDA stream, through `job_function`) runs it. Every
    tensor is read or written in place at each run, so the caller keeps them alive and fixed (pinned staging
    buffers); stats: int64 [8 + E + 2 ring] (see cpu_moe.cpp); act and biases as `moe_forward` (the biases are
    copied to fp32 once, held until `job_free`); activations as `moe_forward`'s. Returns the job's address; `job_free`
    frees it."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernel is unavailable: {_library.reason}")
    if kernel_act(act) is None:
        raise ValueError(
            f"activation {act!r} is not supported: use one of {', '.join(ACT_CODES)}, or clamped_swiglu:ALPHA:LIMIT"
        )
    extra, held = _extra(act, biases)
    tensors = {"x": x, "ids": ids, "w": w, "mask": mask, "y": y, "stats": stats}
    want = {"ids": torch.int64, "w": torch.float32, "mask": torch.uint8, "y": torch.float32, "stats": torch.int64}
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype != want.get(name, t.dtype):
            raise ValueError(f"job buffer {name} must be a contiguous CPU tensor of {want.get(name, 'its')} dtype")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")
    dot = int(has_bf16_dot() and x.dtype == torch.bfloat16) * DOT_BF16 | int8_bits(activations, x.dtype)
    num_experts = layer.num_experts
    if mask.numel() != num_experts or stats.numel() < 8 + num_experts + 2 * ring:
        raise ValueError("mask must hold one entry per expert and stats 8 + E + 2 ring")
    step = (
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        x.shape[0],
        ids.data_ptr(),
        w.data_ptr(),
        ids.shape[1],
        mask.data_ptr(),
        kernel_act(act)[0],
        threads,
        prefetch,
        dot,
        y.data_ptr(),
        ctypes.byref(extra),
        stats.data_ptr(),
        ring,
    )
    if isinstance(layer, PlainExperts):
        layer.check()
        ptr = lib.cadenza_job_new_plain(*_plain_args(layer), *step)
    else:
        ptr = lib.cadenza_job_new_packed(*_layer_args(layer), *step)
    if not ptr:
        raise RuntimeError("cadenza_job_new failed")
    _JOB_HELD[ptr] = held
    return ptr


def job_run(ptr: int) -> None:
    """Runs a job now, on this thread (ctypes releases the GIL)."""
    _load().cadenza_job_run(ptr)


def job_free(ptr: int) -> None:
    _load().cadenza_job_free(ptr)
    _JOB_HELD.pop(ptr, None)


def read_spans(p: PackedExperts, experts: list[int], threads: int) -> int:
    """Reads the tiles of `experts` (their gate/up, then down matrices) on `threads` threads, 64-byte loads and no
    arithmetic: a one-token call's bytes at the rate memory gives them (cadenza.bench.cpu_kernel's ceiling for the
    kernel). Returns the xor of the lines read."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernel is not available here ({unavailable_reason()})")
    spans = [m[e] for e in experts for m in (p.gate_up, p.down)]
    ptrs = (ctypes.c_void_p * len(spans))(*(s.data_ptr() for s in spans))
    sizes = (ctypes.c_int64 * len(spans))(*(s.numel() for s in spans))
    return lib.cadenza_read_spans(ptrs, sizes, len(spans), threads)


def job_function() -> int:
    """The address of `void cadenza_job_run(void*)`, for cuLaunchHostFunc."""
    return ctypes.cast(_load().cadenza_job_run, ctypes.c_void_p).value


def _dequant_chunk(p: PackedExperts, which: str, e: int, t0: int, t1: int, buf, lib, threads) -> torch.Tensor:
    """Rows of tiles [t0, t1) of expert e's gate_up or down matrix, [4 (t1 - t0), K] in buf's dtype: bf16 by the
    extension into `buf` (reused: a fresh buffer per chunk would page-fault at every call), else by torch."""
    tiles = getattr(p, which)[e]
    k = p.hidden_pad if which == "gate_up" else p.inter_pad
    fmt, group = p.matrix_format(which)
    if lib is None or buf.dtype != torch.bfloat16:
        return dequantize_tiles(tiles[t0:t1], fmt, group, k).to(buf.dtype)
    out = buf[: (t1 - t0) * ROWS * k].view((t1 - t0) * ROWS, k)
    header = p.gu_header if which == "gate_up" else p.dn_header
    lib.cadenza_dequant_bf16(
        KERNEL_FORMATS.index(fmt), group, tiles.data_ptr(), tiles.shape[1], header, k, t0, t1, out.data_ptr(), threads
    )
    return out


def _routed(ids: torch.Tensor, w: torch.Tensor, experts):
    """For each of `experts` that some token is routed to: (the expert, the tokens routed to it, their weights
    [n, 1]); ids and w [T, k]."""
    flat_ids, flat_w = ids.view(-1), w.view(-1)
    k = ids.shape[1]
    for e in experts:
        pairs = torch.nonzero(flat_ids == e).view(-1)
        if pairs.numel():
            yield e, pairs // k, flat_w[pairs, None]


def _padded_biases(biases, ip: int, hp: int) -> tuple:
    """(gate, up, down) biases as fp32 [E, Ip], [E, Ip], [E, Hp] (zeros past I, H), or Nones."""
    out = []
    for b, n in zip(biases or (None, None, None), (ip, ip, hp), strict=True):
        if b is None:
            out.append(None)
            continue
        full = torch.zeros(b.shape[0], n, dtype=torch.float32)
        full[:, : b.shape[1]] = b.float()
        out.append(full)
    return tuple(out)


def _chunked_forward(
    p: PackedExperts, x, ids, w, experts, act, y, mm_dtype, lib=None, threads=None, biases=None
) -> None:
    """Per expert, chunks of its rows dequantized to `mm_dtype` and multiplied with torch.mm: the "mm" route in
    bf16 (matrix units), the "torch" fallback / reference in fp32."""
    from cadenza.models.common import glu_fn

    glu = glu_fn(act)
    hp, ip = p.hidden_pad, p.inter_pad
    gb, ub, db = _padded_biases(biases, ip, hp)
    el = torch.finfo(mm_dtype).bits // 8
    ct1 = max(1, _CHUNK_BYTES // (ROWS * hp * el))  # tiles per chunk
    ct2 = max(1, _CHUNK_BYTES // (ROWS * ip * el))
    buf = torch.empty(_CHUNK_BYTES // el, dtype=mm_dtype) if lib is not None else torch.empty(0, dtype=mm_dtype)
    xp = torch.zeros(x.shape[0], hp, dtype=mm_dtype)
    xp[:, : p.hidden] = x
    for e, tokens, weights in _routed(ids, w, experts):
        xe = xp[tokens]  # [n, Hp]
        n = xe.shape[0]
        hbuf = torch.empty(n, ip, dtype=mm_dtype)
        for t0 in range(0, ip // 2, ct1):
            t1 = min(ip // 2, t0 + ct1)
            rows = _dequant_chunk(p, "gate_up", e, t0, t1, buf, lib, threads)  # [4 (t1 - t0), Hp]
            gu = torch.mm(xe, rows.t()).float().view(n, t1 - t0, 2, 2)  # [n, tiles, gate|up, 2]
            g, u = gu[:, :, 0].reshape(n, -1), gu[:, :, 1].reshape(n, -1)
            g = g if gb is None else g + gb[e, 2 * t0 : 2 * t1]
            u = u if ub is None else u + ub[e, 2 * t0 : 2 * t1]
            hbuf[:, 2 * t0 : 2 * t1] = glu(g, u).to(mm_dtype)
        ye = torch.empty(n, hp, dtype=torch.float32)
        for t0 in range(0, hp // ROWS, ct2):
            t1 = min(hp // ROWS, t0 + ct2)
            rows = _dequant_chunk(p, "down", e, t0, t1, buf, lib, threads)  # [4 (t1 - t0), Ip]
            ye[:, ROWS * t0 : ROWS * t1] = torch.mm(hbuf, rows.t()).float()
        if db is not None:
            ye += db[e]
        y.index_add_(0, tokens, ye[:, : p.hidden] * weights)


def _plain_forward(p: PlainExperts, x, ids, w, experts, act, y, mm_dtype, lib=None, threads=None, biases=None):
    """The "mm" and "torch" routes on plain bf16 experts: per expert, torch.mm on row chunks of its own tensors (bf16:
    the rows as they are, oneDNN / AMX; fp32: the chunk converted, the fallback / reference)."""
    from cadenza.models.common import glu_fn

    glu = glu_fn(act)
    gb, ub, db = _padded_biases(biases, p.intermediate, p.hidden)
    h, i = p.hidden, p.intermediate
    el = torch.finfo(mm_dtype).bits // 8
    c1 = max(1, _CHUNK_BYTES // (2 * h * el))  # gate and up rows per chunk
    c2 = max(1, _CHUNK_BYTES // (i * el))  # down rows per chunk
    for e, tokens, weights in _routed(ids, w, experts):
        xe = x[tokens].to(mm_dtype)  # [n, H]
        n = xe.shape[0]
        hbuf = torch.empty(n, i, dtype=mm_dtype)
        for i0 in range(0, i, c1):
            i1 = min(i, i0 + c1)
            g = torch.mm(xe, p.gate[e, i0:i1].to(mm_dtype).t()).float()
            u = torch.mm(xe, p.up[e, i0:i1].to(mm_dtype).t()).float()
            g = g if gb is None else g + gb[e, i0:i1]
            u = u if ub is None else u + ub[e, i0:i1]
            hbuf[:, i0:i1] = glu(g, u).to(mm_dtype)
        ye = torch.empty(n, h, dtype=torch.float32)
        for h0 in range(0, h, c2):
            h1 = min(h, h0 + c2)
            ye[:, h0:h1] = torch.mm(hbuf, p.down[e, h0:h1].to(mm_dtype).t()).float()
        if db is not None:
            ye += db[e]
        y.index_add_(0, tokens, ye * weights)
