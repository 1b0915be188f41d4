"""Import layering: the kernels sit below the models, the bench and the demo model, so importing them must not
pull those in."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def loaded_after(statement: str) -> set[str]:
    """The cadenza modules in sys.modules after `statement`, in a fresh interpreter."""
    code = (
        f"import json, sys\n{statement}\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('cadenza'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.splitlines()[-1]))


def test_cpu_kernel_imports_neither_bench_nor_demo():
    loaded = loaded_after("import cadenza.kernels.cpu_moe")
    assert "cadenza.kernels.cpu_moe" in loaded
    assert not any(m == "cadenza.bench" or m.startswith("cadenza.bench.") for m in loaded), sorted(loaded)
    assert "cadenza.demo" not in loaded and "cadenza.cli" not in loaded, sorted(loaded)


def test_shared_cli_flags_import_no_command():
    loaded = loaded_after("import cadenza.cli.flags")  # what cadenza.bench imports for its own parser
    assert not any(m.startswith("cadenza.bench") for m in loaded), sorted(loaded)
    assert not {"cadenza.cli.run", "cadenza.cli.serve", "cadenza.cli.bench"} & loaded, sorted(loaded)


def test_openmp_threads_spin_briefly_by_default_only_where_a_gpu_is_and_libgomp_is_not_loaded():
    import cadenza

    env: dict[str, str] = {}
    cadenza.openmp_wait_default(env, torch_loaded=False, gpu=True)
    assert env == {"GOMP_SPINCOUNT": "10000"}
    for torch_loaded, gpu in ((True, True), (False, False), (True, False)):
        env = {}
        cadenza.openmp_wait_default(env, torch_loaded=torch_loaded, gpu=gpu)
        assert env == {}, (torch_loaded, gpu)
    env = {"GOMP_SPINCOUNT": "300000"}  # the user's own setting stays
    record: dict[str, str] = {}
    cadenza.openmp_wait_default(env, torch_loaded=False, gpu=True, record=record)
    assert env == {"GOMP_SPINCOUNT": "300000"} and record == {}


def test_a_peer_runs_without_what_cadenza_set_for_itself(monkeypatch):
    """llama-bench beside cadenza gets the user's environment: a GOMP_SPINCOUNT set by cadenza's import is not
    passed on (it slowed llama.cpp ~30% on the box), one the user set is."""
    import cadenza
    from cadenza.bench.llama_bench import run_llama_bench

    probe = ["/bin/sh", "-c", 'echo "${GOMP_SPINCOUNT-unset} $OTHER"']
    monkeypatch.setenv("OTHER", "kept")
    monkeypatch.setitem(cadenza.SET_AT_IMPORT, "GOMP_SPINCOUNT", "0")
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert run_llama_bench(probe, 30).stdout.split() == ["unset", "kept"]
    monkeypatch.setenv("GOMP_SPINCOUNT", "500")  # the user's own value (not the one cadenza set): passed on
    assert run_llama_bench(probe, 30).stdout.split() == ["500", "kept"]
    assert os.environ["GOMP_SPINCOUNT"] == "500"  # cadenza's own environment is untouched
