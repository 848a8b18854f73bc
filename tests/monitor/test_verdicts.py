"""Verdicts on alarms: the normal reference overlay (store, detector, CLI, running daemon)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from monitor.detector import Detector
from monitor.errors import UsageError
from monitor.overlay import with_reference
from monitor.reference import ReferenceStore
from monitor.verdicts import Verdict, event_source
from tests.helpers import RATE, harken, tone_clip

REF_TRAIN_YAML = """\
train:
  encoder: stats
  scorers: [knn, diag]
"""


@pytest.fixture(scope="module")
def ref_model(tmp_path_factory, tone_data) -> Path:
    """A stats encoder with a k-NN bank and a diagonal Gaussian: both kinds of reference."""
    from train.config import load_train_config
    from train.fit import fit_model

    base = tmp_path_factory.mktemp("ref-model")
    (base / "train.yaml").write_text(REF_TRAIN_YAML)
    out = base / "model"
    fit_model(tone_data, out, load_train_config(base / "train.yaml"), device="cpu", progress=False)
    return out


def fault_clip(seed: int = 7) -> np.ndarray:
    return tone_clip(np.random.default_rng(seed), 0, anomalous=True)


def test_a_normal_reference_silences_the_judged_sound_and_only_it(ref_model):
    det = Detector.load(ref_model, device="cpu")
    judged, other = fault_clip(7), fault_clip(8)
    other = other + 0.05 * np.sin(2 * np.pi * 5000 * np.arange(len(other)) / RATE).astype(np.float32)
    before = det.score_windows(np.stack([judged, other]))
    assert before[0] > det.threshold, "the test clip must alarm to begin with"
    overlaid = with_reference(det, det.embed(judged[None]).cpu(), [None])
    after = overlaid.score_windows(np.stack([judged, other]))
    assert after[0] < det.threshold
    assert after[1] > det.threshold, "a different fault must still alarm"
    # the artifact's own detector is untouched
    assert det.score_windows(judged[None])[0] == pytest.approx(before[0])


def test_store_versions_undo_and_bound(tmp_path):
    store = ReferenceStore(tmp_path, "fan", max_windows=3)
    assert store.load().windows == 0
    a = store.add("n-fan-1", "v1", torch.ones(2, 4), [None, None])
    b = store.add("n-fan-2", "v2", torch.zeros(1, 4), [3])
    assert (a.version, b.version, b.windows) == (1, 2, 3)
    with pytest.raises(UsageError, match="bound is 3"):
        store.add("n-fan-3", "v3", torch.zeros(1, 4), [None])
    with pytest.raises(UsageError, match="already in the normal reference"):
        store.add("n-fan-2", "v4", torch.zeros(1, 4), [None])
    assert store.version() == 2, "refused additions change nothing"
    assert store.undo("v1").event_id == "n-fan-1"
    left = store.load()
    assert left.version == 3 and left.windows == 1 and left.machine_ids == (3,)
    assert torch.equal(left.embeddings, torch.zeros(1, 4))
    store.undo()
    assert store.load().windows == 0
    with pytest.raises(UsageError, match="nothing to undo"):
        store.undo()


@pytest.mark.parametrize("payload, message", [
    ([1, 2], "JSON object"), ({"event_id": "x", "verdict": "maybe"}, "normal or fault"),
    ({"event_id": 3, "verdict": "normal"}, "alarm id"),
    ({"event_id": "x", "verdict": "fault", "extra": 1}, "unknown key"),
    ({"event_id": "x", "verdict": "fault", "note": "n" * 600}, "at most 500")])
def test_malformed_verdicts_are_refused(payload, message):
    with pytest.raises(UsageError, match=message):
        Verdict.from_json(payload)


def test_event_source_takes_the_longest_matching_source():
    assert event_source("n1-fan-a-1700000000000", "n1", ["fan", "fan-a"]) == "fan-a"
    with pytest.raises(UsageError, match="unknown event"):
        event_source("n1-pump-1700000000000", "n1", ["fan"])


# --------------------------------------------------------------------------- a running daemon


def _config(tmp_path: Path, model: Path, watch_dir: Path, extra: str = "") -> Path:
    """A daemon config with one watched folder source `fan` on node n1; `extra` adds top-level
    YAML lines (a `web:` or `mqtt:` section)."""
    cfg = tmp_path / "harken.yaml"
    cfg.write_text(f"""\
node: n1
state_dir: {tmp_path / 'state'}
jsonl: {tmp_path / 'out.jsonl'}
device: cpu
alarm: {{k: 1, n: 1, hold_s: 0}}
{extra}sources:
  - id: fan
    kind: folder
    model: {model}
    path: {watch_dir}
    watch: true
    poll_s: 0.2
