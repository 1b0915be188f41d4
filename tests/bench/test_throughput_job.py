"""`cadenza bench --scenario T1 / T2` (cadenza.bench.throughput_job): an offline job's rows, and the roofline."""

from __future__ import annotations

import gzip
import json
import re
import sys

import pytest

from cadenza import CadenzaError
from cadenza.bench.throughput_job import roofline
from tests.cli.test_cli import cli


def test_roofline_is_the_link_plus_the_host_cache_reads():
    link = 54e9 * 0.2  # 0.2 s of link at 54 GB/s
    machine = {"pinned_h2d_gb_s": 54.0, "dram_read_gb_s": 100.0}
    gpu = roofline(link, 25.0, 256, 192.0, 131072, False, machine)
    assert gpu["roofline_link_s"] == pytest.approx(0.2) and gpu["roofline_kv_read_s"] == 0
    assert gpu["roofline_tok_s"] == pytest.approx(256 / 0.2)
    host = roofline(link, 25.0, 1024, 192.0, 131072, True, machine)
    kv_s = 1024 * 192 * 131072 / 100e9
    assert host["roofline_kv_read_s"] == pytest.approx(kv_s)
    assert host["roofline_tok_s"] == pytest.approx(1024 / (0.2 + kv_s))
    # without a measured link (no GPU), the plan's rate
    assert roofline(link, 25.0, 1, 10.0, 1, False, {})["roofline_link_s"] == pytest.approx(54e9 * 0.2 / 25e9)


