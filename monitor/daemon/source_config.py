"""Sources in the daemon config: one frozen dataclass per kind (folder, mic, mqtt), chosen by
`kind`, each limit declared on its field and the cross-field rules in the class's `problems`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from monitor.audio import MAX_RATE_HZ, MIN_RATE_HZ
from monitor.configload import clip, from_mapping, limit_problems, limited
from monitor.daemon.pcm import PCM_FORMATS
from monitor.daemon.sections import AlarmConfig
from monitor.yamlsafe import short_repr

SOURCE_ID = re.compile(r"^[A-Za-z0-9_-]+$")
SPEEDS = ("max", "realtime")
AUDIO_FORMATS = tuple(PCM_FORMATS)
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


@dataclass(frozen=True)
class SourceConfig:
    """What every source kind has. `SourceConfig(kind=..., ...)` builds the class of that kind,
    so code and tests that build a source by keywords need not name the class."""

    id: str  # topic-safe: [A-Za-z0-9_-]
    kind: str  # folder | mic | mqtt
    model: str  # artifact directory
    window_s: float = limited(10.0, gt=0)
    hop_s: float = 10.0  # > 0 and <= window_s: checked in problems()
    alarm: AlarmConfig | None = None  # overrides the daemon-wide alarm settings
    machine_id: int | None = None  # for models with per-machine-ID statistics
    # folder, benchmarks: realtime pacing sped up by this factor (1.0: real time)
    time_scale: float = limited(1.0, gt=0)
    # enrolment (monitor/enrolment.py): learn the model's scorers from this much audio
    # ("2h", "30m", "90s" or seconds), then arm; None: armed from the start
    learn_for: float | str | None = None

    def __new__(cls, *args, **kwargs):
        if cls is SourceConfig:  # an unknown kind stays a plain SourceConfig; validate names it
            kind = kwargs.get("kind")
            cls = SOURCE_CLASSES.get(kind, SourceConfig) if isinstance(kind, str) else SourceConfig
        return super().__new__(cls)

    @classmethod
    def from_yaml(cls, data: object, path: str, problems: list[str]) -> SourceConfig | None:
        """The class named by `kind`; a key of another kind is refused naming the kind taking it."""
        if not isinstance(data, dict):
            return from_mapping(SourceConfig, data, path, problems)
        kind = data.get("kind")
        chosen = SOURCE_CLASSES.get(kind, SourceConfig) if isinstance(kind, str) else SourceConfig
        own = {f.name for f in fields(chosen)}
        kept = {}
        for key, value in data.items():
            takers = [kind for kind, c in SOURCE_CLASSES.items() if key in {f.name for f in fields(c)}]
            if key in own or not takers:
                kept[key] = value  # unknown keys: from_mapping lists the known ones
            elif chosen is not SourceConfig:
                problems.append(f"{path}.{key}: only {_kinds_phrase(takers)} source takes this key")
        return from_mapping(chosen, kept, path, problems)

    def problems(self, path: str, **_) -> list[str]:
        """Value checks of this source alone (ids across sources: monitor/daemon/config.py)."""
        out = limit_problems(self, path)
        if self.hop_s <= 0:
            out.append(f"{path}.hop_s: must be > 0, got {self.hop_s}")
        elif self.hop_s > self.window_s:
            out.append(f"{path}.hop_s: must be <= window_s (got {self.hop_s} > {self.window_s})")
        if self.learn_for is not None:
            out += _learn_for_problems(self, f"{path}.learn_for")
        return out


@dataclass(frozen=True)
class FolderSourceConfig(SourceConfig):
    path: str | None = None  # required; a directory where the daemon runs (checked with models)
    speed: str = limited("max", choices=SPEEDS)
    watch: bool = False  # keep waiting for new files
    poll_s: float = limited(1.0, gt=0)

    def problems(self, path: str, *, check_paths: bool = True) -> list[str]:
        out = super().problems(path)
        if self.path is None:
            out.append(f"{path}.path: required for a folder source")
        elif check_paths and not Path(self.path).is_dir():
            # --no-models: checked where the daemon runs, like the model paths
            out.append(f"{path}.path: {clip(self.path)}: no such directory")
        return out


@dataclass(frozen=True)
class _StreamSourceConfig(SourceConfig):
    """Live audio: a sample rate and channels to mix down."""

    rate_hz: int | None = limited(None, within=(MIN_RATE_HZ, MAX_RATE_HZ))  # None: the kind's default
    channels: int = limited(1, ge=1)  # in the stream (mic: opened; mqtt: interleaved in payloads)
    select_channels: tuple[int, ...] | None = None  # which channels to mix down; None: all

    def problems(self, path: str, **_) -> list[str]:
        out = super().problems(path)
        if self.select_channels is not None:
            bad = [c for c in self.select_channels if not 0 <= c < self.channels]
            if bad or not self.select_channels:
                out.append(f"{path}.select_channels: channel numbers must be in 0..{self.channels - 1} "
                           f"(channels: {self.channels}), got {short_repr(list(self.select_channels))}")
        return out


@dataclass(frozen=True)
class MicSourceConfig(_StreamSourceConfig):
    device: str | int | None = None  # sounddevice name (substring) or index; None: default input


@dataclass(frozen=True)
class MqttSourceConfig(_StreamSourceConfig):
    topic: str | None = None  # the audio topic (no wildcards); required
    format: str = limited("s16le", choices=AUDIO_FORMATS)
    mode: str = limited("stream", choices=MQTT_MODES)  # stream: raw PCM chunks; window: WAV clips
    max_payload_bytes: int = limited(4_000_000, ge=1)

    def problems(self, path: str, **_) -> list[str]:
        out = super().problems(path)
        if not self.topic:
            out.append(f"{path}.topic: required for an mqtt source")
        elif set("+#") & set(self.topic):
            out.append(f"{path}.topic: must not contain MQTT wildcards, got {short_repr(self.topic)}")
        else:
            out += _topic_problems(self.topic, f"{path}.topic", prefix=False)
        return out


# kind -> class: the registry `kind` chooses from
SOURCE_CLASSES: dict[str, type[SourceConfig]] = {
    "folder": FolderSourceConfig, "mic": MicSourceConfig, "mqtt": MqttSourceConfig}
SOURCE_KINDS = tuple(SOURCE_CLASSES)


def _kinds_phrase(kinds: list[str]) -> str:
    """["folder"] -> "a folder"; ["mic", "mqtt"] -> "a mic or mqtt"."""
    article = "an" if kinds[0][0] in "aeiou" or kinds[0] == "mqtt" else "a"
    return f"{article} {' or '.join(kinds)}"


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
