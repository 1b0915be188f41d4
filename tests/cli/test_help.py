"""`cadenza --help` and `cadenza <command> --help`: fast (no torch until a command runs) and enough to use a
command without the README."""

from __future__ import annotations

import json
import subprocess
import sys

from cadenza.cli import COMMANDS

HEAVY = ("torch", "numpy", "transformers", "safetensors")


def heavy_after(code: str) -> list[str]:
    """The heavy packages in sys.modules after `code`, in a fresh interpreter."""
    roots = "{m.split('.')[0] for m in sys.modules}"
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({roots} & {set(HEAVY)})))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_building_the_parser_imports_no_torch():
    assert heavy_after("import cadenza.cli\ncadenza.cli.build_parser()") == []


def test_help_imports_no_torch():
    for args in (["--help"], *([c, "--help"] for c in COMMANDS)):
        code = f"import cadenza.cli\ntry:\n    cadenza.cli.main({args!r})\nexcept SystemExit:\n    pass"
        assert heavy_after(code) == [], args


def test_the_package_still_gives_llm_on_use():
    assert heavy_after("import cadenza") == []
    assert "torch" in heavy_after("from cadenza import LLM, SamplingParams, GenerationResult")
