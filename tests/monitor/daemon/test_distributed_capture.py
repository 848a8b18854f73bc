"""What the capture box publishes besides its windows (issue 17), against a real Mosquitto:
sensor-fault events, evidence clips of the alarm stage's alarm starts, and Home Assistant
discovery, each as the single-box daemon does it for the same audio and sources."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from monitor.audio import SAMPLE_RATE_HZ
from monitor.daemon.build import build_publisher
from monitor.daemon.config import load_config
from monitor.daemon.roles.capture import CaptureRole
from tests.helpers import harken
from tests.monitor.daemon.conftest import Collector, wait_until
from tests.monitor.daemon.test_distributed import (  # noqa: F401 - models_dir: a fixture
    MODEL, models_dir, role_config, start, write_config)
from tests.mosquitto import Mosquitto

WINDOW_S = 10


def faulty_folder(root: Path) -> Path:
    """One 30-s file: a dead input (zeros), then a clipping one (a full-scale square), then a
    healthy tone: a silence episode, then a clipping episode."""
    folder = root / "faulty"
    folder.mkdir(parents=True)
    n = WINDOW_S * SAMPLE_RATE_HZ
    t = np.arange(n) / SAMPLE_RATE_HZ
    square = np.sign(np.sin(2 * np.pi * 50 * t))
    tone = 0.1 * np.sin(2 * np.pi * 440 * t)
    sf.write(folder / "fault.wav", np.concatenate([np.zeros(n), square, tone]), SAMPLE_RATE_HZ,
             subtype="PCM_16")
    return folder


def fault_keys(events: list[dict]) -> set[tuple]:
    """Sensor-fault events with times relative to the first (a run's clock starts at its start):
    an id is `<node>-<source>-<kind>-<ms of its window>`."""
    t0 = min(e["detail"]["window_start"] for e in events)
    t0_ms = min(int(e["id"].rsplit("-", 1)[1]) for e in events)  # ids truncate, times round
    return {(e["type"], e["id"].rsplit("-", 1)[0],
             round((int(e["id"].rsplit("-", 1)[1]) - t0_ms) / 1000, 1), e["source"], e["seq"],
             json.dumps(e["detail"] | {"window_start": round(e["detail"]["window_start"] - t0, 3)},
                        sort_keys=True)) for e in events}


def run_in_thread(role: CaptureRole) -> threading.Thread:
    t = threading.Thread(target=role.run, daemon=True)
    t.start()
    return t


def test_sensor_faults_from_the_capture_box_are_the_single_box_ones(tmp_path, models_dir):  # noqa: F811
    folder = faulty_folder(tmp_path)
    src = [{"id": "mic1", "kind": "folder", "model": str(models_dir / MODEL), "path": str(folder)}]
    out = tmp_path / "single.jsonl"
    single = tmp_path / "single.yaml"
    single.write_text(json.dumps({"node": "cap", "state_dir": str(tmp_path / "single-state"),
                                  "jsonl": str(out), "sensor_faults": True,
                                  "evidence": {"enabled": False}, "threads": 1, "sources": src}))
    proc = harken("monitor", "--config", str(single), "--log-level", "warning", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = fault_keys([r for r in map(json.loads, out.read_text().splitlines())
                           if r["kind"] == "event" and r["type"] == "sensor_fault"])
    assert {(k[0], json.loads(k[5])["kind"], json.loads(k[5])["state"]) for k in expected} == {
        ("sensor_fault", "silence", "start"), ("sensor_fault", "silence", "end"),
        ("sensor_fault", "clipping", "start"), ("sensor_fault", "clipping", "end")}

    with Mosquitto(tmp_path / "broker") as broker:
        coll = Collector(broker, ("harken/cap/+/event", "harken/cap/+/state"))
        cfg = role_config(tmp_path, "cap", broker, "capture", models_dir, sensor_faults=True,
                          sources=src)
        proc = start(cfg, tmp_path / "cap.log")
        assert proc.wait(timeout=120) == 0, (tmp_path / "cap.log").read_text()[-3000:]
        wait_until(lambda: len(coll.payloads("harken/cap/mic1/event")) >= len(expected),
                   what="sensor-fault events")
        got = fault_keys([json.loads(p) for p in coll.payloads("harken/cap/mic1/event")])
        assert got == expected
        assert coll.last("harken/cap/mic1/state") == b"ended"


def test_an_alarm_start_makes_the_capture_box_save_and_announce_its_clip(tmp_path, models_dir):  # noqa: F811
    folder = tmp_path / "tone"
    folder.mkdir()
    n = 3 * WINDOW_S * SAMPLE_RATE_HZ
    sf.write(folder / "a.wav", 0.1 * np.sin(2 * np.pi * 440 * np.arange(n) / SAMPLE_RATE_HZ),
             SAMPLE_RATE_HZ, subtype="PCM_16")
    src = [{"id": "pump", "kind": "folder", "model": str(models_dir / MODEL), "path": str(folder),
            "watch": True}]  # stays up after the file: the alarm comes later
    with Mosquitto(tmp_path / "broker") as broker:
        coll = Collector(broker, ("harken/cap/+/evidence",))
        cfg = role_config(tmp_path, "cap", broker, "capture", models_dir, sources=src,
                          evidence={"enabled": True})
        role = CaptureRole(load_config(cfg, check_models=False))
        thread = run_in_thread(role)
        try:
            wait_until(lambda: role.acked >= 3 and role.conn.connected.is_set(),
                       what="three windows out")
            window = role.recent.find("pump", role.recent._windows["pump"][1].start_time_s)
            event = {"type": "start", "id": "cap-pump-1", "source": "pump",
                     "ts": round(window.start_time_s, 3), "peak_score": 20.0, "threshold": 10.0,
                     "seq": 0, "clip": None, "image": None,
                     "detail": {"window_start": round(window.start_time_s, 3)}}
            gone = dict(event, id="cap-pump-0", ts=1.0, detail={"window_start": 1.0})
            for e in (gone, event):
                coll.client.publish("harken/cap/pump/event", json.dumps(e), qos=1).wait_for_publish(5)
            wait_until(lambda: coll.payloads("harken/cap/pump/evidence"), what="evidence message")
            ref = json.loads(coll.payloads("harken/cap/pump/evidence")[0])
            assert ref["id"] == "cap-pump-1" and ref["source"] == "pump" and ref["image"] is None
            clip = Path(ref["clip"])
            assert clip == role.state_dir / "evidence" / "cap-pump-1.wav"
            audio, rate = sf.read(clip, dtype="float32")
            assert rate == SAMPLE_RATE_HZ and len(audio) == WINDOW_S * SAMPLE_RATE_HZ
            np.testing.assert_allclose(audio, window.samples, atol=1 / 16384)
            assert role.evidence.missing == 1 and role.evidence.saved == 1
            assert len(coll.payloads("harken/cap/pump/evidence")) == 1
        finally:
            role.request_stop()
            thread.join(timeout=30)


def test_discovery_from_the_capture_box_equals_the_single_box(tmp_path, models_dir):  # noqa: F811
    src = [{"id": sid, "kind": "folder", "model": str(models_dir / MODEL),
            "path": str(tmp_path / sid), "watch": True} for sid in ("pump", "fan")]
    for s in src:
        Path(s["path"]).mkdir()

    def discovery(coll: Collector) -> dict[str, bytes]:
        return {t: coll.last(t) for t in list(coll.messages)}

    mqtt = {"discovery": True, "discovery_prefix": "ha"}
    with Mosquitto(tmp_path / "broker") as broker:
        path = role_config(tmp_path, "cap", broker, "capture", models_dir, sources=src)
        data = yaml.safe_load(path.read_text())
        data["mqtt"] |= mqtt
        cfg = load_config(write_config(path, data), check_models=False)
        publisher, _ = build_publisher(cfg, tmp_path / "single-state")  # the single box's
        publisher.start()
        single = Collector(broker, ("ha/#",))
        wait_until(lambda: len(single.messages) == 4, what="single-box discovery")
        expected = discovery(single)
        publisher.stop()
        for topic in expected:  # cleared: what comes next must be the capture box's own
            single.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        role = CaptureRole(cfg)
        thread = run_in_thread(role)
        try:
            coll = Collector(broker, ("ha/#",))
            wait_until(lambda: len(coll.messages) == 4, what="capture-box discovery")
            assert discovery(coll) == expected
        finally:
            role.request_stop()
            thread.join(timeout=30)


def test_an_alarm_start_never_blocks_pahos_thread_when_the_event_worker_is_full(tmp_path):
    """The event worker's queue is full (it is stuck): the clip is counted as missing and the
    call returns at once, instead of holding up the network loop that delivered it."""
    from types import SimpleNamespace

    from monitor.daemon.event_worker import EventWorker
    from monitor.daemon.evidence import EvidenceStore
    from monitor.daemon.roles.capture_evidence import CaptureEvidence, RecentWindows
    from monitor.logs import get_logger

    recent = RecentWindows(["s"])
    recent.keep(SimpleNamespace(source="s", start_time_s=100.0, samples=np.zeros(16000, np.float32)))
    worker = EventWorker(lambda e: None, max_items=1)  # never started: nothing drains it
    worker.submit_file(lambda: None, what="clip", alarm_id="earlier")
    store = EvidenceStore(tmp_path / "evidence")
    published = []
    ev = CaptureEvidence(store, recent, worker, lambda s, p: published.append(p), get_logger())
    ev.on_event("s", json.dumps({"type": "start", "id": "a1", "ts": 100.0,
                                  "detail": {"window_start": 100.0}}).encode())
    assert ev.missing == 1 and worker.pending == 1 and not published
