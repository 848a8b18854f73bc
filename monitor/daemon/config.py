"""The daemon's configuration: frozen dataclasses, one per YAML section.

Every key in the YAML maps to a field here; the loader rejects unknown keys with their dotted
path. Secrets (the MQTT password) never live in the YAML: `password_file` names a file, and
`$CREDENTIALS_DIRECTORY/mqtt_password` (systemd LoadCredential=) or `$HARKEN_MQTT_PASSWORD`
are used when it is absent.
"""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from monitor.configload import MAX_PROBLEMS_SHOWN, ConfigError, from_mapping  # noqa: F401 (re-exported)
from monitor.daemon.config_checks import (PATH_SHOWN, file_problems, model_problems,  # noqa: F401
                                          resolve_state_dir)
from monitor.daemon.roles.settings import DistributedConfig, distributed_problems  # issue 17
from monitor.errors import UsageError
from monitor.yamlsafe import load_yaml_file, short_repr

SOURCE_KINDS = ("folder", "mic", "mqtt")


def default_node() -> str:
    """The host name made topic-safe: `line1.plant.example` -> `line1`."""
    short = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "-", short) or "harken"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class AlarmConfig:
    k: int = 2  # alarm ON after k of the last n windows exceed the threshold
    n: int = 3
    hold_s: float = 30.0  # alarm OFF after this long with every window below the threshold
    # None: from the false-alarm budget and the model's calibrated tail (monitor/calibration.py),
    # or the artifact's stored threshold for models trained before calibration. For kofn a
    # score level; for ewma/cusum a level of the statistic (standard deviations of normal scores).
    threshold: float | None = None
    false_alarms_per_day: float = 1.0 / 7.0  # the budget: expected false alarms a day, this source
    rule: str = "kofn"  # kofn | ewma | cusum (monitor/daemon/rules.py)
    ewma_lambda: float = 0.2  # ewma: weight of the newest window
    cusum_k: float = 0.5  # cusum: allowance, in standard deviations of normal scores


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
    # accept verdicts on <prefix>/<node>/<source>/verdict/set (monitor/daemon/mqtt_verdicts.py)
    verdicts: bool = False


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
    # folder, benchmarks: realtime pacing sped up by this factor (1.0: real time)
    time_scale: float = 1.0
    # enrolment (monitor/enrolment.py): learn the model's scorers from this much audio
    # ("2h", "30m", "90s" or seconds), then arm; None: armed from the start
    learn_for: float | str | None = None


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
class WebConfig:
    """The operator's page (monitor/daemon/web.py); off unless enabled."""

    enabled: bool = False
    host: str = "127.0.0.1"  # localhost by default: reading the page needs no token there
    port: int = 8099
    token_file: str | None = None  # verdicts need it; else $CREDENTIALS_DIRECTORY/web_token


@dataclass(frozen=True)
class DaemonConfig:
    sources: tuple[SourceConfig, ...] = ()  # none for role worker / alarms
    node: str = field(default_factory=lambda: default_node())
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA only): autocast for the networks
    threads: int | None = None  # torch CPU threads; None: torch's default
    state_dir: str = "/var/lib/harken"  # evidence, outbox; $STATE_DIRECTORY overrides the default
    mqtt: MqttConfig | None = None
    jsonl: str | None = None  # path or "-"; the default sink when mqtt is absent is "-"
    alarm: AlarmConfig = AlarmConfig()
    queue_max_windows: int = 64  # inference backlog; the oldest windows are dropped beyond it
    batch_max: int = 32
    stats_interval_s: float = 30.0
    watchdog_dead_s: float = 120.0  # stop feeding the systemd watchdog when all sources are dead this long
    stall_after_s: float = 10.0  # a live source silent for max(3 hop_s, this) is reported stalled
    sensor_faults: bool = False  # silence / clipping / DC offset raise `sensor_fault` events
    evidence: EvidenceConfig = EvidenceConfig()
    metrics: MetricsConfig = MetricsConfig()
    # windows a source's normal reference overlay may hold (monitor/reference.py)
    reference_max_windows: int = 500
    web: WebConfig = WebConfig()
    # issue 17: all (single box) | capture | worker | alarms (monitor/daemon/roles/)
    role: str = "all"
    distributed: DistributedConfig = DistributedConfig()


# --------------------------------------------------------------------------- loading

