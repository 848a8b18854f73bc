"""`harken bench` as a subprocess: the JSON it prints for both paths, the daemon search's fields,
and one-line errors with exit code 2. Figures are printed, never asserted on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.daemon_bench import sustained

REPO = Path(__file__).resolve().parents[2]
ROW_FIELDS = {"encoder", "path", "device", "precision", "batch", "windows_per_s", "batch_p50_ms",
              "batch_p95_ms", "window_ms", "peak_rss_mb", "cuda_max_alloc_mb", "weights"}


def harken(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def test_bench_json_has_both_paths_and_the_ratio():
    r = harken("bench", "--encoder", "mel", "--batch", "1,2", "--seconds", "0.2",
               "--precision", "fp32", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # stdout is the JSON object alone; progress goes to stderr
    rows = out["rows"]
    assert all(set(row) == ROW_FIELDS for row in rows)
    harken_rows = [row for row in rows if row["path"] == "harken"]
    ref_rows = [row for row in rows if row["path"] == "reference"]
    assert sorted(row["batch"] for row in harken_rows) == [1, 2]
    assert [row["batch"] for row in ref_rows] == [1]  # the reference runs one window at a time
    for row in rows:
        assert row["encoder"] == "mel" and row["device"] == "cpu"
        assert row["windows_per_s"] > 0 and row["batch_p95_ms"] >= row["batch_p50_ms"] > 0
        assert row["peak_rss_mb"] > 0 and row["cuda_max_alloc_mb"] is None
    s = out["speedup"]["mel"]
    assert s["speedup"] == pytest.approx(s["best_windows_per_s"] / s["reference_windows_per_s"])
    env = out["environment"]
    assert env["cpu_threads"] == 1 and env["torch"] and "load_average_1m" in env
    assert "random-initialised" in env["note"]


def test_bench_text_output_names_weights_and_ratio():
    r = harken("bench", "--encoder", "mel", "--batch", "1", "--seconds", "0.1",
               "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert "random-initialised" in r.stdout
    assert "b/a" in r.stdout and "windows/s" in r.stdout


def test_bench_daemon_reports_sources_and_latency():
    r = harken("bench", "--daemon", "--encoder", "mel", "--sources", "1,2", "--seconds", "2",
               "--time-scale", "5", "--threads", "1", "--json", timeout=180)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["encoder"] == "mel" and out["time_scale"] == 5.0 and out["hop_s"] == 10.0
    assert [run["n_sources"] for run in out["runs"]] == [1, 2]
    for run in out["runs"]:
        assert run["windows_produced"] >= run["n_sources"]
        assert run["windows_scored"] + run["windows_dropped"] >= run["windows_produced"]
        assert run["sustained"] == sustained(run)
    best = [run for run in out["runs"] if run["sustained"]]
    assert out["max_sources"] == (max(run["n_sources"] for run in best) if best else 0)
    assert out["max_equivalent_realtime_sources"] == out["max_sources"] * 5.0
    if best:
        at = next(run for run in best if run["n_sources"] == out["max_sources"])
        assert out["latency_ms_p95"] == at["latency_ms_p95"]


def test_sustained_needs_no_drops_and_latency_under_the_scaled_hop():
    ok = {"windows_dropped": 0, "windows_produced": 10, "windows_scored": 10,
          "latency_ms_p95": 900.0, "hop_s": 10.0, "time_scale": 10.0}
    assert sustained(ok)
    assert not sustained({**ok, "windows_dropped": 1})
    assert not sustained({**ok, "windows_scored": 9})
    assert not sustained({**ok, "latency_ms_p95": 1100.0})  # the scaled hop is 1000 ms
    assert not sustained({**ok, "windows_produced": 0})


@pytest.mark.parametrize("args, message", [
    (["--batch", "1,x"], "--batch takes comma-separated integers"),
    (["--batch", "0"], "--batch takes integers >= 1"),
    (["--seconds", "0"], "--seconds must be > 0"),
    (["--precision", "int8"], "--precision takes fp32, bf16 or fp16"),
    (["--precision", "fp16"], "--precision fp16 needs --device cuda"),
    (["--encoder", "nope"], "no benchmark for encoder 'nope'"),
    (["--device", "tpu"], "device must be auto, cpu or cuda"),
    (["--sources", "1,2"], "--sources goes with --daemon"),
    (["--daemon", "--encoder", "ast"], "--daemon benchmarks mel or efficientat"),
    (["--daemon", "--sources", "a"], "--sources takes comma-separated integers"),
    (["--daemon", "--encoder", "efficientat", "--weights", "/nonexistent/mn04.pt"],
     "efficientat weights not found at /nonexistent/mn04.pt"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    from monitor.cli import main  # in-process: a subprocess per case would cost seconds each

    argv = ["bench", *args] if "--seconds" in args else ["bench", "--seconds", "0.1", *args]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_bad_argument_exits_2_from_the_command_line():
    r = harken("bench", "--batch", "1,x")
    assert r.returncode == 2 and r.stderr.strip() == (
        "harken: error: --batch takes comma-separated integers, got '1,x'")
