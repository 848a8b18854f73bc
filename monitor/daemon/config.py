"""The daemon's configuration: frozen dataclasses, one per YAML section.

Every key in the YAML maps to a field here; the loader rejects unknown keys with their dotted
path. Secrets (the MQTT password) never live in the YAML: `password_file` names a file, and
`$CREDENTIALS_DIRECTORY/mqtt_password` (systemd LoadCredential=) or `$HARKEN_MQTT_PASSWORD`
are used when it is absent.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from monitor.configload import MAX_PROBLEMS_SHOWN, PATH_SHOWN, ConfigError, clip, from_mapping  # noqa: F401
from monitor.daemon.config_checks import file_problems, model_problems, resolve_state_dir  # noqa: F401
from monitor.daemon.sections import (AlarmConfig, alarm_problems, EvidenceConfig, MetricsConfig,  # noqa: F401
                                     MqttConfig, TlsConfig, WebConfig)
from monitor.daemon.source_config import (SOURCE_ID, SOURCE_KINDS, FolderSourceConfig,  # noqa: F401
                                          MicSourceConfig, MqttSourceConfig, SourceConfig,
                                          _mqtt_string_problem, _topic_problems, duration_s,
                                          windows_needed)
from monitor.daemon.roles.settings import DistributedConfig, distributed_problems  # issue 17
from monitor.errors import UsageError
from monitor.yamlsafe import load_yaml_file, short_repr

def default_node() -> str:
    """The host name made topic-safe: `line1.plant.example` -> `line1`."""
    short = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "-", short) or "harken"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")


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
    problems += alarm_problems(cfg.alarm, "alarm")
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
            check(Path(m.password_file).is_file(), "mqtt.password_file", f"{clip(m.password_file)}: no such file")
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
        problems += s.problems(p, check_paths=check_paths)
        if s.alarm is not None:
            problems += alarm_problems(s.alarm, f"{p}.alarm")
        if s.kind == "mqtt" and cfg.mqtt is None:
            problems.append(f"{p}.kind: an mqtt source needs the top-level mqtt: section")
    problems += _output_path_problems(cfg)
    return problems


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
