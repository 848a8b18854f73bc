"""The configured sinks and sources, built by kind from the daemon's config: JSONL, MQTT and the
operator's page as publishers (one, or a fan-out of several), folder, mic and MQTT audio as
sources. Network clients (paho) and the web page are imported only when the config names them.
"""

from __future__ import annotations

from pathlib import Path

from monitor.daemon.config import DaemonConfig, SourceConfig, resolve_mqtt_password
from monitor.daemon.fanout import FanoutPublisher
from monitor.daemon.types import Publisher, Source


def build_publisher(cfg: DaemonConfig, state_dir: Path) -> tuple[Publisher, object | None]:
    """The publisher, and the web page's sink when the page is enabled (else None)."""
    from monitor.daemon.jsonl import JsonlPublisher

    sinks: list = []
    web_sink = None
    if cfg.mqtt is not None:
        from monitor.daemon.mqtt import MqttPublisher  # paho only when a broker is configured

        sinks.append(MqttPublisher(cfg.mqtt, node=cfg.node,
                                   source_ids=[s.id for s in cfg.sources],
                                   state_dir=state_dir,
                                   password=resolve_mqtt_password(cfg.mqtt)))
    if cfg.jsonl is not None or cfg.mqtt is None:
        sinks.append(JsonlPublisher(cfg.jsonl or "-", node=cfg.node))
    if cfg.web.enabled:  # issue 16: the operator's page is one more sink
        from monitor.daemon.web import WebSink

        web_sink = WebSink([s.id for s in cfg.sources],
                           events_path=state_dir / "web_events.jsonl")
        sinks.append(web_sink)
    return (sinks[0] if len(sinks) == 1 else FanoutPublisher(sinks)), web_sink


def build_source(cfg: DaemonConfig, s: SourceConfig, state_dir: Path) -> Source:
    if s.kind == "folder":
        from monitor.daemon.folder import FolderSource

        return FolderSource(s, keep_silent=cfg.sensor_faults,
                            played_path=state_dir / "folders" / f"{s.id}.played.jsonl")
    if s.kind == "mic":
        from monitor.daemon.mic import MicSource

        return MicSource(s)
    from monitor.daemon.mqtt import MqttAudioSource  # paho only when a source needs it

    assert cfg.mqtt is not None  # check-config guarantees it
    return MqttAudioSource(s, cfg.mqtt, node=cfg.node,
                           password=resolve_mqtt_password(cfg.mqtt),
                           stall_after_s=cfg.stall_after_s)
