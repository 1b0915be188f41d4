"""`cadenza bench --scenario T1 / T2` (cadenza.bench.throughput_job): an offline job's rows, and the roofline."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cadenza.bench.throughput_job import roofline
from tests.cli.test_cli import cli


def test_roofline_is_the_link_plus_the_host_cache_reads():
    plan = SimpleNamespace(link_bytes_per_step=int(54e9 * 0.2), h2d_gb_s=25.0)  # 0.2 s of link at 54 GB/s
    machine = {"pinned_h2d_gb_s": 54.0, "dram_read_gb_s": 100.0}
    gpu = roofline(plan, 256, 192.0, 131072, False, machine)
    assert gpu["roofline_link_s"] == pytest.approx(0.2) and gpu["roofline_kv_read_s"] == 0
    assert gpu["roofline_tok_s"] == pytest.approx(256 / 0.2)
    host = roofline(plan, 1024, 192.0, 131072, True, machine)
    kv_s = 1024 * 192 * 131072 / 100e9
    assert host["roofline_kv_read_s"] == pytest.approx(kv_s)
    assert host["roofline_tok_s"] == pytest.approx(1024 / (0.2 + kv_s))
    # without a measured link (no GPU), the plan's rate
    assert roofline(plan, 1, 10.0, 1, False, {})["roofline_link_s"] == pytest.approx(54e9 * 0.2 / 25e9)


def test_t1_on_the_cpu_writes_both_rows(tmp_path):
    r = cli("bench", "--scenario", "T1", "--device", "cpu", "--prompts", "5", "--prompt-tokens", "6",
            "--new-tokens", "3", "--out", str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    (path,) = tmp_path.glob("T1-*.json")
    out = json.loads(path.read_text())
    assert out["complete"] and "--scenario T1" in out["command"]
    rows = out["results"]
    assert [(row["kv_cache"], row["micro_batches"]) for row in rows] == [("gpu", 1), ("host", 1), ("host", 2)]
    for row in rows:
        assert row["generated_tokens"] == 5 * 3 and row["throughput_tok_s"] > 0 and row["max_batch"] >= 1
        assert row["plan"]["kv_on_host"] == (row["kv_cache"] == "host") and row["prompts"] == 5
    assert "host memory" in rows[1]["cuda_graphs"] or "no CUDA" in rows[1]["cuda_graphs"]
    bad = cli("bench", "--scenario", "T1,D1", "--device", "cpu")
    assert bad.returncode != 0 and "on its own" in bad.stderr
