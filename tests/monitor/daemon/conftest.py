"""Fixtures for the daemon's MQTT tests: a real Mosquitto per test and a collecting subscriber."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from monitor.daemon.config import MqttConfig
from tests.mosquitto import Mosquitto


@pytest.fixture
def broker(tmp_path):
    with Mosquitto(tmp_path / "broker") as b:
        yield b


def fast_mqtt(broker: Mosquitto, **overrides) -> MqttConfig:
    """Test settings: short keepalive and reconnect back-off."""
    base = dict(host=broker.host, port=broker.port, keepalive_s=5, reconnect_min_s=0.2,
                reconnect_max_s=0.5)
    return MqttConfig(**(base | overrides))


def wait_until(predicate, timeout_s: float = 15.0, what: str = "condition"):
    """Poll until predicate() is truthy; the timeout only bounds a hang, it asserts no speed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Collector:
    """A subscriber that records every message by topic (payload bytes, retain flag)."""

    def __init__(self, broker: Mosquitto, topics=("#",), *, client_id: str | None = None,
                 persistent: bool = False, username: str | None = None,
                 password: str | None = None):
        self.messages: dict[str, list[tuple[bytes, bool]]] = defaultdict(list)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.topics = topics
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                  protocol=paho.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.1, 0.3)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        props = None
        if persistent:  # the broker keeps the session (and queues QoS 1) while we are away
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, keepalive=5,
                            clean_start=not persistent, properties=props)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, what="collector subscription")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client, userdata, message):
        with self._lock:
            self.messages[message.topic].append((bytes(message.payload), bool(message.retain)))

    def payloads(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for p, _ in self.messages.get(topic, [])]

    def last(self, topic: str) -> bytes | None:
        got = self.payloads(topic)
        return got[-1] if got else None

    def wait_for(self, topic: str, payload: bytes | None = None, timeout_s: float = 15.0) -> bytes:
        def seen():
            got = self.payloads(topic)
            if payload is None:
                return got[-1] if got else None
            return payload if payload in got else None
        return wait_until(seen, timeout_s, f"{payload!r} on {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collector_factory():
    made: list[Collector] = []

    def make(broker: Mosquitto, topics=("#",), **kw) -> Collector:
        c = Collector(broker, topics, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def collector(broker, collector_factory) -> Collector:
    return collector_factory(broker)


class FakeStream:
    """A PortAudio input stream stand-in: the test calls its callback, or a feeder thread does
    while it is active."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.callback = kwargs["callback"]
        self.active = False
        self.time = 50.0  # PortAudio stream clock

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def close(self):
        pass
