"""Reliability of the daemon (issue 6): fault injection against real Mosquitto processes, sources
that go away and come back, bad audio, sensor faults, bad models, and what must never leak."""

from __future__ import annotations

import dataclasses
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
from tests.monitor.daemon.conftest import Collector, fast_mqtt, wait_until
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
        "alarm": {"k": 2, "n": 3, "hold_s": 20.0},
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


class DyingStream:
    """A PortAudio stream stand-in that a feeder thread fills while it is active."""

    def __init__(self, **kw):
        self.callback = kw["callback"]
        self.active = False
        self.time = 0.0

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def close(self):
        pass


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
    streams: list[DyingStream] = []
    device_gone = threading.Event()

    def open_stream(**kw):
        if device_gone.is_set():
            raise OSError("PortAudio: device unavailable")
        streams.append(DyingStream(**kw))
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
    from monitor.daemon.app import Daemon
    from monitor.daemon.notify import SystemdNotifier

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cfgs = tuple(SourceConfig(id=p.name, kind="folder", model="m", path=str(p), watch=True)
                 for p in (a, b))
    cfg = DaemonConfig(sources=cfgs, node="t", device="cpu", state_dir=str(tmp_path / "s"),
                       watchdog_dead_s=5.0)
    daemon = Daemon(cfg, publisher=Recorder(), detectors={"m": FakeDetector()},
                    notifier=SystemdNotifier({}))
    daemon.start()
    try:
        now = time.monotonic()
        daemon._started_mono = now - 60.0  # both silent for a minute...
        daemon.rings["b"].last_audio_mono_s = None
        daemon.sources["a"].last_audio_mono_s = now - 1.0  # ...but one just delivered audio
        assert daemon.alive()
        daemon.sources["a"].last_audio_mono_s = now - 6.0
        assert not daemon.alive()
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
        streams.append(DyingStream(**kw))
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
