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


def subcommand_helps() -> dict[str, str]:
    import argparse

    from cadenza.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p.format_help() for name, p in sub.choices.items()}


def test_every_command_has_a_description_examples_and_advanced_last():
    helps = subcommand_helps()
    assert set(helps) == set(COMMANDS)
    for name, text in helps.items():
        usage, _, rest = text.partition("\n\n")
        description = rest.split("\n\n")[0]
        assert not description.startswith(("options:", "positional")) and len(description) > 80, (name, description)
        examples = text.split("\nexamples:\n")[1]
        assert sum(line.startswith(f"  cadenza {name}") for line in examples.splitlines()) >= 1, (name, examples)
        assert len([line for line in examples.splitlines() if not line.lstrip().startswith("#")]) >= 2, name
        if "\nadvanced" in text:  # the rare knobs come after every other group
            assert text.index("\nadvanced") > max(text.find("\noptions:"), text.find("\nsampling")), name
            assert "--expert-group" in text.split("\nadvanced")[1], name


def test_common_flags_come_before_the_rare_ones():
    text = subcommand_helps()["run"]
    advanced = text.split("\nadvanced")[1]
    for flag in ("--eviction", "--prefetch", "--cpu-threads", "--no-cuda-graphs", "--expert-group", "--no-cache"):
        assert f"  {flag}" in advanced, flag
    for flag in ("--model", "--gpu-memory", "--experts", "--max-context", "--prompt"):
        assert f"  {flag}" not in advanced, flag
