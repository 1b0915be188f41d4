"""`python -m cadenza.bench.cpu_kernel --peer kt-kernel`: what can be checked without kt-kernel and its CPU.

kt-kernel (an AMX + AVX-512 wheel for CPython 3.12) runs only on the benchmark machine, so its timings are not
tested here: these tests cover the arguments, the one-line failure (exit 2, naming the fix) when it cannot run,
the bytes each of its formats reads, the fp32 reference its error is measured against, and the cadenza-vs-peer
comparison computed from result rows.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

import pytest
import torch

from cadenza.bench import cpu_kernel
from cadenza.bench import kt_kernel_peer as kt
from cadenza.models.common import glu_fn
from cadenza.moe.experts import expert_order, run_experts

ALL_FLAGS = set(kt.NEEDED_FLAGS)


def test_peer_arguments():
    ap = cpu_kernel.build_parser()
    assert ap.parse_args([]).peer is None
    args = ap.parse_args(["--peer", "kt-kernel", "--kt-methods", "AMXINT8"])
    assert (args.peer, args.kt_methods) == ("kt-kernel", "AMXINT8")
    with pytest.raises(SystemExit):
        ap.parse_args(["--peer", "llama.cpp"])


def test_unknown_kt_method_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        cpu_kernel.main(["--model", "mixtral-tiny", "--peer", "kt-kernel", "--kt-methods", "AMXINT3"])
    assert e.value.code == 2
    assert "unknown kt-kernel method AMXINT3" in capsys.readouterr().err


def test_missing_kt_kernel_exits_2_at_once(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kt_kernel" else real(name, *a))

    def too_late(*_):
        raise AssertionError("the peer must be checked before the DRAM measurement")

    monkeypatch.setattr(cpu_kernel, "measure_dram_read_gb_s", too_late)
    assert cpu_kernel.main(["--model", "mixtral-tiny", "--peer", "kt-kernel"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kt-kernel peer unavailable: the kt_kernel package is not importable")
    assert "kt-kernel 0.6.1 wheel" in err[0] and "torch >= 2.10, < 2.12" in err[0] and "PYTHONPATH" in err[0]


def test_load_says_why(tmp_path, monkeypatch):
    pkg = tmp_path / "kt_kernel"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('load() must not run the package')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kt_kernel", raising=False)
    other = pkg / "kt_kernel_ext.cpython-30-x86_64-linux-gnu.so"  # built for another Python
    other.write_bytes(b"")
    with pytest.raises(kt.Unavailable, match="none for this Python"):
        kt.load(ALL_FLAGS)
    mine = pkg / f"kt_kernel_ext{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    mine.write_bytes(b"")  # not a shared object: dlopen refuses it
    with pytest.raises(kt.Unavailable, match="lacks amx_tile, amx_int8, amx_bf16, avx512f"):
        kt.load({"avx2", "fma"})
    with pytest.raises(kt.Unavailable, match="does not load"):
        kt.load(ALL_FLAGS)


def test_cpu_flags():
    info = "processor\t: 0\nflags\t\t: fpu avx512f avx512bw avx512vnni avx512_vbmi avx512_bf16 amx_tile\n\n"
    flags = kt.cpu_flags(info)
    assert kt.missing_flags(flags) == ["amx_int8", "amx_bf16"]  # avx512vnni: the spelling without "_" counts
    assert kt.missing_flags(ALL_FLAGS) == []


def test_expert_bytes_per_method():
    h, i = 4096, 14336  # Mixtral-8x7B
    m = kt.METHODS
    assert m["BF16"].expert_bytes(h, i) == 2 * 3 * h * i
    assert m["AMXINT8"].expert_bytes(h, i) == 3 * h * i + 4 * (2 * i + h)  # fp32 scale per output row
    assert m["AMXINT8"].expert_bytes(h, i, tp=2) == 3 * h * i + 4 * (2 * i + 2 * h)  # down's rows split in two
    assert m["AMXINT4"].expert_bytes(h, i) == 3 * h * i // 2 + 4 * (2 * i + h)
    assert m["AMXINT4_1KGROUP"].expert_bytes(h, i) == 3 * h * i * 5 // 8  # 0.5 + 8 / 64 bytes per weight
    assert m["AMXINT4_1KGROUP"].quant() == {
        "bits": 4,
        "group_size": 64,
        "symmetric": False,
        "scales": "fp32 scale + fp32 min per group",
    }
    assert m["AMXINT8"].quant()["group_size"] == "per-channel" and m["BF16"].quant()["symmetric"] is None


def test_selected_methods():
    assert [x.name for x in kt.selected("", ["int4", "int8"])] == ["AMXINT4", "AMXINT4_1KGROUP", "AMXINT8"]
    assert [x.name for x in kt.selected("AMXINT4,BF16", ["bf16", "int4"])] == ["BF16", "AMXINT4"]
    assert kt.selected("BF16", ["int8"]) == []
    with pytest.raises(ValueError, match="unknown kt-kernel method INT4"):
        kt.selected("INT4", ["int4"])


def test_reference_is_the_layer():
    g = torch.Generator().manual_seed(0)
    e, h, i, t, k = 6, 64, 48, 5, 2
    gate, up = (torch.randn(e, i, h, generator=g).bfloat16() for _ in range(2))
    down = torch.randn(e, h, i, generator=g).bfloat16()
    x = torch.randn(t, h, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    want = torch.zeros(t, h)
    counts = torch.bincount(ids.reshape(-1), minlength=e).tolist()
    active = [j for j in range(e) if counts[j]]
    experts = lambda j: (gate[j].float(), up[j].float(), down[j].float())
    run_experts(x.float(), k, w, expert_order(ids), counts, active, experts, glu_fn("silu"), want)
    got = kt.reference(x, ids, w, gate, up, down)
    assert kt.rel(got, want) < 1e-5


def row(system, fmt, t, route, ms, gb_s, threads=16, **extra):
    head = {"system": system, "format": fmt, "tokens": t, "route": route, "layout": "tiled", "threads": threads}
    return head | {"ms_median": ms, "weight_gb_s": gb_s, **extra}


def test_compare_from_rows():
    h, i = 4096, 14336
    cad_eb, kt_eb = 3 * h * i + 4 * (2 * i + h), 3 * h * i // 2 + 4 * (2 * i + h)
    rows = [
        row("cadenza", "int8", 1, "kernel", 2.0, 80.0, expert_bytes=cad_eb, prefetch=0),
        row("cadenza", "int8", 1, "kernel", 1.6, 100.0, expert_bytes=cad_eb, prefetch=2048),  # the fastest
        row("cadenza", "int8", 1, "kernel", 1.0, 160.0, threads=32, expert_bytes=cad_eb),  # other thread count
        row("cadenza", "int8", 1, "torch-fallback", 0.5, 320.0, expert_bytes=cad_eb),  # not a kernel route
        row("cadenza", "int8", 8, "mm", 3.0, 60.0, expert_bytes=cad_eb),
        row("kt-kernel", "int8", 1, "kt:AMXINT8", 2.0, 80.0, method="AMXINT8", bytes_per_weight=1.0007),
        row("kt-kernel", "int8", 8, "kt:AMXINT8", 6.0, 30.0, method="AMXINT8", bytes_per_weight=1.0007),
        row("kt-kernel", "int4", 1, "kt:AMXINT4", 1.0, 90.0, method="AMXINT4", bytes_per_weight=kt_eb / (3 * h * i)),
    ]
    cmp = kt.compare(rows, h, i)
    assert [(c["format"], c["tokens"]) for c in cmp] == [("int8", 1), ("int8", 8)]  # int4: no cadenza row
    one, eight = cmp
    assert (one["cadenza_ms"], one["cadenza_gb_s"], one["peer_gb_s"]) == (1.6, 100.0, 80.0)
    assert one["gb_s_ratio"] == 1.25 and one["time_ratio"] == 1.25
    assert one["cadenza_bytes_per_weight"] == round(cad_eb / (3 * h * i), 4) == 1.0007
    assert (eight["cadenza_route"], eight["gb_s_ratio"], eight["time_ratio"]) == ("mm", 2.0, 2.0)
    assert eight["peer"] == "kt-kernel" and eight["peer_method"] == "AMXINT8"


def test_table_prints_both_systems(capsys):
    rows = [
        row("cadenza", "int8", 1, "kernel", 1.6, 100.0, expert_bytes=3),
        row("kt-kernel", "int8", 1, "kt:X", 2.0, 80.0),
    ]
    rows[-1].update(layout="kt", method="AMXINT8", bytes_per_weight=1.0)
    out = {
        "machine": {"cpu_model": "cpu", "threads": 16, "dram_read_gb_s": 95.0, "cpu_flags": []},
        "results": [r | {"dram_fraction": 0.5} for r in rows],
        "summary": {},
        "rel_err_vs_bf16": {},
        "peer": {"rel_err_vs_fp32": {"kt-kernel": {"AMXINT8": {"t1": 0.01}}}},
        "peer_comparison": kt.compare(rows, 1, 1),
    }
    cpu_kernel.print_table(out)
    text = capsys.readouterr().out
    assert "kt-kernel int8" in text and "cadenza   int8" in text
    assert text.strip().splitlines()[-1].split()[:4] == ["int8", "1", "AMXINT8", "100.0"]
