"""The daemon's configuration: frozen dataclasses, one per YAML section.

Every key in the YAML maps to a field here; the loader rejects unknown keys with their dotted
path. Secrets (the MQTT password) never live in the YAML: `password_file` names a file, and
`$CREDENTIALS_DIRECTORY/mqtt_password` (systemd LoadCredential=) or `$HARKEN_MQTT_PASSWORD`
are used when it is absent.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

SOURCE_KINDS = ("folder", "mic", "mqtt")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class AlarmConfig:
    k: int = 2  # alarm ON after k of the last n windows exceed the threshold
    n: int = 3
    hold_s: float = 30.0  # alarm OFF after this long with every window below the threshold
    threshold: float | None = None  # None: the model artifact's calibrated threshold


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None
    insecure: bool = False  # skip host name verification (test brokers only)


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "harken"
    username: str | None = None
    password_file: str | None = None
    client_id: str | None = None  # default: harken-<node>
    keepalive_s: int = 30
    tls: TlsConfig | None = None
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    discovery: bool = False  # Home Assistant MQTT discovery
    discovery_prefix: str = "homeassistant"
    outbox_max_events: int = 10_000  # durable outbox bound (events and alarm states)


@dataclass(frozen=True)
class SourceConfig:
    id: str  # topic-safe: [A-Za-z0-9_-]
    kind: str  # folder | mic | mqtt
    model: str  # artifact directory
    window_s: float = 10.0
    hop_s: float = 10.0
    alarm: AlarmConfig | None = None  # overrides the daemon-wide alarm settings
    machine_id: int | None = None  # for models with per-machine-ID statistics
    # folder
    path: str | None = None
    speed: str = "max"  # max | realtime
    watch: bool = False  # keep waiting for new files
    poll_s: float = 1.0
    # mic
    device: str | int | None = None  # sounddevice name (substring) or index; None: default input
    # mic and mqtt
    rate_hz: int | None = None  # mic: device default when None; mqtt: 16000 when None
    channels: int = 1  # channels in the stream (mic: opened; mqtt: interleaved in payloads)
    select_channels: tuple[int, ...] | None = None  # which channels to mix down; None: all
    # mqtt
    topic: str | None = None  # the audio topic (no wildcards)
    format: str = "s16le"  # s16le | f32le (stream mode)
    mode: str = "stream"  # stream: raw PCM chunks; window: each message is one WAV clip
    max_payload_bytes: int = 4_000_000


@dataclass(frozen=True)
class EvidenceConfig:
    enabled: bool = True
    max_count: int = 200  # alarm evidence sets kept (WAV + PNG)
    max_bytes: int = 500_000_000


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"  # localhost by default: metrics are not for the whole network
    port: int = 9464


@dataclass(frozen=True)
class DaemonConfig:
    sources: tuple[SourceConfig, ...]
    node: str = field(default_factory=socket.gethostname)
    device: str = "auto"
    threads: int | None = None  # torch CPU threads; None: torch's default
    state_dir: str = "/var/lib/harken"  # evidence, outbox; $STATE_DIRECTORY overrides the default
    mqtt: MqttConfig | None = None
    jsonl: str | None = None  # path or "-"; the default sink when mqtt is absent is "-"
    alarm: AlarmConfig = AlarmConfig()
    queue_max_windows: int = 64  # inference backlog; the oldest windows are dropped beyond it
    batch_max: int = 32
    stats_interval_s: float = 30.0
    watchdog_dead_s: float = 120.0  # stop feeding the systemd watchdog when all sources are dead this long
    sensor_faults: bool = False  # silence / clipping raise `sensor_fault` events
    evidence: EvidenceConfig = EvidenceConfig()
    metrics: MetricsConfig = MetricsConfig()
