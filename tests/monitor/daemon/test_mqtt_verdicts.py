"""Verdicts over MQTT against a real Mosquitto and a running daemon."""

from __future__ import annotations

import json
import shutil

import paho.mqtt.publish as publish
import soundfile as sf

from monitor.reference import ReferenceStore
from tests.helpers import RATE
from tests.monitor.daemon.conftest import Collector
from tests.monitor.daemon.test_web import ref_model  # noqa: F401 - the module's fixture
from tests.monitor.test_verdicts import _config, _lines, _wait, fault_clip, start_daemon


def test_mqtt_verdicts_and_buttons(tmp_path, broker, ref_model):  # noqa: F811
    watch = tmp_path / "in"
    watch.mkdir()
    cfg = _config(tmp_path, ref_model, watch, extra=(
        f"mqtt: {{host: {broker.host}, port: {broker.port}, verdicts: true, discovery: true,\n"
        "        reconnect_min_s: 0.2, reconnect_max_s: 0.5}\n"))
    clip = tmp_path / "fault.wav"
    sf.write(clip, fault_clip(7), RATE, subtype="PCM_16")
    collector = Collector(broker, topics=("harken/#", "homeassistant/#"))
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)
    out = tmp_path / "out.jsonl"
    answers = "harken/n1/fan/verdict"

    def send(payload) -> dict:
        before = len(collector.payloads(answers))
        publish.single("harken/n1/fan/verdict/set", payload, qos=1, hostname=broker.host,
                       port=broker.port)
        _wait(lambda: len(collector.payloads(answers)) > before, "the verdict's answer", proc)
        return json.loads(collector.payloads(answers)[before])

    def score_of(name: str):
        return next((ln for ln in _lines(out) if ln.get("file", "").endswith(name)
                     and "score" in ln), None)

    try:
        button = _wait(lambda: collector.payloads("homeassistant/button/n1_fan_verdict_normal/config"),
                       "the Home Assistant button", proc)
        press = json.loads(json.loads(button[0])["payload_press"])
        assert press == {"event_id": "latest", "verdict": "normal"}
        assert "no alarm" in send(json.dumps(press))["error"]

        shutil.copy(clip, watch / "a.wav")
        assert _wait(lambda: score_of("a.wav"), "the first score", proc)["anomaly"]
        _wait(lambda: any(ln.get("type") == "start" for ln in _lines(out)), "the alarm", proc)
        _wait(lambda: any((tmp_path / "state" / "evidence").glob("*.wav")), "the evidence", proc)

        assert "must be JSON" in send(b"{nope")["error"]
        assert "normal or fault" in send(json.dumps({"event_id": "latest", "verdict": "ok"}))["error"]
        assert "unknown event" in send(json.dumps({"event_id": "n1-fan-5", "verdict": "normal"}))["error"]
        assert ReferenceStore(tmp_path / "state", "fan").version() == 0, "refusals change nothing"

        done = send(json.dumps(press))
        assert done["verdict"] == "normal" and done["reference_version"] == 1, done
        _wait(lambda: '"reference_loaded"' in log.read_text() and '"version": 1' in log.read_text(),
              "the new reference", proc)
        shutil.copy(clip, watch / "b.wav")
        assert not _wait(lambda: score_of("b.wav"), "the replayed clip's score", proc)["anomaly"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        collector.client.loop_stop()
