"""Reliability of the daemon (issue 6): fault injection against real Mosquitto processes, sources
that go away and come back, bad audio, sensor faults, bad models, and what must never leak."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as paho
import pytest
import soundfile as sf
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from monitor.daemon.config import DaemonConfig, EvidenceConfig, SourceConfig, config_problems
from monitor.daemon.sensor import (CLIP_FRACTION, SILENCE_DBFS, SensorFaultMonitor, measure,
                                   window_faults)
from monitor.daemon.types import Window
from tests.helpers import REPO, harken, tone_clip
from tests.monitor.daemon.conftest import Collector, FakeStream, fast_mqtt, wait_until
from tests.mosquitto import Mosquitto, free_port

RATE = 16_000
NODE = "line1"


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a SIGKILLed writer may be partial
            pass
    return rows


def event_keys(rows) -> set[tuple]:
    return {(r["id"], r["type"], r["seq"]) for r in rows}


def start_monitor(cfg: Path, *extra: str, log_level: str = "warning") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train.cli", "monitor", "--config", str(cfg),
                             "--log-level", log_level, *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)})


def drain(proc: subprocess.Popen, sig=signal.SIGTERM) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.communicate(timeout=120)


def sequence_files(tone_data: Path) -> list[Path]:
    """normal -> anomalous -> normal, as in the end-to-end alarm test."""
    test = tone_data / "test"
    return (sorted(test.glob("normal_id_00_*.wav")) + sorted(test.glob("anomaly_id_00_*.wav"))
            + sorted(test.glob("normal_id_01_*.wav")))


def drop_sequence(folder: Path, files: list[Path], phase: int) -> None:
    for i, p in enumerate(files, 1):
        os.symlink(p, folder / f"p{phase}_{i:04d}_{p.name}")


# --------------------------------------------------------------------------- 1. no event lost


def test_every_alarm_event_reaches_the_broker_through_broker_and_daemon_crashes(
        tone_data, tiny_model, tmp_path):
    """(a) broker down at start, (b) broker SIGKILLed mid-alarm and restarted, (c) daemon
    SIGKILLed with events pending and restarted on the same state_dir: every (id, type, seq)
    the daemon produced (its JSONL sink) arrives on the broker at least once."""
    files = sequence_files(tone_data)
    drop = tmp_path / "drop"
    drop.mkdir()
    out = tmp_path / "out.jsonl"
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    cfg = tmp_path / "harken.yaml"
    cfg.write_text(yaml.safe_dump({
        "node": NODE, "device": "cpu", "state_dir": str(tmp_path / "state"), "jsonl": str(out),
        "stats_interval_s": 0.5, "evidence": {"enabled": False},
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive_s": 5,
                 "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
        "alarm": {"rule": "kofn", "k": 2, "n": 3, "hold_s": 20.0},
        "sources": [{"id": "slider3", "kind": "folder", "path": str(drop),
                     "model": str(tiny_model), "watch": True, "poll_s": 0.1,
                     "speed": "realtime", "time_scale": 40.0}]}))

    def events():
        return [r for r in read_jsonl(out) if r["kind"] == "event"]

    def ends() -> int:
        return sum(e["type"] == "end" for e in events())

    # A durable subscriber: its session (and the QoS 1 messages queued for it) outlives the
    # broker's restarts, so whatever the broker accepted reaches it.
    broker.start()
    seen = Collector(broker, ("harken/#",), client_id="fault-watcher", persistent=True)
    wait_until(lambda: (tmp_path / "broker" / "mosquitto.db").exists(), what="broker saved")
    broker.stop()
    proc = start_monitor(cfg)
    try:
        # (a) no broker at start: the alarm happens while it is away
        drop_sequence(drop, files, 1)
        wait_until(lambda: ends() >= 1, timeout_s=120, what="first alarm over")
        broker.start()
        wait_until(lambda: seen.payloads(f"harken/{NODE}/status")[-1:] == [b"online"],
                   timeout_s=60, what="daemon online")

        # (b) the broker dies while the alarm is on and comes back after it ended
        drop_sequence(drop, files, 2)
        wait_until(lambda: sum(e["type"] == "start" for e in events()) >= 2, timeout_s=120,
                   what="second alarm started")
        broker.kill()
        wait_until(lambda: ends() >= 2, timeout_s=120, what="second alarm over")
        broker.start()

        # (c) the daemon is SIGKILLed with undelivered events in its outbox
        wait_until(lambda: seen.payloads(f"harken/{NODE}/status")[-1:] == [b"online"],
                   timeout_s=60, what="daemon reconnected")
        broker.stop()
        drop_sequence(drop, files, 3)
        wait_until(lambda: ends() >= 3, timeout_s=120, what="third alarm over")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        for p in drop.iterdir():  # the recorder's files were consumed: nothing to replay
            p.unlink()
        broker.start()
        proc = start_monitor(cfg)
        produced = event_keys(events())
        assert len(produced) >= 9 and sum(k[1] == "start" for k in produced) == 3

        def received():
            return event_keys(json.loads(p) for p in seen.payloads(f"harken/{NODE}/slider3/event"))
        wait_until(lambda: received() >= produced, timeout_s=60, what="every event on the broker")
        assert received() == produced
        stderr = drain(proc)[1]
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        seen.close()
        broker.stop()
    stats = [r for r in read_jsonl(out) if r["kind"] == "stats"]
    # the outbox held events while the broker was away; scores were dropped and counted
    assert max(s["outbox_pending"] for s in stats) > 0
    assert max(s["scores_dropped_offline"] for s in stats) > 0
    assert stats[-1]["outbox_pending"] == 0
    assert seen.last(f"harken/{NODE}/slider3/alarm") == b"OFF"


# --------------------------------------------------------------------------- 2. sources come back


class FakeDetector:
    name = "fake"
    threshold = 1.0

    def threshold_for(self, machine_id):
        return self.threshold

    def score_windows(self, windows, machine_ids):
        return np.full(len(windows), 0.1, np.float32)


class Recorder:
    """An in-memory publisher that records source states in order."""

    def __init__(self):
        self.states: dict[str, list[str]] = {}
        self.events = []
        self.scores = []
        self.lock = threading.Lock()

    def start(self): ...
    def stop(self): ...
    def publish_alarm_state(self, *a): ...
    def publish_stats(self, s): ...
    def status(self): return {}

    def publish_score(self, s):
        with self.lock:
            self.scores.append(s)

    def publish_event(self, e):
        with self.lock:
            self.events.append(e)

    def publish_source_state(self, source, state):
        with self.lock:
            self.states.setdefault(source, []).append(state)

    def state(self, source):
        with self.lock:
            return self.states.get(source, [None])[-1]


def test_sources_stall_and_resume_without_a_restart(broker, tmp_path):
    from monitor.daemon.app import Daemon
    from monitor.daemon.folder import FolderSource
    from monitor.daemon.mic import MicSource
    from monitor.daemon.mqtt import MqttAudioSource, user_properties

    folder = tmp_path / "share"
    folder.mkdir()
    mqtt = fast_mqtt(broker)
    common = dict(model="m", window_s=1.0, hop_s=0.5)
    cfgs = (SourceConfig(id="f", kind="folder", path=str(folder), watch=True, poll_s=0.05, **common),
            SourceConfig(id="m", kind="mic", **common),
            SourceConfig(id="q", kind="mqtt", topic="rec/q/pcm", **common))
    cfg = DaemonConfig(sources=cfgs, node="t", device="cpu", state_dir=str(tmp_path / "state"),
                       stall_after_s=0.5, stats_interval_s=0.2,
                       evidence=EvidenceConfig(enabled=False))
    streams: list[FakeStream] = []
    device_gone = threading.Event()

    def open_stream(**kw):
        if device_gone.is_set():
            raise OSError("PortAudio: device unavailable")
        streams.append(FakeStream(**kw))
        return streams[-1]

    devices = [{"name": "USB mic", "max_input_channels": 1}]
    mic = MicSource(cfgs[1], query_devices=lambda: devices, stream_factory=open_stream,
                    reopen_backoff_s=(0.05, 0.2))
    sources = {"f": FolderSource(cfgs[0]), "m": mic,
               "q": MqttAudioSource(cfgs[2], mqtt, node="t", password=None, stall_after_s=0.5)}
    pub = Recorder()
    daemon = Daemon(cfg, publisher=pub, detectors={"m": FakeDetector()}, sources=sources)
    sender = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    sender.connect(broker.host, broker.port)
    sender.loop_start()
    feeding = {"m": threading.Event(), "q": threading.Event()}
    for e in feeding.values():
        e.set()
    done = threading.Event()
    chunk = (0.1 * np.sin(np.arange(1600) / 5.0)).astype(np.float32)

    def feed():
        seq = 0
        while not done.wait(0.05):
            if feeding["m"].is_set() and streams and streams[-1].active:
                streams[-1].callback(chunk[:, None], 1600, SimpleNamespace(inputBufferAdcTime=0.0),
                                     None)
            if feeding["q"].is_set():
                sender.publish("rec/q/pcm", (chunk * 32767).astype("<i2").tobytes(), qos=0,
                               properties=user_properties(seq))
                seq += 1

    runner = threading.Thread(target=daemon.run)
    feeder = threading.Thread(target=feed)
    sf.write(folder / "000.wav", tone_clip(np.random.default_rng(0), 0, False, seconds=2.0), RATE)
    runner.start()
    feeder.start()
    try:
        wait_until(lambda: sources["q"].status()["connected"], what="mqtt source subscribed")
        wait_until(lambda: {s.source for s in list(pub.scores)} == {"f", "m", "q"},
                   timeout_s=30, what="every source scored")

        def outage(sid, break_it, repair_it):
            break_it()
            wait_until(lambda: pub.state(sid) == "stalled", timeout_s=30, what=f"{sid} stalled")
            others = {o: pub.state(o) for o in "fmq" if o != sid}
            assert others == {o: "running" for o in others}, others  # the others go on
            assert daemon.stats()["sources"][sid]["state"] == "stalled"
            wait_until(lambda: daemon.metrics.registry.get_sample_value(
                "harken_source_stalled", {"source": sid}) == 1, what=f"{sid} stalled metric")
            before = sum(s.source == sid for s in list(pub.scores))
            repair_it()
            wait_until(lambda: pub.state(sid) == "running", timeout_s=30, what=f"{sid} back")
            wait_until(lambda: sum(s.source == sid for s in list(pub.scores)) > before,
                       timeout_s=30, what=f"{sid} scored again")

        # a folder on a share that is unmounted, then mounted again with a new recording
        outage("f", lambda: shutil.rmtree(folder),
               lambda: (folder.mkdir(), sf.write(folder / "001.wav", tone_clip(
                   np.random.default_rng(1), 0, False, seconds=2.0), RATE)))
        assert sources["f"].status()["missing_episodes"] == 1

        def unplug():
            device_gone.set()
            streams[-1].active = False  # PortAudio reports the stream inactive
        def plug_back_in():
            wait_until(lambda: mic.reopen_failures >= 1, what="a failed reopen")
            device_gone.clear()
        outage("m", unplug, plug_back_in)
        assert mic.reopens == 1 and mic.reopen_failures >= 1

        outage("q", feeding["q"].clear, feeding["q"].set)
        assert pub.states["f"] == ["running", "stalled", "running"]
        assert pub.states["m"] == ["running", "stalled", "running"]
        assert pub.states["q"] == ["running", "stalled", "running"]
    finally:
        done.set()
        feeder.join()
        daemon.request_stop()
        runner.join(timeout=60)
        sender.disconnect()
        sender.loop_stop()
    assert not runner.is_alive()


def test_watchdog_starves_only_when_every_live_source_is_dead(tmp_path):
    """An idle watched folder is waiting (a recorder on its night break), not dead; a vanished
    one is dead. The watchdog starves only when no live source is healthy."""
    from monitor.daemon.app import Daemon
    from monitor.daemon.notify import SystemdNotifier

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfgs = tuple(SourceConfig(id=p.name, kind="folder", model="m", path=str(p), watch=True,
                              poll_s=0.05) for p in (a, b))
    cfg = DaemonConfig(sources=cfgs, node="t", device="cpu", state_dir=str(tmp_path / "s"),
                       watchdog_dead_s=5.0)
    daemon = Daemon(cfg, publisher=Recorder(), detectors={"m": FakeDetector()},
                    notifier=SystemdNotifier({}))
    daemon.start()
    try:
        daemon.reporter.started_mono = time.monotonic() - 60.0  # both silent for a minute: idle, alive
        assert daemon.alive()
        shutil.rmtree(a)
        wait_until(lambda: daemon.sources["a"].status()["state"] == "stalled", what="a missing")
        assert daemon.alive()  # b is still there, waiting for files
        shutil.rmtree(b)
        wait_until(lambda: daemon.sources["b"].status()["state"] == "stalled", what="b missing")
        assert not daemon.alive()
        b.mkdir()
        wait_until(lambda: daemon.sources["b"].status()["state"] != "stalled", what="b back")
        assert daemon.alive()
    finally:
        daemon.stop()


def test_mic_keeps_retrying_with_back_off_while_the_device_is_gone():
    from monitor.daemon.mic import MicSource

    streams, attempts = [], []
    gone = threading.Event()

    def open_stream(**kw):
        attempts.append(time.monotonic())
        if gone.is_set():
            raise OSError("PortAudio: Invalid device")
        streams.append(FakeStream(**kw))
        return streams[-1]

    src = MicSource(SourceConfig(id="m", kind="mic", model="m"),
                    query_devices=lambda: [{"name": "x", "max_input_channels": 1}],
                    stream_factory=open_stream, reopen_backoff_s=(0.01, 0.04))
    blocks = []
    src.start(blocks.append, lambda w: None)
    try:
        gone.set()
        streams[0].active = False
        wait_until(lambda: src.reopen_failures >= 2, what="several failed reopens")
        assert src.status()["state"] == "stalled" and len(streams) == 1
        gone.clear()
        wait_until(lambda: len(streams) == 2, what="reopened")
        wait_until(lambda: src.status()["state"] == "running", what="running again")
        streams[1].callback(np.zeros((1600, 1), np.float32), 1600,
                            SimpleNamespace(inputBufferAdcTime=0.0), None)
        wait_until(lambda: blocks, what="audio after the reopen")
        assert blocks[0].discontinuity and src.reopens == 1
    finally:
        src.stop()


# --------------------------------------------------------------------------- 3. bad audio


def wav_bytes(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, x, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_bad_files_in_a_folder_are_counted_and_the_daemon_goes_on(tiny_model, tmp_path):
    rng = np.random.default_rng(5)
    d = tmp_path / "drop"
    d.mkdir()
    good = wav_bytes(tone_clip(rng, 0, False))
    (d / "01_normal_id_00_good.wav").write_bytes(good)
    (d / "02_empty.wav").write_bytes(b"")
    (d / "03_text.wav").write_text("this is a shopping list, not audio\n" * 20)
    (d / "04_garbage.wav").write_bytes(b"RIFF" + rng.integers(0, 256, 4000, np.uint8).tobytes())
    (d / "05_truncated.wav").write_bytes(good[: len(good) // 3])
    liar = bytearray(good)
    data_at = liar.index(b"data")
    struct.pack_into("<I", liar, data_at + 4, 50 * len(good))  # claims far more than is there
    struct.pack_into("<I", liar, 4, 50 * len(good) + 36)
    (d / "06_lying_header.wav").write_bytes(bytes(liar))
    (d / "07_header_only.wav").write_bytes(good[:44])
    (d / "08_normal_id_00_good.wav").write_bytes(wav_bytes(tone_clip(rng, 0, False)))
    out = tmp_path / "out.jsonl"
    cfg = tmp_path / "harken.yaml"
    cfg.write_text(yaml.safe_dump({
        "node": NODE, "device": "cpu", "state_dir": str(tmp_path / "state"), "jsonl": str(out),
        "sources": [{"id": "f", "kind": "folder", "path": str(d), "model": str(tiny_model)}]}))
    proc = harken("monitor", "--config", str(cfg), "--log-level", "warning")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = read_jsonl(out)
    scored = {Path(r["file"]).name for r in rows if r["kind"] == "score"}
    # the good files and whatever audio the damaged ones still hold are scored
    assert {"01_normal_id_00_good.wav", "08_normal_id_00_good.wav", "05_truncated.wav",
            "06_lying_header.wav"} <= scored
    assert not scored & {"02_empty.wav", "03_text.wav", "04_garbage.wav", "07_header_only.wav"}
    stats = [r for r in rows if r["kind"] == "stats"][-1]
    assert stats["sources"]["f"]["skipped"] == 4 and stats["windows_failed"] == 0
    assert stats["sources"]["f"]["state"] == "ended"
    warnings = [json.loads(ln) for ln in proc.stderr.splitlines()
                if ln.startswith("{") and '"file_skipped"' in ln]
    # rate-limited: the first bad file is named, the next ones within a minute are counted
    assert len(warnings) == 1 and warnings[0]["reason"] == "unreadable"
    assert "02_empty.wav" in warnings[0]["file"]


def test_window_levels_and_fault_thresholds():
    t = np.arange(RATE) / RATE
    tone = (0.1 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    assert window_faults(measure(tone)) == {}
    assert set(window_faults(measure(np.zeros(RATE, np.float32)))) == {"silence"}
    quiet = tone * 10 ** ((SILENCE_DBFS - 5) / 20) / 0.0707  # 5 dB under the silence line
    assert set(window_faults(measure(quiet))) == {"silence"}
    assert window_faults(measure(quiet * 10)) == {}
    clipped = np.clip(tone * 30, -1, 1)
    assert set(window_faults(measure(clipped))) == {"clipping"}
    few = tone.copy()
    few[: int(RATE * CLIP_FRACTION / 2)] = 1.0  # under the fraction: a single loud click
    assert window_faults(measure(few)) == {}
    assert set(window_faults(measure(tone + 0.3))) == {"dc_offset"}
    nan = tone.copy()
    nan[::100] = np.nan  # non-finite samples never reach the result as NaN
    levels = measure(nan)
    assert np.isfinite(levels.rms_dbfs) and "clipping" in window_faults(levels)


def test_sensor_fault_episodes_start_once_and_end():
    mon = SensorFaultMonitor("n", "s")
    tone = (0.1 * np.sin(np.arange(RATE) / 3.0)).astype(np.float32)
    kinds = [tone, np.zeros(RATE, np.float32), np.zeros(RATE, np.float32), tone, tone + 0.5]
    events = [(e.detail["kind"], e.detail["state"], e.seq)
              for i, x in enumerate(kinds)
              for e in mon.update(Window("s", x, 100.0 + i, 1.0, 0.0))]
    assert events == [("silence", "start", 0), ("silence", "end", 1), ("dc_offset", "start", 0)]
    assert mon.episodes == {"silence": 1, "clipping": 0, "dc_offset": 1}
    assert set(mon.active) == {"dc_offset"}


def test_sensor_faults_in_the_daemon_through_real_scorers(tiny_model, tmp_path):
    from monitor.daemon.app import Daemon

    rng = np.random.default_rng(9)
    d = tmp_path / "drop"
    d.mkdir()
    normal = [tone_clip(rng, 0, False) for _ in range(5)]
    t = np.arange(10 * RATE) / RATE
    clipped = np.clip(3.0 * np.sin(2 * np.pi * 150 * t), -1, 1)  # symmetric: no DC offset
    clips = [normal[0], np.zeros(10 * RATE, np.float32), np.zeros(10 * RATE, np.float32),
             normal[1], clipped, normal[3], normal[4] + 0.4, normal[0]]
    for i, x in enumerate(clips):
        sf.write(d / f"{i:02d}_normal_id_00.wav", x.astype(np.float32), RATE, subtype="FLOAT")
    out = tmp_path / "out.jsonl"
    cfg = DaemonConfig(sources=(SourceConfig(id="f", kind="folder", model=str(tiny_model),
                                             path=str(d)),),
                       node="t", device="cpu", state_dir=str(tmp_path / "state"), jsonl=str(out),
                       sensor_faults=True, evidence=EvidenceConfig(enabled=False))
    assert Daemon(cfg).run() == 0
    rows = read_jsonl(out)  # allow_nan=False: a NaN anywhere would have failed the write
    faults = [(r["detail"]["kind"], r["detail"]["state"], Path(r["detail"]["file"]).name[:2])
              for r in rows if r["kind"] == "event" and r["type"] == "sensor_fault"]
    assert faults == [("silence", "start", "01"), ("silence", "end", "03"),
                      ("clipping", "start", "04"), ("clipping", "end", "05"),
                      ("dc_offset", "start", "06"), ("dc_offset", "end", "07")]
    scores = [r for r in rows if r["kind"] == "score"]
    stats = [r for r in rows if r["kind"] == "stats"][-1]
    assert stats["sensor_faults"] == 3 and stats["windows_failed"] == 0
    assert stats["sources"]["f"]["sensor_faults"] == {"silence": 1, "clipping": 1, "dc_offset": 1}
    # silent windows are scored too (not skipped) unless a scorer gives no finite number
    assert len(scores) + stats["windows_nonfinite"] == len(clips)
    assert all(np.isfinite(r["score"]) for r in scores)


# --------------------------------------------------------------------------- 4. bad models


@pytest.mark.parametrize("change, expect", [
    ({"format_version": 99}, "upgrade harken"),
    ({"sample_rate_hz": 44100}, "retrain the model at 16000 Hz"),
])
def test_a_model_from_a_newer_harken_or_another_rate_fails_at_start(tiny_model, tmp_path, change,
                                                                     expect):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    manifest = json.loads((model / "manifest.json").read_text())
    (model / "manifest.json").write_text(json.dumps(manifest | change))
    d = tmp_path / "drop"
    d.mkdir()
    source = {"id": "f", "kind": "folder", "path": str(d), "model": str(model)}
    _, problems = config_problems({"sources": [source]})
    assert len(problems) == 1 and str(model / "manifest.json") in problems[0], problems
    assert expect in problems[0]
    cfg = tmp_path / "harken.yaml"
    cfg.write_text(yaml.safe_dump({"node": NODE, "device": "cpu", "sources": [source],
                                   "state_dir": str(tmp_path / "state")}))
    proc = harken("monitor", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("harken: error:"), proc.stderr
    assert str(model / "manifest.json") in lines[0] and expect in lines[0]


# --------------------------------------------------------------------------- 5. security


@pytest.mark.parametrize("topic", ["rec/+/pcm", "rec/#", "#"])
def test_the_audio_topic_rejects_wildcards(tmp_path, topic):
    _, problems = config_problems({"mqtt": {}, "sources": [
        {"id": "q", "kind": "mqtt", "model": "m", "topic": topic}]}, check_models=False)
    assert problems == [f"sources[0].topic: must not contain MQTT wildcards, got {topic!r}"]


def listening_address(port: int) -> str | None:
    """The local address of the LISTEN socket on `port`, from /proc/net/tcp{,6}."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                if len(addr) == 8:
                    return socket.inet_ntoa(struct.pack("<I", int(addr, 16)))
                return addr
    return None


