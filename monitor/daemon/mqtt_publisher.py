"""MqttPublisher: scores, alarm states, events, source states and stats out to MQTT, plus
the topic checks and client set-up shared with the audio source (no torch import: `harken
watch` uses them). Topics are listed in `monitor.daemon.mqtt`."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from monitor.daemon.config import MqttConfig
from monitor.daemon.outbox import Outbox, PubackTracker
from monitor.daemon.ratelimit import RateLimitedWarning
from monitor.daemon.types import AlarmEvent, Score
from monitor.errors import UsageError
from monitor.logs import get_logger

SOURCE_STATES = ("learning", "running", "stalled", "ended", "stopped")  # "stopped": clean exit
_FORBIDDEN_TOPIC_CHARS = ("+", "#", "/", "\0")


# --------------------------------------------------------------------------- topics


def check_topic_part(value: str, what: str) -> str:
    """One topic level (node, source id): non-empty, no wildcards, no `/`."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"{what}: must be a non-empty string (got {value!r})")
    bad = [c for c in _FORBIDDEN_TOPIC_CHARS if c in value]
    if bad:
        raise UsageError(f"{what}: {value!r} must not contain {' '.join(map(repr, bad))} "
                         "(MQTT wildcards and level separators)")
    return value


def check_topic_prefix(value: str, what: str = "mqtt.topic_prefix") -> str:
    """A prefix may span levels (`factory/line1`) but every level must be a valid part."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"{what}: must be a non-empty string (got {value!r})")
    for level in value.split("/"):
        if not level:
            raise UsageError(f"{what}: {value!r} has an empty topic level")
        check_topic_part(level, what)
    return value


def check_subscription_topic(value: str | None, what: str) -> str:
    """An exact topic to subscribe to: levels may be anything but wildcards or empty."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"{what}: an MQTT topic is required")
    if "+" in value or "#" in value or "\0" in value:
        raise UsageError(f"{what}: {value!r} must not contain MQTT wildcards (+ or #)")
    if any(not level for level in value.split("/")):
        raise UsageError(f"{what}: {value!r} has an empty topic level")
    return value


