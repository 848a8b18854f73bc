"""MqttPublisher against a real Mosquitto: availability, retained state, payloads, discovery,
auth, and delivery of every alarm event through broker and publisher crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from monitor.daemon.mqtt import MqttPublisher
from monitor.daemon.types import AlarmEvent, Score
from monitor.errors import UsageError
from tests.helpers import REPO
from tests.monitor.daemon.conftest import fast_mqtt, wait_until
from tests.mosquitto import Mosquitto, free_port


def make_score(source="pump", score=0.7, threshold=0.5) -> Score:
    return Score(source=source, model="tiny", score=score, threshold=threshold,
                 window_start_s=1700000000.0, window_end_s=1700000010.0, ready_mono_s=1.0,
                 scored_time_s=1700000010.25, label="clip.wav")


def make_event(i: int, source="pump", type_="start") -> AlarmEvent:
    return AlarmEvent(type=type_, id=f"alarm-{i:04d}-{uuid.uuid4().hex[:6]}", source=source,
                      ts=1700000000.0 + i, peak_score=1.5, threshold=0.5, seq=i % 3)


@pytest.fixture
def publisher_factory(tmp_path):
    made: list[MqttPublisher] = []

    def make(broker, node="line1", sources=("pump",), state_dir=None, password=None,
             **mqtt_overrides) -> MqttPublisher:
        pub = MqttPublisher(fast_mqtt(broker, **mqtt_overrides), node=node, source_ids=sources,
                            state_dir=state_dir or tmp_path / "state", password=password,
                            drain_timeout_s=5.0)
        made.append(pub)
        return pub

    yield make
    for pub in made:
        if not getattr(pub, "_stopped_by_test", False):
            pub.stop()


def stop(pub: MqttPublisher) -> None:
    pub._stopped_by_test = True
    pub.stop()


def test_online_then_stopped_and_retained_alarm_for_a_late_subscriber(broker, collector,
                                                                      collector_factory,
                                                                      publisher_factory):
    pub = publisher_factory(broker)
    pub.start()
    collector.wait_for("harken/line1/status", b"online")
    pub.publish_alarm_state("pump", True)
    pub.publish_source_state("pump", "running")
    collector.wait_for("harken/line1/pump/alarm", b"ON")
    wait_until(lambda: pub.status()["outbox_pending"] == 0, what="outbox drained")
    stop(pub)
    collector.wait_for("harken/line1/status", b"stopped")
    late = collector_factory(broker)
    assert late.wait_for("harken/line1/pump/alarm") == b"ON"
    assert late.wait_for("harken/line1/status") == b"stopped"
    assert late.wait_for("harken/line1/pump/state") == b"running"
    assert all(retain for _, retain in late.messages["harken/line1/pump/alarm"])


def test_score_event_and_stats_payloads(broker, collector, publisher_factory):
    pub = publisher_factory(broker, topic_prefix="plant/hall2")
    pub.start()
    collector.wait_for("plant/hall2/line1/status", b"online")
    score, event = make_score(), make_event(1)
    pub.publish_score(score)
    pub.publish_event(event)
    pub.publish_stats({"windows": 3})
    assert json.loads(collector.wait_for("plant/hall2/line1/pump/score")) == score.to_json()
    assert json.loads(collector.wait_for("plant/hall2/line1/pump/event")) == event.to_json()
    assert json.loads(collector.wait_for("plant/hall2/line1/stats")) == {"windows": 3}
    wait_until(lambda: pub.status()["outbox_pending"] == 0, what="event acknowledged")
    s = pub.status()
    assert s["connected"] and s["scores_published"] == 1 and s["outbox_acked"] == 1


def test_home_assistant_discovery(broker, collector, collector_factory, publisher_factory):
    pub = publisher_factory(broker, sources=("pump", "fan"), discovery=True,
                            discovery_prefix="ha")
    pub.start()
    alarm = json.loads(collector.wait_for("ha/binary_sensor/line1_fan_alarm/config"))
    score = json.loads(collector.wait_for("ha/sensor/line1_pump_score/config"))
    assert alarm["state_topic"] == "harken/line1/fan/alarm"
    assert (alarm["payload_on"], alarm["payload_off"]) == ("ON", "OFF")
    assert alarm["availability"][0]["topic"] == "harken/line1/status"
    assert score["state_topic"] == "harken/line1/pump/score"
    assert score["value_template"] == "{{ value_json.score }}"
    assert alarm["device"]["identifiers"] == score["device"]["identifiers"]
    assert alarm["unique_id"] != score["unique_id"]
    late = collector_factory(broker, topics=("ha/#",))  # retained: a new Home Assistant sees it
    assert json.loads(late.wait_for("ha/sensor/line1_pump_score/config")) == score
    assert all(r for _, r in late.messages["ha/sensor/line1_pump_score/config"])


@pytest.mark.parametrize("kw, match", [
    (dict(node="line+1"), "node"),
    (dict(node="a/b"), "node"),
    (dict(node=""), "node"),
    (dict(sources=("pu#mp",)), r"sources\[0\]"),
    (dict(sources=("pump", "pump")), "duplicate"),
    (dict(topic_prefix="plant//x"), "empty topic level"),
    (dict(topic_prefix="/plant"), "empty topic level"),
    (dict(topic_prefix="pl+ant"), "topic_prefix"),
])
def test_topic_parts_are_validated(tmp_path, kw, match):
    from monitor.daemon.config import MqttConfig
    cfg = MqttConfig(topic_prefix=kw.pop("topic_prefix", "harken"))
    with pytest.raises(UsageError, match=match):
        MqttPublisher(cfg, node=kw.get("node", "line1"), source_ids=kw.get("sources", ("pump",)),
                      state_dir=tmp_path, password=None)


def test_password_file_auth(tmp_path, collector_factory, publisher_factory):
    with Mosquitto(tmp_path / "auth", users={"harken": "s3cret", "watcher": "w"}) as b:
        seen = collector_factory(b, username="watcher", password="w")
        bad = publisher_factory(b, node="bad", username="harken", password="wrong",
                                state_dir=tmp_path / "bad")
        bad.start()
        wait_until(lambda: bad.status()["connect_failures"] >= 1, what="refused connect")
        bad.publish_score(make_score())
        s = bad.status()
        assert not s["connected"] and s["scores_dropped"] == 1 and s["last_error"]
        good = publisher_factory(b, node="good", username="harken", password="s3cret",
                                 state_dir=tmp_path / "good")
        good.start()
        seen.wait_for("harken/good/status", b"online")
        assert good.status()["connected"]
        assert seen.payloads("harken/bad/status") == []


# --------------------------------------------------------------------------- crashes

CHILD = """
import json, sys, time
from pathlib import Path
from monitor.daemon.config import MqttConfig
from monitor.daemon.mqtt import MqttPublisher
from monitor.daemon.types import AlarmEvent
args = json.loads(sys.argv[1])
pub = MqttPublisher(MqttConfig(**args["mqtt"]), node="line1", source_ids=["pump"],
                    state_dir=Path(args["state_dir"]), password=None)
