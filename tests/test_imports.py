"""Import layering: the kernels sit below the models, the bench and the demo model, so importing them must not
pull those in."""

from __future__ import annotations

import json
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


def test_openmp_threads_sleep_by_default_only_where_a_gpu_is_and_libgomp_is_not_loaded():
    import cadenza

    env: dict[str, str] = {}
    cadenza.openmp_wait_default(env, torch_loaded=False, gpu=True)
    assert env == {"GOMP_SPINCOUNT": "0"}
    for torch_loaded, gpu in ((True, True), (False, False), (True, False)):
        env = {}
        cadenza.openmp_wait_default(env, torch_loaded=torch_loaded, gpu=gpu)
        assert env == {}, (torch_loaded, gpu)
    env = {"GOMP_SPINCOUNT": "300000"}  # the user's own setting stays
    cadenza.openmp_wait_default(env, torch_loaded=False, gpu=True)
    assert env == {"GOMP_SPINCOUNT": "300000"}
