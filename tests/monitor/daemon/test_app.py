"""`harken monitor` driven as a subprocess on real WAV files: alarms end to end, SIGTERM drain,
bad configurations; evidence retention and the JSONL sink."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from monitor.daemon.evidence import EvidenceStore
from monitor.daemon.jsonl import JsonlPublisher
from monitor.daemon.types import AlarmEvent, Score
from tests.helpers import REPO, harken, tone_clip


def write_config(tmp_path, model, sources, **top):
    cfg = {"node": "line1", "device": "cpu", "state_dir": str(tmp_path / "state"),
           "jsonl": str(tmp_path / "out.jsonl"), "sources": sources, **top}
    f = tmp_path / "harken.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_alarm_starts_within_k_windows_and_ends_after_hold(tone_data, tiny_model, tmp_path):
    # normal clips, then anomalous ones, then normal ones again, ordered by symlink names
    test = tone_data / "test"
    order = (sorted(test.glob("normal_id_00_*.wav")) + sorted(test.glob("anomaly_id_00_*.wav"))
             + sorted(test.glob("normal_id_01_*.wav")))
    seq = tmp_path / "seq"
    seq.mkdir()
    for i, p in enumerate(order, 1):
        os.symlink(p, seq / f"{i:04d}_{p.name}")
    k, n, hold_s = 2, 3, 20.0
    cfg = write_config(tmp_path, tiny_model, [
        {"id": "slider3", "kind": "folder", "path": str(seq), "model": str(tiny_model),
         "speed": "max", "alarm": {"rule": "kofn", "k": k, "n": n, "hold_s": hold_s}}],
        evidence={"max_count": 5})
    proc = harken("monitor", "--config", str(cfg), "--log-level", "warning")
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert rows[0] == {**rows[0], "kind": "status", "status": "online"}
    assert rows[-1]["kind"] == "status" and rows[-1]["status"] == "stopped"
    scores = [r for r in rows if r["kind"] == "score"]
    assert len(scores) == 12 and all(r["source"] == "slider3" for r in scores)
    first_anomalous = next(i for i, r in enumerate(scores) if "anomaly_id" in r["file"])
    assert first_anomalous == 4 and not any(r["anomaly"] for r in scores[:4])
    events = [r for r in rows if r["kind"] == "event"]
    starts = [e for e in events if e["type"] == "start"]
    ends = [e for e in events if e["type"] == "end"]
    assert len(starts) == 1 and len(ends) == 1
    start_window = next(i for i, r in enumerate(scores) if r["window_start"] == starts[0]["ts"])
    assert first_anomalous <= start_window < first_anomalous + k
    assert starts[0]["id"] == ends[0]["id"] and starts[0]["id"].startswith("line1-slider3-")
    # the last anomalous window ends, then hold_s of normal audio clears the alarm
    last_anomalous = max(i for i, r in enumerate(scores) if r["anomaly"])
    assert ends[0]["ts"] - scores[last_anomalous]["window_end"] >= hold_s
    assert ends[0]["ts"] == scores[last_anomalous + 2]["window_end"]
    states = [r["state"] for r in rows if r["kind"] == "alarm"]
    assert states == ["ON", "OFF"]
    # evidence: the triggering clip and its picture, named by the event
    clip, image = Path(starts[0]["clip"]), Path(starts[0]["image"])
    assert clip.parent == tmp_path / "state" / "evidence" and clip.stat().st_size > 0
    assert image.read_bytes()[:4] == b"\x89PNG"
    audio, rate = sf.read(clip)
    assert rate == 16000 and len(audio) == 160_000 and sf.info(clip).subtype == "PCM_16"
    stats = [r for r in rows if r["kind"] == "stats"][-1]
    assert stats["windows_scored"] == 12 and stats["windows_dropped"] == 0
    assert stats["sources"]["slider3"]["state"] == "ended"
    assert stats["inference_ms_p50"] is not None


def test_sigterm_drains_and_exits_zero(tiny_model, tmp_path):
    d = tmp_path / "drop"
    d.mkdir()
    rng = np.random.default_rng(4)
    for i in range(3):
        sf.write(d / f"{i:03d}_normal_id_00.wav", tone_clip(rng, 0, False, seconds=30.0), 16000)
    cfg = write_config(tmp_path, tiny_model, [
        {"id": "f", "kind": "folder", "path": str(d), "model": str(tiny_model), "watch": True,
         "poll_s": 0.1, "hop_s": 1.0}], queue_max_windows=500, batch_max=2)
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", "monitor", "--config", str(cfg)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "out.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and '"kind": "score"' in out.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    rows = read_jsonl(out)
    assert rows[-1]["kind"] == "status" and rows[-1]["status"] == "stopped"
    stats = [r for r in rows if r["kind"] == "stats"][-1]
    # everything queued at SIGTERM was still scored: nothing left, nothing dropped
    assert stats["queue_depth"] == 0 and stats["windows_dropped"] == 0
    assert stats["windows_scored"] == stats["windows_produced"] > 0
    assert len([r for r in rows if r["kind"] == "score"]) == stats["windows_scored"]
    assert '"daemon_stopped"' in stderr


def test_bad_config_is_a_one_line_error_and_a_missing_mic_is_retried(tiny_model, tmp_path):
    cfg = write_config(tmp_path, tiny_model, [
        {"id": "a/b", "kind": "folder", "path": str(tmp_path), "model": str(tiny_model), "hop_s": 12}])
    proc = harken("monitor", "--config", str(cfg))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("harken: error:")]
    assert len(lines) == 1 and "sources[0].id" in lines[0] and "sources[0].hop_s" in lines[0]
    assert "Traceback" not in proc.stderr
    # A microphone missing at start (a USB card that appears late at boot) is not a
    # configuration error: exit 2 would stop systemd from ever retrying. The daemon runs, says
    # the source is stalled and why, and keeps looking for the device.
    cfg = write_config(tmp_path, tiny_model, [
        {"id": "pump1", "kind": "mic", "model": str(tiny_model), "device": "Scarlett"}])
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", "monitor", "--config", str(cfg)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        out = tmp_path / "out.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and any(r.get("kind") == "source_state" and r.get("state") == "stalled"
                                    for r in read_jsonl(out)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert '"mic_not_available"' in stderr and "Scarlett" in stderr and "Traceback" not in stderr


def test_evidence_retention_by_count_and_bytes(tmp_path):
    store = EvidenceStore(tmp_path / "ev", max_count=2, max_bytes=10**9)
    window = np.zeros(16000, np.float32)
    mel = np.zeros((128, 101), np.float32)
    paths = [store.save(f"line1-s-{i}", window, log_mel=mel, error_map=np.ones((128, 64)))
             for i in range(4)]
    kept = sorted(p.name for p in (tmp_path / "ev").iterdir())
    assert kept == ["line1-s-2.png", "line1-s-2.wav", "line1-s-3.png", "line1-s-3.wav"]
    assert store.removed == 2 and all(Path(p).exists() for p in paths[-1])
    one_set = sum(Path(p).stat().st_size for p in paths[-1])
    store.max_count, store.max_bytes = 100, one_set + 1
    store.enforce_retention()
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["line1-s-3.png", "line1-s-3.wav"]


def test_jsonl_sink_writes_one_object_per_line_with_a_kind(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    pub = JsonlPublisher(out, node="n1")
    pub.start()
    pub.publish_score(Score("s", "m", np.float32(2.5), 1.0, 10.0, 20.0, 0.0, 21.0, label="f.wav"))
    pub.publish_event(AlarmEvent("start", "n1-s-10000", "s", 10.0, 2.5, 1.0))
    pub.publish_alarm_state("s", True)
    pub.publish_source_state("s", "stalled")
    pub.publish_stats({"windows_scored": 1})
    pub.stop()
    pub.stop()  # idempotent
    rows = read_jsonl(out)
    assert [r["kind"] for r in rows] == ["status", "score", "event", "alarm", "source_state",
                                         "stats", "status"]
    assert rows[1]["score"] == 2.5 and rows[1]["file"] == "f.wav" and rows[1]["anomaly"] is True
    assert rows[2]["id"] == "n1-s-10000" and rows[3]["state"] == "ON"
    assert all(r["node"] == "n1" for r in rows) and rows[-1]["status"] == "stopped"


def test_the_metrics_endpoint_closes_when_the_daemon_stops_it():
    import socket
    import urllib.request

    from monitor.daemon.metrics import DaemonMetrics
    from tests.mosquitto import free_port

    port = free_port()
    m = DaemonMetrics()
    m.serve("127.0.0.1", port)
    assert b"harken_mqtt_connected" in urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    m.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
    m.stop()  # twice is harmless