pub.start()
if args["wait_connected"]:
    while not pub.status()["connected"]:
        time.sleep(0.02)
for i in range(args["events"]):
    pub.publish_event(AlarmEvent(type="start", id=f"ev-{i}", source="pump", ts=1.0 + i,
                                 peak_score=2.0, threshold=1.0, seq=i))
if args["events"]:
    pub.publish_alarm_state("pump", True)
print("ready", pub.status()["outbox_pending"], flush=True)
time.sleep(600)
"""


def run_child(mqtt: dict, state_dir, *, events: int, wait_connected: bool) -> subprocess.Popen:
    args = json.dumps({"mqtt": mqtt, "state_dir": str(state_dir), "events": events,
                       "wait_connected": wait_connected})
    proc = subprocess.Popen([sys.executable, "-c", CHILD, args], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    line = proc.stdout.readline()
    assert line.startswith("ready"), f"child publisher failed: {line!r}"
    return proc, line


def test_sigkilled_publisher_leaves_offline_via_last_will(broker, collector, tmp_path):
    mqtt = dict(host=broker.host, port=broker.port, keepalive_s=5, reconnect_min_s=0.2)
    proc, _ = run_child(mqtt, tmp_path / "state", events=0, wait_connected=True)
    collector.wait_for("harken/line1/status", b"online")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    collector.wait_for("harken/line1/status", b"offline")


def test_outbox_rows_of_a_sigkilled_publisher_are_delivered_on_restart(tmp_path, collector_factory,
                                                                       publisher_factory):
    port = free_port()  # nothing listens yet: every event stays in the outbox
    mqtt = dict(host="127.0.0.1", port=port, keepalive_s=5, reconnect_min_s=0.2,
                reconnect_max_s=0.5)
    proc, line = run_child(mqtt, tmp_path / "state", events=5, wait_connected=False)
    assert line.split() == ["ready", "6"]  # 5 events + 1 alarm state
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Mosquitto(tmp_path / "broker", port=port) as b:
        seen = collector_factory(b)
        pub = publisher_factory(b, state_dir=tmp_path / "state")
        pub.start()
        assert seen.wait_for("harken/line1/pump/alarm") == b"ON"
        wait_until(lambda: len(seen.payloads("harken/line1/pump/event")) >= 5, what="5 events")
        ids = sorted(json.loads(p)["id"] for p in seen.payloads("harken/line1/pump/event"))
        assert ids == [f"ev-{i}" for i in range(5)]
        wait_until(lambda: pub.status()["outbox_pending"] == 0, what="outbox drained")


def test_every_event_arrives_when_the_broker_dies_mid_run(tmp_path, collector_factory,
                                                          publisher_factory):
    with Mosquitto(tmp_path / "broker", persistence=True) as b:
        seen = collector_factory(b, client_id="durable-watcher", persistent=True)
        wait_until(lambda: (tmp_path / "broker" / "mosquitto.db").exists(), what="broker saved")
        pub = publisher_factory(b, reconnect_min_s=0.3, reconnect_max_s=0.6)
        pub.start()
        wait_until(lambda: pub.status()["connected"], what="publisher connected")
        produced = []
        for i in range(60):
            if i == 20:
                b.kill()
            if i == 40:
                time.sleep(1.0)  # a few seconds of outage in all
                b.start()
            event = make_event(i)
            produced.append(event.id)
            pub.publish_event(event)
            time.sleep(0.03)
        wait_until(lambda: {json.loads(p)["id"] for p in seen.payloads("harken/line1/pump/event")}
                   >= set(produced), timeout_s=30, what="every event id")
        received = [json.loads(p)["id"] for p in seen.payloads("harken/line1/pump/event")]
        assert len(set(produced)) == len(set(received)) == 60
        wait_until(lambda: pub.status()["outbox_pending"] == 0, what="outbox drained")
        assert pub.status()["reconnects"] >= 1


# --------------------------------------------------------------------------- end to end


def test_harken_monitor_publishes_to_a_real_broker(broker, collector, tiny_model, tmp_path):
    """The daemon as a subprocess: folder source -> scores on MQTT; SIGTERM leaves `stopped`,
    SIGKILL leaves `offline` through the last will."""
    import numpy as np
    import soundfile as sf
    import yaml

    from tests.helpers import tone_clip

    drop = tmp_path / "drop"
    drop.mkdir()
    sf.write(drop / "000_normal_id_00.wav", tone_clip(np.random.default_rng(1), 0, False,
                                                       seconds=20.0), 16000)
    cfg = tmp_path / "harken.yaml"
    cfg.write_text(yaml.safe_dump({
        "node": "line1", "device": "cpu", "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port, "keepalive_s": 5,
                 "reconnect_min_s": 0.2, "reconnect_max_s": 0.5},
        "sources": [{"id": "f", "kind": "folder", "path": str(drop), "model": str(tiny_model),
                     "watch": True, "poll_s": 0.1, "hop_s": 1.0}]}))

    def start_daemon() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "train.cli", "monitor", "--config",
                                 str(cfg), "--log-level", "warning"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=os.environ | {"PYTHONPATH": str(REPO)})

    proc = start_daemon()
    try:
        collector.wait_for("harken/line1/status", b"online", timeout_s=120)
        score = json.loads(collector.wait_for("harken/line1/f/score", timeout_s=120))
        assert score["source"] == "f" and score["threshold"] > 0 and "score" in score
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert collector.last("harken/line1/status") == b"stopped"
        assert collector.last("harken/line1/f/state") in (b"stopped", b"ended")

        proc = start_daemon()
        wait_until(lambda: collector.payloads("harken/line1/status")[-1:] == [b"online"],
                   timeout_s=120, what="second daemon online")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        collector.wait_for("harken/line1/status", b"offline")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