SOURCE_ID = re.compile(r"^[A-Za-z0-9_-]+$")
SPEEDS = ("max", "realtime")
AUDIO_FORMATS = ("s16le", "f32le")
MQTT_MODES = ("stream", "window")
DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d)?\s*$")
DURATION_UNITS_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_s(value: float | str) -> float:
    """`2h`, `30m`, `90s`, `1.5d` or a number of seconds -> seconds; ValueError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = DURATION.match(str(value))
    if m is None:
        raise ValueError(value)
    return float(m.group(1)) * DURATION_UNITS_S[m.group(2) or "s"]


def validate(cfg: DaemonConfig, check_paths: bool = True) -> list[str]:
    """Value checks the types cannot express, each naming its dotted path."""
    problems: list[str] = []

    def check(ok: bool, path: str, msg: str) -> None:
        if not ok:
            problems.append(f"{path}: {msg}")

    check(bool(SOURCE_ID.match(cfg.node)), "node",
          f"must use only letters, digits, '_' and '-' (it is part of MQTT topics), got {short_repr(cfg.node)}")
    check(cfg.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}, got {short_repr(cfg.device)}")
    check(cfg.precision in PRECISIONS, "precision",
          f"must be one of {', '.join(PRECISIONS)}, got {short_repr(cfg.precision)}")
    check(cfg.threads is None or cfg.threads >= 1, "threads", f"must be >= 1, got {cfg.threads}")
    check(cfg.queue_max_windows >= 1, "queue_max_windows", f"must be >= 1, got {cfg.queue_max_windows}")
    check(cfg.batch_max >= 1, "batch_max", f"must be >= 1, got {cfg.batch_max}")
    check(cfg.stats_interval_s > 0, "stats_interval_s", f"must be > 0, got {cfg.stats_interval_s}")
    check(cfg.watchdog_dead_s > 0, "watchdog_dead_s", f"must be > 0, got {cfg.watchdog_dead_s}")
    check(cfg.stall_after_s > 0, "stall_after_s", f"must be > 0, got {cfg.stall_after_s}")
    check(cfg.jsonl is None or cfg.jsonl != "", "jsonl", "must be a path or '-'")
    problems += _alarm_problems(cfg.alarm, "alarm")
    check(cfg.evidence.max_count >= 1, "evidence.max_count", f"must be >= 1, got {cfg.evidence.max_count}")
    check(cfg.evidence.max_bytes >= 1, "evidence.max_bytes", f"must be >= 1, got {cfg.evidence.max_bytes}")
    check(cfg.reference_max_windows >= 1, "reference_max_windows",
          f"must be >= 1, got {cfg.reference_max_windows}")
    check(0 <= cfg.web.port <= 65535, "web.port", f"must be in 0-65535 (0: any free), got {cfg.web.port}")
    check(1 <= cfg.metrics.port <= 65535, "metrics.port", f"must be in 1-65535, got {cfg.metrics.port}")
    if cfg.mqtt is not None:
        m = cfg.mqtt
        check(bool(m.host), "mqtt.host", "must not be empty")
        check(1 <= m.port <= 65535, "mqtt.port", f"must be in 1-65535, got {m.port}")
        problems += _topic_problems(m.topic_prefix, "mqtt.topic_prefix", prefix=True)
        if m.discovery:
            problems += _topic_problems(m.discovery_prefix, "mqtt.discovery_prefix", prefix=True)
        for key in ("client_id", "username"):
            value = getattr(m, key)
            if value is not None:
                bad = _mqtt_string_problem(value)
                check(bad is None, f"mqtt.{key}", f"{bad}, got {short_repr(value)}")
        check(m.keepalive_s >= 1, "mqtt.keepalive_s", f"must be >= 1, got {m.keepalive_s}")
        check(0 < m.reconnect_min_s <= m.reconnect_max_s, "mqtt.reconnect_min_s",
              f"must be > 0 and <= reconnect_max_s (got {m.reconnect_min_s} > {m.reconnect_max_s})"
              if m.reconnect_min_s > m.reconnect_max_s else f"must be > 0, got {m.reconnect_min_s}")
        check(m.outbox_max_events >= 1, "mqtt.outbox_max_events", f"must be >= 1, got {m.outbox_max_events}")
        if m.password_file is not None:
            check(Path(m.password_file).is_file(), "mqtt.password_file", f"{_clip(m.password_file)}: no such file")
    problems += distributed_problems(cfg)  # role and distributed: (and "no sources")
    seen: dict[str, int] = {}
    for i, s in enumerate(cfg.sources):
        if s is None:  # its own problems were reported while loading
            continue
        p = f"sources[{i}]"
        if not SOURCE_ID.match(s.id):
            problems.append(f"{p}.id: must use only letters, digits, '_' and '-' (it is an MQTT "
                            f"topic level), got {short_repr(s.id)}")
        elif s.id in seen:
            problems.append(f"{p}.id: {short_repr(s.id)} is already used by sources[{seen[s.id]}]")
        else:
            seen[s.id] = i
        if s.kind not in SOURCE_KINDS:
            problems.append(f"{p}.kind: unknown source kind {short_repr(s.kind)} (known: {', '.join(SOURCE_KINDS)})")
        check(s.window_s > 0, f"{p}.window_s", f"must be > 0, got {s.window_s}")
        if s.hop_s <= 0:
            problems.append(f"{p}.hop_s: must be > 0, got {s.hop_s}")
        elif s.hop_s > s.window_s:
            problems.append(f"{p}.hop_s: must be <= window_s (got {s.hop_s} > {s.window_s})")
        if s.alarm is not None:
            problems += _alarm_problems(s.alarm, f"{p}.alarm")
        check(s.time_scale > 0, f"{p}.time_scale", f"must be > 0, got {s.time_scale}")
        check(s.channels >= 1, f"{p}.channels", f"must be >= 1, got {s.channels}")
        if s.select_channels is not None:
            bad = [c for c in s.select_channels if not 0 <= c < s.channels]
            check(not bad and len(s.select_channels) > 0, f"{p}.select_channels",
                  f"channel numbers must be in 0..{s.channels - 1} (channels: {s.channels}), "
                  f"got {short_repr(list(s.select_channels))}")
        if s.rate_hz is not None:
            check(8000 <= s.rate_hz <= 48000, f"{p}.rate_hz", f"must be in 8000-48000, got {s.rate_hz}")
        if s.kind == "folder":
            if s.path is None:
                problems.append(f"{p}.path: required for a folder source")
            elif check_paths and not Path(s.path).is_dir():
                # --no-models: checked where the daemon runs, like the model paths
                problems.append(f"{p}.path: {_clip(s.path)}: no such directory")
            check(s.speed in SPEEDS, f"{p}.speed", f"must be one of {', '.join(SPEEDS)}, got {short_repr(s.speed)}")
            check(s.poll_s > 0, f"{p}.poll_s", f"must be > 0, got {s.poll_s}")
        if s.kind == "mqtt":
            if cfg.mqtt is None:
                problems.append(f"{p}.kind: an mqtt source needs the top-level mqtt: section")
            if not s.topic:
                problems.append(f"{p}.topic: required for an mqtt source")
            elif set("+#") & set(s.topic):
                problems.append(f"{p}.topic: must not contain MQTT wildcards, got {short_repr(s.topic)}")
            else:
                problems += _topic_problems(s.topic, f"{p}.topic", prefix=False)
            check(s.format in AUDIO_FORMATS, f"{p}.format",
                  f"must be one of {', '.join(AUDIO_FORMATS)}, got {short_repr(s.format)}")
            check(s.mode in MQTT_MODES, f"{p}.mode", f"must be one of {', '.join(MQTT_MODES)}, got {short_repr(s.mode)}")
            check(s.max_payload_bytes >= 1, f"{p}.max_payload_bytes", f"must be >= 1, got {s.max_payload_bytes}")
        if s.learn_for is not None:
            problems += _learn_for_problems(s, f"{p}.learn_for")
        if s.kind != "folder":
            for key, default in (("path", None), ("speed", "max"), ("watch", False)):
                check(getattr(s, key) == default, f"{p}.{key}", "only a folder source takes this key")
        if s.kind != "mic":
            check(s.device is None, f"{p}.device", "only a mic source takes this key")
        if s.kind != "mqtt":
            check(s.topic is None, f"{p}.topic", "only an mqtt source takes this key")
    problems += _output_path_problems(cfg)
    return problems


LEARN_MAX_WINDOWS = 50_000  # about 150 MB of 768-dim embeddings; beyond, learn_for is a mistake


def windows_needed(learn_for_s: float, hop_s: float) -> int:
    """Windows a learning source collects (monitor/daemon/learning.py): one per hop of audio."""
    return int(math.ceil(learn_for_s / hop_s - 1e-9))


def _learn_for_problems(s: SourceConfig, path: str) -> list[str]:
    from monitor.calibration import MIN_SCORES as MIN_WINDOWS  # the tail needs that many

    try:
        secs = duration_s(s.learn_for)
    except ValueError:
        return [f"{path}: must be a duration like 2h, 30m, 90s or a number of seconds, "
                f"got {short_repr(s.learn_for)}"]
    if s.hop_s <= 0:
        return []  # reported at hop_s
    n = windows_needed(secs, s.hop_s) if secs > 0 else 0
    if n < MIN_WINDOWS:
        return [f"{path}: must cover at least {MIN_WINDOWS} hops ({MIN_WINDOWS * s.hop_s:g} s at "
                f"hop_s {s.hop_s:g}) for a calibrated threshold, got {secs:g} s"]
    if n > LEARN_MAX_WINDOWS:
        return [f"{path}: at most {LEARN_MAX_WINDOWS} hops ({LEARN_MAX_WINDOWS * s.hop_s:g} s at hop_s "
                f"{s.hop_s:g}), got {secs:g} s"]
    return []


MQTT_MAX_STRING_BYTES = 65535


def _clip(text: str, limit: int = PATH_SHOWN) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _mqtt_string_problem(value: str) -> str | None:
    """Why `value` cannot be an MQTT string (topic, client id, user name), or None."""
    if "\0" in value:
        return "must not contain a NUL character"
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid text (it holds an unpaired surrogate)"
    if len(encoded) > MQTT_MAX_STRING_BYTES:
        return f"must be at most {MQTT_MAX_STRING_BYTES} bytes of UTF-8"
    return None


def _topic_problems(value: str, path: str, *, prefix: bool) -> list[str]:
    """A topic prefix (levels joined by '/', each non-empty, no wildcards) or an exact topic."""
    if not value:
        return [f"{path}: must not be empty"]
    bad = _mqtt_string_problem(value)
    if bad is not None:
        return [f"{path}: {bad}, got {short_repr(value)}"]
    if prefix and set("+#") & set(value):
        return [f"{path}: must be non-empty without MQTT wildcards, got {short_repr(value)}"]
    if any(not level for level in value.split("/")):
        return [f"{path}: {short_repr(value)} has an empty topic level"]
    return []


def _output_path_problems(cfg: DaemonConfig) -> list[str]:
    """Outputs that would be read back as input: a JSONL sink with an audio file name (JSON
    appended to a recording), or the evidence WAVs inside a watched folder (the daemon would
    score its own evidence, alarm on it, and write more)."""
    from monitor.labels import AUDIO_SUFFIXES

    out: list[str] = []
    if cfg.jsonl not in (None, "", "-") and Path(cfg.jsonl).suffix.lower() in AUDIO_SUFFIXES:
        out.append(f"jsonl: {short_repr(cfg.jsonl, PATH_SHOWN)} has an audio file name; the "
                   "JSONL sink appends JSON lines, give it a .jsonl name")
    state = resolve_state_dir(cfg)
    for i, s in enumerate(cfg.sources):
        if s is not None and s.kind == "folder" and s.watch and s.path and _within(state, Path(s.path)):
            out.append(f"state_dir: {short_repr(str(state), PATH_SHOWN)} is inside the watched "
                       f"sources[{i}].path: alarm evidence (WAV) written there would be read "
                       "back as recordings")
    return out


def _within(path: Path, folder: Path) -> bool:
    try:
        path.absolute().resolve().relative_to(folder.absolute().resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def _alarm_problems(a: AlarmConfig, path: str) -> list[str]:
    out = []
    if a.n < 1:
        out.append(f"{path}.n: must be >= 1, got {a.n}")
    if a.k < 1:
        out.append(f"{path}.k: must be >= 1, got {a.k}")
    elif a.k > a.n >= 1:
        out.append(f"{path}.k: must be <= n (got {a.k} > {a.n})")
    if a.hold_s < 0:
        out.append(f"{path}.hold_s: must be >= 0, got {a.hold_s}")
    from monitor.daemon.thresholds import rule_problems

    out += rule_problems(a, path)
    return out


def read_yaml(path: str | Path) -> dict:
    data = load_yaml_file(path)  # bounded: size, depth, alias expansion
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping (node:, sources:, ...) at the top level")
    return data


def config_problems(data: dict, *, check_models: bool = True,
                    check_files: bool = False) -> tuple[DaemonConfig | None, list[str]]:
    """check_models: load every artifact (and look for pretrained weights); check_files:
    the state directory and the JSONL file are writable here."""
    problems: list[str] = []
    cfg = from_mapping(DaemonConfig, data, "", problems)
    if cfg is None:
        return None, problems
    problems += validate(cfg, check_paths=check_models)
    if check_files and not problems:
        problems += file_problems(cfg)
    if check_models and not problems and cfg.role == "all":  # issue 17: roles load by name
        problems += model_problems(cfg)
    return (None if problems else cfg), problems


def load_config(path: str | Path, *, check_models: bool = True) -> DaemonConfig:
    """The YAML file as a validated DaemonConfig; ConfigError lists every problem at once."""
    cfg, problems = config_problems(read_yaml(path), check_models=check_models,
                                    check_files=check_models)
    if problems or cfg is None:
        raise ConfigError(str(path), problems)
    return cfg


def resolve_mqtt_password(mqtt: MqttConfig) -> str | None:
    """password_file, else $CREDENTIALS_DIRECTORY/mqtt_password (LoadCredential=), else
    $HARKEN_MQTT_PASSWORD. Never from the YAML, never logged."""
    if mqtt.password_file:
        try:
            return Path(mqtt.password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise UsageError(f"mqtt.password_file: {mqtt.password_file}: cannot read ({exc.strerror})") from None
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / "mqtt_password").is_file():
        return (Path(creds) / "mqtt_password").read_text().rstrip("\r\n")
    return os.environ.get("HARKEN_MQTT_PASSWORD") or None