""")
    return cfg


def start_daemon(cfg: Path, log: Path) -> subprocess.Popen:
    """`harken monitor` on `cfg` as a subprocess of this checkout, its output in `log`."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with open(log, "w") as log_file:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "train.cli", "monitor", "--config",
                                 str(cfg)], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                text=True)


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _wait(predicate, what: str, proc: subprocess.Popen, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s  # bounds a hang only; asserts no speed
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the daemon exited while waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_cli_verdicts_on_a_running_daemon(tmp_path, ref_model):
    watch = tmp_path / "in"
    watch.mkdir()
    cfg = _config(tmp_path, ref_model, watch)
    out = tmp_path / "out.jsonl"
    clip = tmp_path / "fault.wav"
    sf.write(clip, fault_clip(7), RATE, subtype="PCM_16")
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)

    def loaded(version: int) -> bool:  # the daemon's own word that it took the new overlay
        return any('"reference_loaded"' in ln and f'"version": {version}' in ln
                   for ln in log.read_text().splitlines())

    try:
        def score_of(name: str):
            return next((ln for ln in _lines(out) if ln.get("file", "").endswith(name)
                         and "score" in ln), None)

        shutil.copy(clip, watch / "a.wav")
        first = _wait(lambda: score_of("a.wav"), "the first score", proc)
        assert first["anomaly"]
        start = _wait(lambda: next((ln for ln in _lines(out) if ln.get("type") == "start"), None),
                      "the alarm", proc)
        _wait(lambda: (tmp_path / "state" / "evidence").is_dir()
              and any((tmp_path / "state" / "evidence").glob("*.wav")), "the evidence clip", proc)

        # mistakes: one line, exit 2, nothing recorded
        bad = harken("verdict", "set", "--config", str(cfg), start["id"], "maybe")
        assert bad.returncode == 2 and "normal or fault" in bad.stderr
        unknown = harken("verdict", "set", "--config", str(cfg), "n1-fan-123", "normal")
        assert unknown.returncode == 2 and "unknown event" in unknown.stderr
        assert ReferenceStore(tmp_path / "state", "fan").version() == 0

        ok = harken("verdict", "set", "--config", str(cfg), start["id"], "normal",
                    "--note", "door slam")
        assert ok.returncode == 0, ok.stderr
        recorded = json.loads(ok.stdout)
        assert recorded["reference_version"] == 1
        assert any((tmp_path / "state" / "labelled" / "fan").glob("normal_id_00_*.wav"))
        listed = json.loads(harken("verdict", "list", "--config", str(cfg)).stdout)
        assert listed["fan"]["verdicts"][0]["note"] == "door slam"

        _wait(lambda: loaded(1), "the daemon to load reference version 1", proc)
        shutil.copy(clip, watch / "b.wav")
        again = _wait(lambda: score_of("b.wav"), "the replayed clip's score", proc)
        assert not again["anomaly"], f"still alarms after a normal verdict: {again}"
        # the threshold follows the judged windows (monitor/daemon/recalibration.py)
        updated = [json.loads(ln[ln.index("{"):]) for ln in log.read_text().splitlines()
                   if '"threshold_updated"' in ln]
        assert len(updated) == 1 and updated[0]["old"] == pytest.approx(first["threshold"])
        assert first["threshold"] < updated[0]["new"] <= first["score"] + 1e-6
        assert "1 confirmed false alarm" in updated[0]["why"]
        assert again["threshold"] == pytest.approx(updated[0]["new"])

        exported = harken("model", "export", "--config", str(cfg), "--source", "fan",
                          "--out", str(tmp_path / "exported"))
        assert exported.returncode == 0, exported.stderr
        assert json.loads(exported.stdout)["windows"] == 1
        assert (tmp_path / "exported" / "manifest.json").is_file()
        bad_out = harken("model", "export", "--config", str(cfg), "--source", "fan",
                         "--out", str(ref_model))
        assert bad_out.returncode == 2 and "never modified" in bad_out.stderr

        undo = harken("verdict", "undo", "--config", str(cfg), "--source", "fan")
        assert undo.returncode == 0 and json.loads(undo.stdout)["undone"] == recorded["verdict_id"]
        _wait(lambda: loaded(2), "the daemon to load reference version 2", proc)
        shutil.copy(clip, watch / "c.wav")
        restored = _wait(lambda: score_of("c.wav"), "the score after undo", proc)
        assert restored["anomaly"]
        assert restored["score"] == pytest.approx(first["score"], rel=1e-5)
        assert restored["threshold"] == pytest.approx(first["threshold"]), "undo restores it"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # the audio the source was scored on, kept for the next start's recalibration
    scored = [ln for ln in _lines(out) if "score" in ln and ln.get("source") == "fan"]
    kept = json.loads((tmp_path / "state" / "exposure.json").read_text())["scored_s"]
    assert kept["fan"] == pytest.approx(10.0 * len(scored)) and len(scored) >= 3