def test_t1_on_the_cpu_writes_every_row(tmp_path):
    r = cli("bench", "--scenario", "T1", "--device", "cpu", "--prompts", "5", "--prompt-tokens", "6",
            "--new-tokens", "3", "--out", str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    (path,) = [f for f in tmp_path.glob("T1-*.json") if "-timeline" not in f.stem]
    out = json.loads(path.read_text())
    assert out["complete"] and "--scenario T1" in out["command"]
    rows = out["results"]
    runs = [(row["kv_cache"], row["micro_batches"], row["generate_mode"]) for row in rows]
    assert all(row["prefill_chunk"] == 4096 for row in rows)  # (the default: cadenza batch's)
    throughput = [("gpu", 1, "throughput"), ("host", 1, "throughput"), ("host", 2, "throughput")]
    assert runs == [*throughput, ("gpu", 1, "together")]
    assert rows[3]["max_batch"] == rows[0]["max_batch"]  # the baseline: the latency mode at the GPU cache's batch
    for row in rows:
        # the roofline's link bytes are the run's placement's (its non-resident experts at the batch it ran)
        link_s = row["roofline_link_s"]
        resident, total = map(int, re.match(r"resident (\d+)/(\d+)", row["placement"]).groups())
        assert link_s >= 0 and (link_s == 0) == (resident == total)
        assert row["generated_tokens"] == 5 * 3 and row["throughput_tok_s"] > 0 and row["max_batch"] >= 1
        assert row["plan"]["kv_on_host"] == (row["kv_cache"] == "host") and row["prompts"] == 5
        # where the job's time went: each generated token after a prompt's first came from a decode or mixed pass
        passes = row["passes"]
        assert set(passes) <= {"prefill", "decode", "mixed"} and all(p["seconds"] >= 0 for p in passes.values())
        assert sum(passes[k]["passes"] for k in passes if k != "prefill") >= 3 - 1
        assert row["copy_runs_per_pass"] >= 0  # (the fetch slots' copies, where the run has slots)
    assert "host memory" in rows[1]["cuda_graphs"] or "no CUDA" in rows[1]["cuda_graphs"]
    # each run's timeline of its decode steps: the engine's step marks, and with the cache on the host the CPU
    # attention's spans on the threads that ran them
    assert "timeline" not in rows[3]  # (the baseline's steps are the GPU-cache row's)
    for row, run in zip(rows[:3], ("gpu1", "host1", "host2"), strict=True):
        (tl,) = tmp_path.glob(f"T1-*-timeline-{run}.json.gz")
        assert row["timeline"][0] == tl.name
        written = json.loads(gzip.decompress(tl.read_bytes()))
        lanes = written["lanes"]
        assert "link" in written and written["link"] is None  # (no GPU copy streams on the CPU)
        kinds = {span[0] for spans in lanes.values() for span in spans}
        assert "decode" in kinds and all(lane.startswith(("CPU thread", "GPU stream")) for lane in lanes)
        assert "attention" in kinds or row["kv_cache"] == "gpu"  # (a CPU run attends there in both)
    bad = cli("bench", "--scenario", "T1,D1", "--device", "cpu")
    assert bad.returncode != 0 and "on its own" in bad.stderr


def test_t1_with_llama_batched_bench(tmp_path):
    """T1 --experts int4 --peer llama.cpp=PATH: llama-batched-bench on the same model as a Q4_0 GGUF, one row per
    number of parallel sequences (its -c the sequences' whole KV), then the best; the file deleted after."""
    pytest.importorskip("gguf")
    from cadenza.bench.llama_batched import PARALLEL

    stand_in = tmp_path / "llama-batched-bench"
    stand_in.write_text(
        f"#!{sys.executable}\nimport json, os, sys\nargv = sys.argv[1:]\na = lambda f: int(argv[argv.index(f) + 1])\n"
        "assert os.path.exists(argv[argv.index('-m') + 1]) and '--output-format' in argv\n"
        "pl, pp, tg = a('-npl'), a('-npp'), a('-ntg')\n"
        "assert a('-c') >= pl * (pp + tg)\n"
        "if pl == 64: sys.exit('out of memory')\n"
        "print('log line')\n"
        "print(json.dumps({'pl': pl, 'pp': pp, 'tg': tg, 't': 1.0 + 100 / pl, 'speed_tg': 9.0, 'speed_pp': 99.0}))\n"
    )
    stand_in.chmod(0o755)
    r = cli("bench", "--scenario", "T1", "--device", "cpu", "--prompts", "4", "--prompt-tokens", "6", "--new-tokens",
            "3", "--experts", "int4", "--out", str(tmp_path / "o"), "--peer", f"llama.cpp={stand_in}", "--peer-dir",
            str(tmp_path / "gguf"))  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    assert not list((tmp_path / "gguf").iterdir())
    (path,) = [f for f in (tmp_path / "o").glob("T1-*.json") if "-timeline" not in f.stem]
    rows = json.loads(path.read_text())["results"]
    peer = [row for row in rows if row["system"] == "llama.cpp"]
    measured = [row for row in peer if "summary" not in row]
    assert [row["parallel"] for row in measured] == list(PARALLEL)
    failed = [row for row in measured if row.get("skipped")]
    assert len(failed) == 1 and "out of memory" in failed[0]["skipped"]
    for row in measured:
        if not row.get("skipped"):
            pl = row["parallel"]
            assert row["throughput_tok_s"] == pytest.approx(pl * 3 / (1.0 + 100 / pl), rel=1e-3)
            assert row["expert_types"] and row["n_cpu_moe"] >= 0 and "--n-cpu-moe" in row["command"]
    (best,) = [row for row in peer if "summary" in row]
    assert best["parallel"] == max(PARALLEL)
    bad = cli("bench", "--scenario", "T1", "--device", "cpu", "--peer", f"llama.cpp={stand_in}")
    assert bad.returncode != 0 and "--experts int4" in bad.stderr


def test_runs_choose_the_rows(tmp_path):
    from cadenza.bench.throughput_job import RUNS, parse_runs
    from cadenza.errors import CadenzaError

    assert parse_runs(None) == RUNS and parse_runs("none") == ()
    assert parse_runs("host2,gpu") == (("gpu", 1, "throughput"), ("host", 2, "throughput"))
    assert parse_runs("batched") == (("gpu", 1, "together"),) and len(RUNS) == 4
    with pytest.raises(CadenzaError, match="gpu, host, host2, batched"):
        parse_runs("gpu,disk")
    r = cli("bench", "--scenario", "T1", "--device", "cpu", "--prompts", "3", "--prompt-tokens", "4", "--new-tokens",
            "2", "--runs", "host", "--prefill-chunk", "8", "--no-timeline", "--out", str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    (path,) = [f for f in tmp_path.glob("T1-*.json") if "-timeline" not in f.stem]
    rows = json.loads(path.read_text())["results"]
    assert [(row["kv_cache"], row["prefill_chunk"]) for row in rows] == [("host", 8)]
    assert "timeline" not in rows[0] and not list(tmp_path.glob("*-timeline*"))
    for bad, why in ((["--scenario", "T1", "--runs", "none"], "only the peer"), (["--scenario", "D1", "--runs", "gpu"],
                     "has none"), (["--scenario", "D1", "--prefill-chunk", "64"], "has none"), (["--scenario", "D1",
                     "--no-timeline"], "has none")):  # fmt: skip
        r = cli("bench", *bad, "--device", "cpu", "--out", str(tmp_path))
        assert r.returncode != 0 and why in r.stderr


def test_peer_parallel_settings_parse():
    from cadenza.bench.llama_batched import PARALLEL, parse_parallel

    assert parse_parallel(None) == PARALLEL and parse_parallel("16, 64") == (16, 64)
    for bad in ("", "0", "16,many"):
        with pytest.raises(CadenzaError, match="--peer-parallel"):
            parse_parallel(bad)


def test_link_summary_reads_the_links_use_off_a_timeline():
    """cadenza.bench.timeline.link_summary on a made-up timeline of two steps: the copy-only streams' union is the
    link's busy time within the steps, the gaps of at least 1 ms between copies are counted, and the one that holds
    the second step's start is the step boundary's; the compute stream's copies are not the link's."""
    from cadenza.bench.timeline import link_summary

    timeline = {
        "lanes": {
            "CPU thread 1": [["decode", "cadenza.decode", 0.0, 10.0], ["decode", "cadenza.decode", 12.0, 22.0]],
            "GPU stream 7": [["kernel", "k", 0.0, 22.0], ["copy", "Memcpy HtoD", 4.0, 9.0]],
            "GPU stream 29": [["copy", "Memcpy HtoD", 1.0, 3.0], ["copy", "Memcpy HtoD", 2.5, 4.0]],
            "GPU stream 33": [["copy", "Memcpy HtoD", 4.5, 9.0], ["copy", "Memcpy HtoD", 14.0, 21.0]],
        },
        "span_ms": 22.0,
    }
    got = link_summary(timeline)
    assert got["steps_ms"] == [10.0, 10.0] and got["window_ms"] == 22.0
    assert got["link_busy_ms"] == 3.0 + 4.5 + 7.0 and got["link_busy_fraction"] == round(14.5 / 22, 3)
    assert got["gaps"] == 1 and got["gaps_total_ms"] == 5.0  # 9 -> 14 (4 -> 4.5 is under 1 ms)
    assert got["step_boundary_gaps_ms"] == [5.0]
    assert link_summary({"lanes": {"GPU stream 7": [["kernel", "k", 0.0, 1.0]]}, "span_ms": 1.0}) is None
