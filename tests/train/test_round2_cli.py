"""Issue 15 on the training side of the CLI: hard stops (SIGTERM, SIGKILL) during train and
save, full and read-only disks, replay writing over its input, hops that blew up."""

from __future__ import annotations

import errno
import io
import json
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monitor.errors import UsageError
from tests.helpers import REPO, TINY_TRAIN_YAML, harken, tone_clip


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("harken: error:"), proc.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]


# --------------------------------------------------------------------------- replay


@pytest.mark.parametrize("hop", ["nan", "inf", "-inf", "0", "0.001", "-1"])
def test_replay_bad_hops_are_one_line(tiny_model, tone_data, hop):
    one_line_error(harken("replay", "--model", str(tiny_model), str(tone_data / "test"),
                          f"--hop-s={hop}"), "--hop-s must be a number >= 0.01")


def test_windows_of_a_long_clip_at_a_tiny_hop_are_made_one_at_a_time():
    """--hop-s 0.01 on a 10-minute clip tried to allocate 70 GiB up front."""
    import tracemalloc

    from monitor.audio import iter_windows

    mono = np.zeros(16_000 * 600, np.float32)
    tracemalloc.start()
    n = sum(1 for _ in iter_windows(mono, 10.0, 0.01))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 59_001 and peak < 50e6, peak


def test_replay_refuses_to_write_over_a_recording(tiny_model, tmp_path):
    d = tmp_path / "test"
    d.mkdir()
    rec = d / "normal_id_00_00000000.wav"
    sf.write(rec, tone_clip(np.random.default_rng(0), 0, False), 16000)
    before = rec.read_bytes()
    one_line_error(harken("replay", "--model", str(tiny_model), str(d), "--out", str(rec)),
                   "not audio")
    (tmp_path / "link.jsonl").hardlink_to(rec)  # same file, other name
    one_line_error(harken("replay", "--model", str(tiny_model), str(d), "--out",
                          str(tmp_path / "link.jsonl")), "is one of the recordings being read")
    one_line_error(harken("replay", "--model", str(tiny_model), str(d), "--out",
                          str(d / "new.wav")), "would be read as a recording")
    one_line_error(harken("replay", "--model", str(tiny_model), str(d), "--out",
                          str(tiny_model / "model.safetensors")), "inside the model directory")
    assert rec.read_bytes() == before and not (d / "new.wav").exists()
    assert (tiny_model / "model.safetensors").stat().st_size > 1000


def test_replay_output_replaces_an_old_one_only_when_complete(tiny_model, tmp_path):
    d = tmp_path / "test"
    d.mkdir()
    sf.write(d / "normal_id_00_00000000.wav", tone_clip(np.random.default_rng(0), 0, False), 16000)
    out = tmp_path / "scores.jsonl"
    out.write_text("old results\n")
    bad = harken("replay", "--model", str(tmp_path / "nope"), str(d), "--out", str(out))
    assert bad.returncode == 2 and out.read_text() == "old results\n"
    ok = harken("replay", "--model", str(tiny_model), str(d), "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(out.read_text().splitlines()[0])["window_start_s"] == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.jsonl", "test"]


def test_replay_never_prints_nan(tmp_path):
    from monitor.replay import replay

    d = tmp_path / "d"
    d.mkdir()
    for i in range(3):
        sf.write(d / f"normal_id_00_{i:08d}.wav", tone_clip(np.random.default_rng(i), 0, False), 16000)

    class NanDetector:
        window_s = 10.0

        def score_windows(self, windows, ids):
            return np.array([np.nan, np.inf, 1.0][: len(windows)])

        def threshold_for(self, machine_id):
            return 0.5

    out = io.StringIO()
    summary = replay(NanDetector(), d, out, batch_size=3)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]  # strict JSON below
    assert "NaN" not in out.getvalue() and "Infinity" not in out.getvalue()
    assert [r["score"] for r in rows] == [None, None, 1.0]
    assert [r["anomaly"] for r in rows] == [False, False, True]
    assert summary["nonfinite_windows"] == 2


# --------------------------------------------------------------------------- train outputs


def test_train_refuses_an_output_directory_holding_other_files(tone_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tone_data, data)
    t0 = time.monotonic()
    one_line_error(harken("train", "--data", str(data), "--out", str(data / "train")),
                   "holds files that are not part of a harken model")
    assert time.monotonic() - t0 < 60  # before any training
    assert len(list((data / "train").glob("*.wav"))) == 20


def _saveable(model):
    from monitor.artifact import load_artifact

    art = load_artifact(model)
    manifest = {k: v for k, v in art.manifest.items() if k not in
                ("format", "format_version", "harken_version", "created_utc", "tensors_sha256")}
    return manifest, dict(art.tensors)


