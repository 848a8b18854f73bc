"""The CLI driven as users drive it: subprocesses, real files, exit codes, one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.helpers import TINY_TRAIN_YAML, harken, tone_clip


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("harken: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for frag in fragments:
        assert frag in lines[0]


def test_train_evaluate_replay_end_to_end(tone_data, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(TINY_TRAIN_YAML)
    model = tmp_path / "model"
    proc = harken("train", "--data", str(tone_data), "--out", str(model), "--config", str(cfg),
                  "--device", "cpu", "--seed", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == str(model)
    assert (model / "manifest.json").is_file() and (model / "model.safetensors").is_file()

    report = tmp_path / "report"
    proc = harken("evaluate", "--model", str(model), "--data", str(tone_data), "--json",
                  "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)  # exactly one JSON object, nothing else on stdout
    assert {"auc", "pauc", "n_normal", "n_anomaly", "per_id"} <= set(metrics)
    assert metrics["n_normal"] == 8 and metrics["n_anomaly"] == 8
    assert 0.0 <= metrics["pauc"] <= 1.0
    for name in ("scores.csv", "roc.png", "histogram.png"):
        assert (report / name).stat().st_size > 0
    assert len((report / "scores.csv").read_text().splitlines()) == 17
    evidence = sorted((report / "evidence").glob("*.png"))
    assert len(evidence) == 4 and evidence[0].name.startswith("01_anomaly")
    assert metrics["report"]["evidence"] == [str(p) for p in evidence]

    out = tmp_path / "replay.jsonl"
    proc = harken("replay", "--model", str(model), str(tone_data / "test"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16
    assert set(rows[0]) == {"file", "machine_id", "window_start_s", "score", "threshold", "anomaly"}
    anomalous = [r["anomaly"] for r in rows if "anomaly_id" in r["file"]]
    assert sum(anomalous) >= 6


def test_replay_windows_long_files_with_hop(tiny_model, tmp_path):
    rng = np.random.default_rng(5)
    d = tmp_path / "long"
    d.mkdir()
    sf.write(d / "normal_id_00_00000000.wav", np.concatenate([tone_clip(rng, 0, False)] * 3), 16000)
    proc = harken("replay", "--model", str(tiny_model), str(d), "--hop-s", "5")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["window_start_s"] for r in rows] == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert all(r["machine_id"] == 0 for r in rows)


def test_bad_files_are_skipped_counted_and_named(tiny_model, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    rng = np.random.default_rng(0)
    sf.write(d / "normal_id_00_00000000.wav", tone_clip(rng, 0, False), 16000)
    (d / "normal_id_00_00000001.wav").write_text("not audio at all")
    sf.write(d / "normal_id_00_00000002.wav", np.zeros(160000, np.float32), 16000)  # silent
    nan = tone_clip(rng, 0, False)
    nan[100] = np.nan
    sf.write(d / "normal_id_00_00000003.wav", nan, 16000, subtype="FLOAT")
    good = d / "normal_id_00_00000004.wav"
    sf.write(good, tone_clip(rng, 0, False), 16000)
    data = good.read_bytes()
    (d / "normal_id_00_00000005.wav").write_bytes(data[: len(data) // 3])  # truncated
    proc = harken("--log-level", "info", "replay", "--model", str(tiny_model), str(d))
    assert proc.returncode == 0, proc.stderr
    scored = {json.loads(line)["file"].rsplit("/", 1)[1] for line in proc.stdout.splitlines()}
    assert scored == {"normal_id_00_00000000.wav", "normal_id_00_00000004.wav",
                      "normal_id_00_00000005.wav"}
    assert "normal_id_00_00000001.wav" in proc.stderr and "not a readable audio file" in proc.stderr
    assert "silent" in proc.stderr and "NaN" in proc.stderr
    assert '"skipped_unreadable": 2' in proc.stderr and '"skipped_silent": 1' in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,fragments", [
    (["train", "--data", "{tmp}/nope", "--out", "{tmp}/m"], ["nope", "no such directory"]),
    (["train", "--data", "{tmp}/empty", "--out", "{tmp}/m"], ["empty", "no .wav"]),
    (["evaluate", "--model", "{tmp}/missing-model", "--data", "{tmp}/empty"], ["missing-model", "does not exist"]),
    (["replay", "--model", "{model}", "{tmp}/nope"], ["nope", "no such directory"]),
    (["train", "--data", "{tmp}/junk", "--out", "{tmp}/m"], ["none of the 1 clips could be used"]),
    (["train", "--data", "{tmp}/empty", "--out", "{tmp}/m", "--device", "tpu"], ["device must be"]),
    (["train", "--data", "{tmp}/empty", "--out", "{tmp}/m", "--encoder", "wavenet"], ["unknown encoder 'wavenet'"]),
])
def test_user_mistakes_give_one_line_and_exit_2(tmp_path, tiny_model, args, fragments):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "normal_id_00_00000000.wav").write_bytes(b"RIFF\x00\x00")
    filled = [a.format(tmp=tmp_path, model=tiny_model) for a in args]
    if "--device" in filled or "--encoder" in filled:  # these fail before looking at data
        sf.write(tmp_path / "empty" / "normal_id_00_00000000.wav", np.ones(16000, np.float32) * 0.1, 16000)
    one_line_error(harken(*filled), *fragments)


def test_evaluate_needs_both_classes(tiny_model, tmp_path):
    d = tmp_path / "only-normal"
    d.mkdir()
    sf.write(d / "normal_id_00_00000000.wav", tone_clip(np.random.default_rng(0), 0, False), 16000)
    one_line_error(harken("evaluate", "--model", str(tiny_model), "--data", str(d)),
                   "found only normal")


def test_argparse_usage_errors_exit_2():
    proc = harken("train")
    assert proc.returncode == 2 and "--data" in proc.stderr
    assert harken("--version").stdout.startswith("harken ")


def test_a_closed_pipe_is_not_a_crash(tiny_model, tone_data):
    """`harken replay ... | head`: the reader leaves early; no traceback, no error log."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "train.cli", "replay", "--model", str(tiny_model),
                          str(tone_data / "test")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=str(Path(__file__).resolve().parents[2]))
    p.stdout.close()  # the reader is gone before the first line is written: EPIPE for sure
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "unexpected_error" not in err, err


@pytest.mark.parametrize("command", ["train", "replay", "evaluate"])
def test_an_unwritable_output_is_one_line_before_any_work(command, tiny_model, tone_data):
    out = "/proc/harken-cannot-write-here"
    args = {"train": ["train", "--data", str(tone_data), "--out", out],
            "replay": ["replay", "--model", str(tiny_model), "--out", out + "/x.jsonl",
                       str(tone_data / "test")],
            "evaluate": ["evaluate", "--model", str(tiny_model), "--data", str(tone_data),
                         "--report", out]}[command]
    r = harken(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "cannot write" in r.stderr and "Traceback" not in r.stderr
