"""Calibration end to end on real WAVs: `harken train` stores a tail, the daemon's config check
reports thresholds, old artifacts keep their stored threshold, `harken evaluate --stream`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from monitor.artifact import load_artifact, save_artifact
from tests.helpers import harken

SNR_DB = -6.0


@pytest.fixture(scope="module")
def stats_model(tmp_path_factory) -> Path:
    """The default stats detector on 2 IDs x 16 synthetic clips, trained by the CLI."""
    from train.synth import write_dataset

    base = tmp_path_factory.mktemp("calibrated")
    write_dataset(base / "data", ids=(0, 1), n_train=16, n_test_normal=0, n_test_anomaly=0,
                  snr_db=SNR_DB, seed=3, progress=False)
    r = harken("train", "--data", str(base / "data"), "--out", str(base / "model"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "calibrated tail:" in r.stdout and "over 32 out-of-fold normal scores" in r.stdout
    return base / "model"


def _old_copy(model: Path, out: Path) -> Path:
    """The same model as a pre-calibration harken wrote it: no calibration entry or tensors."""
    art = load_artifact(model)
    manifest = {k: v for k, v in art.manifest.items() if k != "calibration"}
    tensors = {k: v for k, v in art.tensors.items() if not k.startswith("calibration.")}
    return save_artifact(out, manifest, tensors)


def _config(tmp_path: Path, model: Path, alarm: dict | None = None) -> Path:
    audio = tmp_path / "in"
    audio.mkdir(exist_ok=True)
    cfg = {"node": "n1", "state_dir": str(tmp_path / "state"),
           "sources": [{"id": "line1", "kind": "folder", "path": str(audio), "model": str(model),
                        "machine_id": 0, **({"alarm": alarm} if alarm else {})}]}
    path = tmp_path / "harken.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_artifact_holds_a_valid_tail_and_check_config_reports_the_budget(stats_model, tmp_path):
    m = json.loads((stats_model / "manifest.json").read_text())
    cal = m["calibration"]
    assert cal["folds"] >= 3 and cal["known_id"]["n_scores"] == 32
    assert "calibration.scores.pooled" in load_artifact(stats_model).tensors
    r = harken("check-config", str(_config(tmp_path, stats_model)))
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("line1:")][0]
    assert "from budget 0.1429/day" in line and "expected false alarms/day 0.14" in line
    r = harken("check-config", str(_config(tmp_path, stats_model, {"threshold": 2.5})))
    assert "threshold 2.5 from alarm.threshold in the config" in r.stdout


def test_old_artifacts_without_a_tail_load_and_use_their_stored_threshold(stats_model, tmp_path):
    from monitor.daemon.config import AlarmConfig
    from monitor.daemon.thresholds import resolve_for_detector
    from monitor.detector import Detector

    old = _old_copy(stats_model, tmp_path / "old")
    det = Detector.load(old, device="cpu")
    assert det.calibration is None
    r = resolve_for_detector(det, AlarmConfig(), hop_s=10.0, machine_id=0)
    assert r.origin == "artifact" and r.threshold == det.threshold_for(0)
    assert r.expected_per_day is None
    out = harken("check-config", str(_config(tmp_path, old)))
    assert out.returncode == 0, out.stderr
    assert "the model's stored threshold (no calibrated tail)" in out.stdout
    out = harken("check-config", str(_config(tmp_path, old, {"rule": "cusum"})))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "needs a model with a calibrated tail" in out.stderr


def test_a_broken_tail_is_one_clear_line(stats_model, tmp_path):
    broken = _old_copy(stats_model, tmp_path / "broken")  # a copy to edit
    art = load_artifact(stats_model)
    manifest = dict(art.manifest)
    manifest["calibration"] = {**manifest["calibration"],
                               "pooled": {**manifest["calibration"]["pooled"], "xi": 7.0}}
    save_artifact(broken, manifest, dict(art.tensors))
    r = harken("check-config", str(_config(tmp_path, broken)))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "calibration.pooled: needs sigma > 0 and xi in" in r.stderr


def test_alarm_config_errors_are_one_line_each(tmp_path, stats_model):
    bad = {"rule": "spc", "false_alarms_per_day": 0, "ewma_lambda": 1.5}
    r = harken("check-config", "--no-models", str(_config(tmp_path, stats_model, bad)))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert any("sources[0].alarm.rule: must be one of auto, kofn, ewma, cusum" in ln for ln in lines)
    assert any("sources[0].alarm.false_alarms_per_day: must be > 0" in ln for ln in lines)
    assert any("sources[0].alarm.ewma_lambda: must be in (0, 1]" in ln for ln in lines)
    assert "Traceback" not in r.stderr


def _write(path: Path, audio: np.ndarray) -> None:
    sf.write(path, audio, 16000, subtype="PCM_16")


def test_evaluate_stream_replays_folders_through_the_alarm_code(stats_model, tmp_path):
    from train.synth import MachineParams, render_clip

    p = MachineParams.for_id(0, 3)
    data = tmp_path / "streams"
    (data / "normal").mkdir(parents=True)
    for i in range(12):
        _write(data / "normal" / f"normal_id_00_{i:08d}.wav",
               render_clip(p, rng=1000 + i, snr_db=SNR_DB))
    s1 = data / "streams" / "bearing"
    s1.mkdir(parents=True)
    # one healthy file, then the fault: the 16-clip model scores unseen healthy clips up to
    # +3.5 sd, and three of them in a row would start the capped ewma before the fault
    _write(s1 / "normal_id_00_00000000.wav", render_clip(p, rng=2000, snr_db=SNR_DB))
    hiss = np.random.default_rng(0).normal(scale=0.2, size=(6, 160_000)).astype(np.float32)
    for i in range(6):  # the machine drowned in broadband hiss: unmistakable for any model
        _write(s1 / f"anomaly_id_00_{i:08d}.wav",
               render_clip(p, rng=3000 + i, snr_db=SNR_DB) + hiss[i])
    (data / "labels.csv").write_text("file,fault,severity\n" + "".join(
        f"anomaly_id_00_{i:08d}.wav,hiss,1.0\n" for i in range(6)))
    r = harken("evaluate", "--model", str(stats_model), "--data", str(data), "--stream",
               "--json", "--quiet", "--false-alarms-per-day", "2")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["normal_hours"] == pytest.approx(120 / 3600, abs=1e-3)
    assert m["per_id"]["00"]["origin"] == "budget"
    assert m["expected_false_alarms_per_day"] == pytest.approx(2.0, rel=0.3)
    assert m["streams"] == 1 and m["streams_alarmed"] == 1.0
    # healthy first (`normal_...` before `anomaly_...`, whatever the names sort to): the alarm
    # needs two or more faulty windows, so it ends 20-60 s after the fault's start
    assert m["lead_in_false_alarms"] == 0
    assert 20.0 <= m["delay_s_median"] <= 60.0
    hiss_fig = m["per_fault"]["hiss"]  # from labels.csv
    assert hiss_fig["streams"] == 1 and hiss_fig["alarmed"] == 1.0
    assert hiss_fig["window_auc"] > 0.75 and set(hiss_fig["by_severity"]) == {"1"}
    r = harken("evaluate", "--model", str(stats_model), "--data", str(data), "--stream",
               "--quiet", "--false-alarms-per-day", "2")
    assert r.returncode == 0, r.stderr
    assert "hiss: 100% within 60 s (100% at all) of 1, window AUC" in r.stdout
    (tmp_path / "empty").mkdir()
    r = harken("evaluate", "--model", str(stats_model), "--data", str(tmp_path / "empty"), "--stream")
    assert r.returncode == 2 and "needs" in r.stderr and "Traceback" not in r.stderr


def test_the_daemon_alarms_at_the_threshold_its_budget_gives(stats_model, tmp_path):
    from monitor.daemon.app import Daemon
    from monitor.daemon.config import load_config
    from monitor.daemon.rules import CusumRule
    from monitor.daemon.thresholds import resolve_for_detector

    for alarm, rule_type in (({"false_alarms_per_day": 1.0}, "EwmaRule"),  # auto, calibrated
                             ({"false_alarms_per_day": 1.0, "rule": "kofn"}, "KOfNRule"),
                             ({"false_alarms_per_day": 1.0, "rule": "cusum"}, "CusumRule")):
        cfg = load_config(_config(tmp_path, stats_model, alarm))
        daemon = Daemon(cfg, state_dir=tmp_path / "state")
        daemon.init_models()
        det = daemon.detectors[str(stats_model)]
        r = resolve_for_detector(det, cfg.sources[0].alarm, hop_s=10.0, machine_id=0)
        assert daemon.worker.threshold_overrides["line1"] == r.window_threshold
        machine = daemon.alarms["line1"]
        assert type(machine.rule).__name__ == rule_type
        if isinstance(machine.rule, CusumRule):
            assert machine.rule.h == r.threshold and r.window_threshold > 0


def test_a_folder_source_without_machine_id_judges_each_id_at_its_own_tail(stats_model, tmp_path):
    """Windows of a folder source take their machine ID from the file name and are scored
    against that ID's statistics; their threshold must come from that ID's tail too."""
    from monitor.daemon.app import Daemon
    from monitor.daemon.config import AlarmConfig, load_config
    from monitor.daemon.types import Window
    from monitor.daemon.thresholds import resolve_for_detector

    path = _config(tmp_path, stats_model)
    cfg = yaml.safe_load(path.read_text())
    del cfg["sources"][0]["machine_id"]
    path.write_text(yaml.safe_dump(cfg))
    daemon = Daemon(load_config(path), state_dir=tmp_path / "state")
    daemon.init_models()
    det = daemon.detectors[str(stats_model)]
    worker = daemon.worker
    for mid in (0, 1, None):
        want = resolve_for_detector(det, AlarmConfig(), hop_s=10.0, machine_id=mid).window_threshold
        win = Window("line1", np.zeros(160_000, np.float32), 0.0, 10.0, 0.0, machine_id=mid)
        assert worker._threshold(win, det) == pytest.approx(want)
    pooled = resolve_for_detector(det, AlarmConfig(), hop_s=10.0, machine_id=None).window_threshold
    per_id = [worker.threshold_overrides[("line1", m)] for m in (0, 1)]
    assert any(t != pooled for t in per_id)  # otherwise this test would not tell the two apart
