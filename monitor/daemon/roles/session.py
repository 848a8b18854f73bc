"""MQTT connection set-up shared by the roles: a paho 2 client (monitor.daemon.mqtt_publisher's
make_client) with a last will on `<prefix>/<node>/status` and, for workers and the alarm stage,
a persistent session: the broker keeps the subscription and the unacknowledged messages while
the process is away, and hands them back when it reconnects under the same client id."""

from __future__ import annotations

import threading

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from monitor.daemon.config import DaemonConfig, resolve_mqtt_password
from monitor.daemon.mqtt_publisher import check_topic_part, check_topic_prefix, make_client
from monitor.logs import get_logger


class RoleConnection:
    """One client of one role; `on_connected(client)` runs on every (re)connect, after the
    status topic says `online`."""

    def __init__(self, cfg: DaemonConfig, *, client_id: str, persistent: bool,
                 manual_ack: bool = False, receive_maximum: int | None = None, on_connected=None,
                 stage: str, announce: bool = True):
        """announce: own `<prefix>/<node>/status` (last will, online, stopped); False where
        another client of the same process owns it (the alarm stage's publisher)."""
        assert cfg.mqtt is not None
        self.mqtt = cfg.mqtt
        self.prefix = check_topic_prefix(cfg.mqtt.topic_prefix)
        self.node = check_topic_part(cfg.node, "node")
        self.status_topic = f"{self.prefix}/{self.node}/status"
        self.log = get_logger(stage=stage, node=self.node)
        self.client = make_client(cfg.mqtt, client_id=client_id,
                                  password=resolve_mqtt_password(cfg.mqtt), manual_ack=manual_ack)
        self.announce = announce
        if announce:
            self.client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.connected = threading.Event()
        self.generation = 0  # +1 per connection: acks of an older connection are not sent
        self.persistent = persistent
        self._props = Properties(PacketTypes.CONNECT)
        self._props.SessionExpiryInterval = cfg.distributed.session_expiry_s if persistent else 0
        if receive_maximum is not None:
            self._props.ReceiveMaximum = receive_maximum
        self._on_connected = on_connected
        self.client_id = client_id

    def start(self) -> None:
        self.log.info("mqtt_connecting", host=self.mqtt.host, port=self.mqtt.port,
                      client_id=self.client_id, persistent=self.persistent)
        self.client.connect_async(self.mqtt.host, self.mqtt.port, keepalive=self.mqtt.keepalive_s,
                                  clean_start=not self.persistent, properties=self._props)
        self.client.loop_start()

    def stop(self, status: str = "stopped") -> None:
        if self.connected.is_set() and self.announce:
            info = self.client.publish(self.status_topic, status, qos=1, retain=True)
            info.wait_for_publish(2.0)
        self.client.disable_logger()  # paho logs "not connected" at error level once more
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.log.warning("mqtt_connect_refused", reason=str(reason_code))
            return
        self.generation += 1
        if self._on_connected is not None:
            self._on_connected(client)  # subscribes first: `online` means ready for messages
        if self.announce:
            client.publish(self.status_topic, "online", qos=1, retain=True)
        self.connected.set()
        self.log.info("mqtt_connected", host=self.mqtt.host, port=self.mqtt.port,
                      session_present=bool(flags.session_present))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set():
            self.log.warning("mqtt_disconnected", reason=str(reason_code))
        self.connected.clear()