def test_password_never_logged_and_metrics_only_on_localhost(tiny_model, tmp_path):
    password = "pw-Zq83-never-print-me"
    with Mosquitto(tmp_path / "broker", users={"harken": password, "watcher": "w"}) as broker:
        seen = Collector(broker, ("harken/#",), username="watcher", password="w")
        secret = tmp_path / "mqtt_password"
        secret.write_text(password + "\n")
        port = free_port()
        d = tmp_path / "drop"
        d.mkdir()
        sf.write(d / "000_normal_id_00.wav", tone_clip(np.random.default_rng(2), 0, False), RATE)
        cfg = tmp_path / "harken.yaml"
        cfg.write_text(yaml.safe_dump({
            "node": NODE, "device": "cpu", "state_dir": str(tmp_path / "state"),
            "metrics": {"enabled": True, "port": port},  # host left to its default
            "mqtt": {"host": broker.host, "port": broker.port, "username": "harken",
                     "password_file": str(secret), "reconnect_min_s": 0.2,
                     "reconnect_max_s": 0.5},
            "sources": [{"id": "f", "kind": "folder", "path": str(d), "model": str(tiny_model),
                         "watch": True, "poll_s": 0.1}]}))
        proc = start_monitor(cfg, log_level="debug")
        try:
            seen.wait_for(f"harken/{NODE}/f/score", timeout_s=120)
            assert listening_address(port) == "127.0.0.1"
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            assert b"harken_mqtt_outbox_pending" in text and b"harken_source_stalled" in text
        finally:
            stdout, stderr = drain(proc)
            seen.close()
    assert proc.returncode == 0, stderr
    # it did log, verbosely: paho's packet log too (CONNECT with its user-name/password flags)
    assert '"mqtt_connected"' in stderr and "Sending CONNECT" in stderr
    assert password not in stdout + stderr
    assert password not in (tmp_path / "state" / "outbox.sqlite").read_bytes().decode("latin-1")