def test_a_full_disk_during_a_retrain_keeps_the_old_model(tiny_model, mount_fs):
    from monitor.artifact import save_artifact
    from monitor.detector import Detector

    size = sum(p.stat().st_size for p in tiny_model.iterdir())
    disk = mount_fs(size=f"{int(size * 1.5) // 1024}k")  # room for one model, not two
    model = disk / "model"
    shutil.copytree(tiny_model, model)
    manifest, tensors = _saveable(model)
    with pytest.raises(UsageError, match="cannot save the model .*No space left on device"):
        save_artifact(model, {**manifest, "name": "retrained"}, tensors)
    det = Detector.load(model, device="cpu")  # the old one, whole
    assert det.manifest.get("name") != "retrained"
    assert sorted(p.name for p in disk.iterdir()) == ["model"]


def test_a_full_disk_is_one_line_for_synth_and_injected_for_train(tmp_path, monkeypatch):
    """The injected variant runs everywhere (no mount needed)."""
    from train.synth import write_dataset

    real = Path.write_bytes
    calls = {"n": 0}

    def full(self, data):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UsageError, match="cannot write the data set .No space left on device"):
        write_dataset(tmp_path / "d", ids=(0,), n_train=5, n_test_normal=0, n_test_anomaly=0,
                      progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left


@pytest.mark.parametrize("kind", ["small", "read_only"])
def test_synth_on_a_full_or_read_only_disk_is_one_line(mount_fs, kind):
    disk = mount_fs(size="300k") if kind == "small" else mount_fs(read_only=True)
    proc = harken("synth", str(disk / "d"), "--ids", "0", "--train", "5", "--test-normal", "0",
                  "--test-anomaly", "0", "--quiet")
    one_line_error(proc, "cannot write the data set",
                   "No space left on device" if kind == "small" else "Read-only file system")
    assert list(disk.iterdir()) == []


def test_train_onto_a_full_disk_is_one_line_and_leaves_nothing(tone_data, tmp_path, mount_fs):
    disk = mount_fs(size="1m")  # the tiny model is ~4 MB
    cfg = tmp_path / "t.yaml"
    cfg.write_text(TINY_TRAIN_YAML)
    proc = harken("train", "--data", str(tone_data), "--out", str(disk / "m"), "--config", str(cfg),
                  "--device", "cpu")
    one_line_error(proc, "cannot save the model", "No space left on device")
    assert list(disk.iterdir()) == []


# --------------------------------------------------------------------------- hard stops


def _wait_for(proc, predicate, timeout_s=240.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("existing", [False, True])
def test_sigterm_during_train_leaves_the_old_model_or_nothing(tone_data, tiny_model, tmp_path,
                                                              existing):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(TINY_TRAIN_YAML.replace("max_epochs: 6", "max_epochs: 400")
                   .replace("early_stop_patience: 3", "early_stop_patience: 400"))
    out = tmp_path / "m"
    if existing:
        shutil.copytree(tiny_model, out)
    before = (out / "manifest.json").read_bytes() if existing else None
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", "--log-level", "info", "train",
                             "--data", str(tone_data), "--out", str(out), "--config", str(cfg),
                             "--device", "cpu"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = []

    def training():
        line = proc.stderr.readline()
        log.append(line)
        return '"epoch_done"' in line

    assert _wait_for(proc, training), "".join(log)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    if existing:
        assert (out / "manifest.json").read_bytes() == before
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from monitor.artifact import load_artifact, save_artifact
    src, out = sys.argv[1], sys.argv[2]
    art = load_artifact(src)
    keep = {k: v for k, v in art.manifest.items() if k not in
            ("format", "format_version", "harken_version", "created_utc", "tensors_sha256")}
    big = dict(art.tensors)
    big["scorer.recon.stats.padding"] = torch.zeros(8_000_000)  # slow enough to be hit mid-write
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        save_artifact(out, {**keep, "name": f"save-{n}"}, big)
""")


def test_sigkill_at_random_points_of_a_save_never_breaks_the_model(tiny_model, tmp_path):
    """A retrain killed between writing the tensors and the manifest once left new tensors
    with the old manifest. Killed anywhere now, the directory holds one complete model."""
    from monitor.artifact import load_artifact

    out = tmp_path / "model"
    shutil.copytree(tiny_model, out)
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    rng = random.Random(15)
    names = set()
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(tiny_model), str(out)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        art = load_artifact(out)  # hash, shapes, manifest: all consistent
        names.add(art.manifest.get("name"))
    assert len(names) >= 2  # some kills landed after a complete save, some before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) <= 1  # at most the staging of the last kill, removed by the next save