def make_client(mqtt: MqttConfig, *, client_id: str, password: str | None,
                manual_ack: bool = False) -> paho.Client:
    """A paho 2.x client (MQTT v5) with credentials, TLS and reconnect back-off applied.
    manual_ack: QoS 1 messages are acknowledged by `client.ack()` once handled (issue 17)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5, manual_ack=manual_ack)
    if mqtt.username:
        client.username_pw_set(mqtt.username, password)
    if mqtt.tls is not None:
        try:
            client.tls_set(ca_certs=mqtt.tls.ca_file, certfile=mqtt.tls.cert_file,
                           keyfile=mqtt.tls.key_file)
        except (OSError, ValueError) as exc:
            raise UsageError(f"mqtt.tls: cannot load certificates ({exc})") from None
        client.tls_insecure_set(mqtt.tls.insecure)
    client.reconnect_delay_set(min_delay=mqtt.reconnect_min_s, max_delay=mqtt.reconnect_max_s)
    # paho's own log (packets at debug level) through structlog's handler; it never writes
    # the password (CONNECT is logged as flags), which a test checks at debug level.
    client.enable_logger(logging.getLogger("paho.mqtt"))
    return client


# --------------------------------------------------------------------------- publisher


class MqttPublisher:
    """Publishes scores, alarm states, events, source states and stats for one node.

    Events and alarm states go through a durable SQLite outbox and are removed only on the
    broker's PUBACK; scores and stats are QoS 0 and dropped (counted) while disconnected.
    """

    def __init__(self, config: MqttConfig, *, node: str, source_ids: Sequence[str],
                 state_dir: Path, password: str | None, drain_timeout_s: float = 5.0):
        self.config = config
        self.node = check_topic_part(node, "node")
        self.prefix = check_topic_prefix(config.topic_prefix)
        self.source_ids = tuple(check_topic_part(s, f"sources[{i}].id")
                                for i, s in enumerate(source_ids))
        if len(set(self.source_ids)) != len(self.source_ids):
            raise UsageError(f"sources: duplicate source ids in {list(self.source_ids)}")
        if config.discovery:
            check_topic_prefix(config.discovery_prefix, "mqtt.discovery_prefix")
        self.drain_timeout_s = drain_timeout_s
        self.base = f"{self.prefix}/{self.node}"
        self.status_topic = f"{self.base}/status"
        self._log = get_logger(stage="mqtt_publisher", node=self.node)
        self._warn = RateLimitedWarning(self._log, every_s=60.0)
        self._outbox = Outbox(Path(state_dir) / "outbox.sqlite", max_rows=config.outbox_max_events)
        self._client = make_client(config, client_id=config.client_id or f"harken-{self.node}",
                                   password=password)
        self._client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._connected = threading.Event()
        self._ever_connected = False
        self._stopping = False
        self._acks = PubackTracker()
        # Retained state is re-published on every connect; this lock orders it against updates.
        self._state_lock = threading.Lock()
        self._alarm_on: dict[str, bool] = {}
        self._source_state: dict[str, str] = {}
        self._counters = {"scores_published": 0, "scores_dropped": 0, "stats_dropped": 0,
                          "outbox_acked": 0, "outbox_rejected": 0, "reconnects": 0,
                          "connect_failures": 0, "outbox_write_failed": 0}
        self._last_error: str | None = None
        self._flusher: threading.Thread | None = None

    # ---------------------------------------------------------------- topics

    def topic(self, source: str, leaf: str) -> str:
        return f"{self.base}/{check_topic_part(source, 'source')}/{leaf}"

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._log.info("mqtt_connecting", host=self.config.host, port=self.config.port,
                       outbox_pending=len(self._outbox),
                       username=self.config.username is not None)
        self._client.connect_async(self.config.host, self.config.port,
                                   keepalive=self.config.keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        """Drain the outbox (bounded), publish `stopped`, disconnect."""
        self._stopping = True
        deadline = time.monotonic() + self.drain_timeout_s
        while len(self._outbox) and self._connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._connected.is_set():
            info = self._client.publish(self.status_topic, "stopped", qos=1, retain=True)
            while (not info.is_published() and self._connected.is_set()
                   and time.monotonic() < deadline + 1.0):
                time.sleep(0.02)
        pending = len(self._outbox)
        if pending:
            self._log.warning("mqtt_outbox_not_drained", outbox_pending=pending)
        # paho's loop thread may run once more after the socket closes and log "Client is not
        # connected" at error level: noise on every clean stop, so its logger goes quiet here.
        self._client.disable_logger()
        self._client.disconnect()
        self._client.loop_stop()
        if self._flusher is not None:
            self._flusher.join(timeout=5.0)
        self._outbox.close()
        self._log.info("mqtt_stopped", outbox_pending=pending)

    # ---------------------------------------------------------------- Publisher protocol

    def publish_score(self, score: Score) -> None:
        if not self._connected.is_set():
            self._counters["scores_dropped"] += 1
            return
        info = self._client.publish(self.topic(score.source, "score"),
                                    json.dumps(score.to_json()), qos=0)
        key = "scores_published" if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS else "scores_dropped"
        self._counters[key] += 1

    def publish_alarm_state(self, source: str, on: bool) -> None:
        topic = self.topic(source, "alarm")
        with self._state_lock:
            self._alarm_on[source] = bool(on)
            self._enqueue("state", topic, b"ON" if on else b"OFF", retain=True)

    def publish_event(self, event: AlarmEvent) -> None:
        self._enqueue("event", self.topic(event.source, "event"),
                      json.dumps(event.to_json()).encode(), retain=False)

    def publish_evidence(self, source: str, reference: dict) -> None:
        """An alarm's evidence saved after its event went out (the capture box's clips)."""
        self._enqueue("event", self.topic(source, "evidence"), json.dumps(reference).encode(),
                      retain=False)

    def publish_source_state(self, source: str, state: str) -> None:
        if state not in SOURCE_STATES:
            # Still published: a dashboard seeing an odd state beats a daemon dying on it.
            self._warn("mqtt_unexpected_source_state", state, source=source, state=state)
        topic = self.topic(source, "state")
        with self._state_lock:
            self._source_state[source] = state
            # Not durable: paho retries it while this process lives, and it is re-sent on connect.
            self._client.publish(topic, state, qos=1, retain=True)

    def publish_stats(self, stats: dict) -> None:
        if not self._connected.is_set():
            self._counters["stats_dropped"] += 1
            return
        self._client.publish(f"{self.base}/stats", json.dumps(stats, default=str), qos=0)

    def status(self) -> dict:
        return {"connected": self._connected.is_set(), "outbox_pending": len(self._outbox),
                "outbox_dropped_events": self._outbox.dropped["event"],
                "outbox_dropped_states": self._outbox.dropped["state"],
                "last_error": self._last_error, **self._counters}

    # ---------------------------------------------------------------- outbox

    def _enqueue(self, kind: str, topic: str, payload: bytes, *, retain: bool) -> None:
        try:
            row_id, removed = self._outbox.add(kind, topic, payload, retain=retain)
        except sqlite3.Error as exc:
            # A full disk or a damaged database: the message still goes out (QoS 1; paho
            # retries it while this process lives), only its survival of a crash is lost.
            self._counters["outbox_write_failed"] += 1
            self._warn("outbox_write_failed", "write", topic=topic, error=str(exc)[:200],
                       failed=self._counters["outbox_write_failed"])
            self._client.publish(topic, payload, qos=1, retain=retain)
            return
        self._acks.release(removed)
        self._hand_to_client(row_id, topic, payload, retain)

    def _hand_to_client(self, row_id: int, topic: str, payload: bytes, retain: bool) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # paho's queue is full: the row stays on disk and is handed over on the next connect.
            self._log.warning("mqtt_publish_queue_full", topic=topic, rc=int(info.rc))
            return
        if self._acks.handed(info.mid, row_id):
            self._row_acked(row_id)

    def _flush_outbox(self) -> None:
        """Hand paho every pending row it does not hold yet (rows of a previous run, rows
        refused while its queue was full). paho itself re-sends the ones it holds."""
        for row in self._outbox.pending():
            if self._acks.holds(row.id):
                continue
            self._hand_to_client(row.id, row.topic, row.payload, row.retain)

    def _row_acked(self, row_id: int) -> None:
        self._acks.release((row_id,))
        try:
            removed = self._outbox.remove(row_id)
        except sqlite3.Error as exc:  # on paho's thread: an exception would end its loop
            self._warn("outbox_write_failed", "remove", row=row_id, error=str(exc)[:200])
            return  # the row is sent again after a restart: at-least-once still holds
        if removed:
            self._counters["outbox_acked"] += 1

    # ---------------------------------------------------------------- paho callbacks

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._counters["connect_failures"] += 1
            self._last_error = str(reason_code)
            self._log.warning("mqtt_connect_refused", reason=str(reason_code))
            return
        if self._ever_connected:
            self._counters["reconnects"] += 1
        self._ever_connected = True
        self._last_error = None
        client.publish(self.status_topic, "stopped" if self._stopping else "online",
                       qos=1, retain=True)
        if self.config.discovery:
            self._publish_discovery(client)
        with self._state_lock:
            # The broker may have lost retained values (restart without persistence).
            for source, on in self._alarm_on.items():
                topic = self.topic(source, "alarm")
                if not self._outbox.has_pending(topic):
                    client.publish(topic, "ON" if on else "OFF", qos=1, retain=True)
            for source, state in self._source_state.items():
                client.publish(self.topic(source, "state"), state, qos=1, retain=True)
        self._connected.set()
        self._log.info("mqtt_connected", host=self.config.host, port=self.config.port,
                       session_present=bool(flags.session_present),
                       outbox_pending=len(self._outbox))
        # From another thread: rows can be many, and paho's own re-sends go out after we return.
        self._flusher = threading.Thread(target=self._flush_outbox, name="mqtt-outbox-flush",
                                         daemon=True)
        self._flusher.start()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping:
            self._last_error = str(reason_code)
            self._log.warning("mqtt_disconnected", reason=str(reason_code),
                              outbox_pending=len(self._outbox))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        row_id = self._acks.acked(mid)
        if row_id is None:
            return
        if reason_code.is_failure:
            # The broker refused it (e.g. not authorised): re-sending would loop forever.
            self._counters["outbox_rejected"] += 1
            self._log.warning("mqtt_publish_rejected", mid=mid, reason=str(reason_code))
        self._row_acked(row_id)

    # ---------------------------------------------------------------- Home Assistant

    def _publish_discovery(self, client) -> None:
        prefix = self.config.discovery_prefix
        device = {"identifiers": [f"harken_{self.node}"], "name": f"harken {self.node}",
                  "manufacturer": "harken", "model": "acoustic anomaly monitor"}
        availability = {"topic": self.status_topic,
                        # `stopped` (clean exit) is unavailable too.
                        "value_template": "{{ 'online' if value == 'online' else 'offline' }}",
                        "payload_available": "online", "payload_not_available": "offline"}
        for source in self.source_ids:
            uid = f"{self.node}_{source}"
            alarm = {"name": f"{source} alarm", "unique_id": f"harken_{uid}_alarm",
                     "object_id": f"harken_{uid}_alarm", "state_topic": self.topic(source, "alarm"),
                     "payload_on": "ON", "payload_off": "OFF", "device_class": "problem",
                     "availability": [availability], "device": device}
            score = {"name": f"{source} anomaly score", "unique_id": f"harken_{uid}_score",
                     "object_id": f"harken_{uid}_score", "state_topic": self.topic(source, "score"),
                     "value_template": "{{ value_json.score }}",
                     "json_attributes_topic": self.topic(source, "score"),
                     "state_class": "measurement", "availability": [availability],
                     "device": device}
            client.publish(f"{prefix}/binary_sensor/{uid}_alarm/config", json.dumps(alarm),
                           qos=1, retain=True)
            client.publish(f"{prefix}/sensor/{uid}_score/config", json.dumps(score),
                           qos=1, retain=True)