class LoudDetector(FakeDetector):
    """Every window is anomalous; drawing the evidence fails like soundfile on a full disk."""

    def score_windows(self, windows, machine_ids):
        return np.full(len(windows), 5.0, np.float32)

    def log_mel(self, window):
        raise RuntimeError("Error writing file: No space left on device")


def test_an_alarm_goes_out_even_when_its_evidence_cannot_be_saved(tmp_path):
    from monitor.daemon.app import Daemon
    from monitor.daemon.config import AlarmConfig

    folder = tmp_path / "clips"
    folder.mkdir()
    for i in range(3):
        sf.write(folder / f"{i:03d}.wav", tone_clip(np.random.default_rng(i), 0, False, seconds=1.0),
                 RATE)
    cfg = DaemonConfig(sources=(SourceConfig(id="s", kind="folder", model="m", path=str(folder)),),
                       node="t", device="cpu", state_dir=str(tmp_path / "state"),
                       alarm=AlarmConfig(k=1, n=1, hold_s=30))
    pub = Recorder()
    daemon = Daemon(cfg, publisher=pub, detectors={"m": LoudDetector()})
    assert daemon.run() == 0
    starts = [e for e in pub.events if e.type == "start"]
    assert len(starts) == 1 and starts[0].clip is None and starts[0].image is None
    assert daemon.worker.failed == 0 and len(pub.scores) == 3


class SlowDetector(FakeDetector):
    def score_windows(self, windows, machine_ids):
        time.sleep(0.01)
        return np.full(len(windows), 0.1, np.float32)


def test_a_folder_at_max_speed_scores_every_window_even_with_a_slow_model(tmp_path):
    """Replay is not live: with a model slower than file reading, nothing is dropped."""
    from monitor.daemon.app import Daemon

    folder = tmp_path / "clips"
    folder.mkdir()
    clip = tone_clip(np.random.default_rng(0), 0, False, seconds=0.5)
    for i in range(40):
        sf.write(folder / f"{i:03d}.wav", clip, RATE)
    cfg = DaemonConfig(sources=(SourceConfig(id="s", kind="folder", model="m", path=str(folder)),),
                       node="t", device="cpu", state_dir=str(tmp_path / "state"),
                       queue_max_windows=4, batch_max=1)
    pub = Recorder()
    daemon = Daemon(cfg, publisher=pub, detectors={"m": SlowDetector()})
    assert daemon.run() == 0
    assert daemon.queue.dropped == 0 and len(pub.scores) == 40
