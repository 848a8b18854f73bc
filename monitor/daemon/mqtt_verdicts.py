"""Verdicts over MQTT: `<prefix>/<node>/<source>/verdict/set` with a JSON payload
`{"event_id": "...", "verdict": "normal" | "fault", "note": "..."}`; `"event_id": "latest"`
names the source's most recent alarm (what the Home Assistant buttons send). The answer goes
to `<prefix>/<node>/<source>/verdict` (not retained): the recorded verdict, or
`{"error": "..."}` for a refused one, which changes nothing. Who may send is the broker's
business (its ACLs), as for every other topic of the node.

Its own client and connection, so a slow verdict (the clip is embedded on the inference
worker) never holds up the publisher's network loop; messages are handled one at a time on
a small thread with a bounded inbox.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Sequence

from monitor.daemon.mqtt_publisher import make_client
from monitor.errors import UsageError
from monitor.logs import get_logger

INBOX_MAX = 32
MAX_PAYLOAD_BYTES = 4096


class MqttVerdictListener:
    def __init__(self, config, *, node: str, source_ids: Sequence[str], password: str | None,
                 handle: Callable[[object], dict], latest_event: Callable[[str], str | None]):
        self.config = config
        self.base = f"{config.topic_prefix}/{node}"
        self.node = node
        self.source_ids = list(source_ids)
        self.handle = handle
        self.latest_event = latest_event
        self._inbox: queue.Queue = queue.Queue(INBOX_MAX)
        self._log = get_logger(stage="mqtt_verdicts")
        self._client = make_client(config, client_id=f"{config.client_id or 'harken-' + node}-verdicts",
                                   password=password)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._thread = threading.Thread(target=self._run, name="harken-verdicts", daemon=True)
        self.handled = 0
        self.refused = 0

    def start(self) -> None:
        self._thread.start()
        self._client.connect_async(self.config.host, self.config.port,
                                   keepalive=self.config.keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._client.disconnect()
        self._client.loop_stop()
        self._thread.join(timeout=30)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        client.subscribe(f"{self.base}/+/verdict/set", qos=1)  # again on every connect
        if self.config.discovery:
            self._publish_buttons(client)

    def _on_message(self, client, userdata, message) -> None:
        try:
            self._inbox.put_nowait((message.topic, bytes(message.payload)))
        except queue.Full:
            self._log.warning("verdict_dropped", topic=message.topic, reason="inbox full")

    def _run(self) -> None:
        while (item := self._inbox.get()) is not None:
            topic, payload = item
            source = topic[len(self.base) + 1:].split("/")[0]
            try:
                result = self._apply(source, payload)
            except UsageError as exc:
                self.refused += 1
                self._log.warning("verdict_refused", source=source, error=str(exc)[:300])
                result = {"error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - one bad verdict must not stop the rest
                self.refused += 1
                self._log.exception("verdict_failed", source=source)
                result = {"error": f"internal error: {exc}"}
            else:
                self.handled += 1
            self._client.publish(f"{self.base}/{source}/verdict", json.dumps(result), qos=1)

    def _apply(self, source: str, payload: bytes) -> dict:
        if source not in self.source_ids:
            raise UsageError(f"no source {source[:100]!r} on node {self.node}")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise UsageError(f"a verdict is at most {MAX_PAYLOAD_BYTES} bytes")
        try:
            data = json.loads(payload)
        except ValueError:
            raise UsageError("a verdict must be JSON: {\"event_id\": ..., \"verdict\": ...}") from None
        if isinstance(data, dict) and data.get("event_id") == "latest":
            latest = self.latest_event(source)
            if latest is None:
                raise UsageError(f"source {source} has had no alarm to judge")
            data = {**data, "event_id": latest}
        return self.handle(data, source)

    def _publish_buttons(self, client) -> None:
        prefix = self.config.discovery_prefix
        device = {"identifiers": [f"harken_{self.node}"], "name": f"harken {self.node}"}
        for source in self.source_ids:
            for verdict in ("normal", "fault"):
                uid = f"{self.node}_{source}_verdict_{verdict}"
                button = {"name": f"{source} last alarm: {verdict}",
                          "unique_id": f"harken_{uid}", "object_id": f"harken_{uid}",
                          "command_topic": f"{self.base}/{source}/verdict/set",
                          "payload_press": json.dumps({"event_id": "latest", "verdict": verdict}),
                          "availability_topic": f"{self.base}/status", "device": device}
                client.publish(f"{prefix}/button/{uid}/config", json.dumps(button), qos=1,
                               retain=True)