def test_export_folds_the_reference_into_a_new_artifact(tmp_path, ref_model):
    from monitor.model_export import export_with_reference

    det = Detector.load(ref_model, device="cpu")
    judged = fault_clip(7)
    store = ReferenceStore(tmp_path / "state", "fan")
    overlay = store.add("n1-fan-1", "v1", det.embed(judged[None]).cpu(), [None])
    with pytest.raises(UsageError, match="never modified"):
        export_with_reference(ref_model, overlay, ref_model, source="fan")
    out = export_with_reference(ref_model, overlay, tmp_path / "exported", source="fan")
    exported = Detector.load(out, device="cpu")
    live = with_reference(det, overlay.embeddings, overlay.machine_ids)
    assert exported.score_windows(judged[None])[0] == pytest.approx(
        live.score_windows(judged[None])[0], rel=1e-5, abs=1e-6)
    assert exported.score_windows(judged[None])[0] < det.threshold
    assert exported.manifest["reference_overlay"]["windows"] == 1
    assert Detector.load(ref_model, device="cpu").score_windows(judged[None])[0] > det.threshold


def test_a_normal_verdict_covers_every_window_of_the_alarm(tmp_path, ref_model):
    """A 30-s fault whose sound changes after its first window: the verdict on the alarm
    silences all three windows, not only the evidence clip's."""
    watch = tmp_path / "in"
    watch.mkdir()
    cfg = _config(tmp_path, ref_model, watch)
    out = tmp_path / "out.jsonl"
    t = np.arange(10 * RATE) / RATE
    whine = (0.05 * np.sin(2 * np.pi * 5000 * t)).astype(np.float32)
    episode = np.concatenate([fault_clip(7), fault_clip(8) + whine, fault_clip(9) + whine])
    sf.write(tmp_path / "fault.wav", episode, RATE, subtype="PCM_16")
    normal = tone_clip(np.random.default_rng(3), 0, anomalous=False)
    sf.write(tmp_path / "normal.wav", normal, RATE, subtype="PCM_16")
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)

    def scores(name: str):
        return [ln for ln in _lines(out) if ln.get("file", "").endswith(name) and "score" in ln]

    try:
        shutil.copy(tmp_path / "fault.wav", watch / "a.wav")
        _wait(lambda: len(scores("a.wav")) == 3, "the fault's three windows", proc)
        assert all(s["anomaly"] for s in scores("a.wav"))
        shutil.copy(tmp_path / "normal.wav", watch / "b.wav")  # the alarm ends: episode written
        start = _wait(lambda: next((ln for ln in _lines(out) if ln.get("type") == "start"), None),
                      "the alarm", proc)
        _wait(lambda: any(ln.get("type") == "end" for ln in _lines(out)), "the alarm's end", proc)
        ev = tmp_path / "state" / "evidence"
        _wait(lambda: any(ev.glob("*.event.wav")), "the episode clip", proc)
        assert sf.info(str(next(ev.glob("*.event.wav")))).duration == pytest.approx(30.0)

        ok = harken("verdict", "set", "--config", str(cfg), start["id"], "normal")
        assert ok.returncode == 0, ok.stderr
        overlay = ReferenceStore(tmp_path / "state", "fan").load()
        assert overlay.entries[0].windows == 3
        _wait(lambda: '"reference_loaded"' in log.read_text(), "the new reference", proc)
        shutil.copy(tmp_path / "fault.wav", watch / "c.wav")
        _wait(lambda: len(scores("c.wav")) == 3, "the replayed fault", proc)
        assert not any(s["anomaly"] for s in scores("c.wav")), scores("c.wav")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_the_episode_stays_bounded(tmp_path):
    from monitor.daemon.episode import EpisodeRecorder
    from monitor.daemon.event_worker import EventWorker
    from monitor.daemon.evidence import EPISODE_MAX_WINDOWS, EvidenceStore
    from monitor.daemon.types import AlarmEvent, Window

    worker = EventWorker(lambda e: None)
    worker.start()
    store = EvidenceStore(tmp_path / "evidence")
    rec = EpisodeRecorder(store, worker, threading.Event())
    windows = [Window("fan", np.full(RATE, i / 100, dtype=np.float32), float(i), 1.0, 0.0)
               for i in range(EPISODE_MAX_WINDOWS + 5)]
    rec.observe(windows[0], [AlarmEvent("start", "n1-fan-1", "fan", 0.0, 2.0, 1.0)], True)
    for w in windows[1:]:
        rec.observe(w, [], True)  # the alarm stays on past the bound
    rec.flush_all()
    worker.stop_when_drained()
    audio, _ = sf.read(str(tmp_path / "evidence" / "n1-fan-1.event.wav"), dtype="float32")
    assert len(audio) == EPISODE_MAX_WINDOWS * RATE
    assert audio[-1] == pytest.approx((EPISODE_MAX_WINDOWS - 1) / 100, abs=1e-4)
