"""The window message of the distributed roles (issue 17): one complete window as WAV bytes
(its sample rate and length: the window), its identity and settings in MQTT 5 user properties,
so a worker needs nothing else to score it and the alarm stage nothing else to judge it: `hop_s`
and `alarm`, the source's effective alarm settings (its `alarm:` override merged over the capture
box's) as one canonical JSON object. A message without `alarm` (an older capture box) means
"the alarm stage's own `alarm:` settings"."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from monitor.daemon.sections import AlarmConfig, alarm_problems


SAMPLE_RATE_HZ = 16000
MAX_WINDOW_S = 600.0
MAX_LABEL_CHARS = 300
MAX_ALARM_CHARS = 1000
# A model name is one directory under the worker's models directory: no separators, no "..".
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SOURCE_NAME = re.compile(r"^[^/#+\x00]{1,200}$")


class WireError(ValueError):
    """A window message that cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class WireWindow:
    source: str
    model: str
    seq: int  # per-source window counter of the capture box
    start_time_s: float  # wall-clock capture time of the first sample
    samples: np.ndarray  # (window samples,) float32, 16 kHz mono
    machine_id: int | None = None
    hop_s: float | None = None  # the source's hop: the alarm threshold depends on it
    label: str | None = None  # the file a folder source read it from
    alarm: AlarmConfig | None = None  # None: the alarm stage's own settings

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE_HZ

    @property
    def key(self) -> tuple[str, int]:
        """The window's identity: duplicates (redeliveries) share it."""
        return (self.source, self.seq)


def valid_model_name(name: str) -> bool:
    return bool(_MODEL_NAME.match(name)) and ".." not in name


@functools.lru_cache(maxsize=1024)
def alarm_to_json(alarm: AlarmConfig) -> str:
    """Canonical text: equal settings give equal text, so they share one resolved rule. Cached:
    every window of a source carries the same settings."""
    return json.dumps(dataclasses.asdict(alarm), sort_keys=True, separators=(",", ":"))


NULLABLE = ("threshold", "score_cap")  # the AlarmConfig numbers that may be null


@functools.lru_cache(maxsize=1024)
def alarm_from_json(text: str) -> AlarmConfig:
    """Raise WireError (one line) for settings a capture box's config loader would refuse.
    Cached (worker and alarm stage see the same few texts on every window and score); a
    refused text is not cached and is checked again."""
    if not isinstance(text, str) or len(text) > MAX_ALARM_CHARS:
        raise WireError(f"alarm settings must be a JSON object of at most {MAX_ALARM_CHARS} chars")
    try:
        data = json.loads(text)
    except ValueError:
        raise WireError(f"alarm settings are not JSON: {text[:60]!r}") from None
    if not isinstance(data, dict):
        raise WireError("alarm settings must be a JSON object")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(AlarmConfig)})
    if unknown:
        raise WireError(f"alarm settings: unknown key {unknown[0][:40]!r}")
    for key, value in data.items():
        if key == "rule":
            ok = isinstance(value, str)
        elif key in ("k", "n"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value)) or (key in NULLABLE and value is None)
        if not ok:
            raise WireError(f"alarm settings: bad {key} {str(value)[:40]!r}")
    alarm = AlarmConfig(**data)
    problems = alarm_problems(alarm, "alarm")
    if problems:
        raise WireError(f"alarm settings: {problems[0]}")
    return alarm


def encode(window: WireWindow) -> tuple[bytes, list[tuple[str, str]]]:
    """-> (payload, user properties) for one QoS 1 publish."""
    buf = io.BytesIO()
    sf.write(buf, np.asarray(window.samples, dtype=np.float32), SAMPLE_RATE_HZ,
             format="WAV", subtype="FLOAT")
    props = [("source", window.source), ("model", window.model), ("seq", str(window.seq)),
             ("window_start", repr(float(window.start_time_s)))]
    if window.machine_id is not None:
        props.append(("machine_id", str(int(window.machine_id))))
    if window.hop_s is not None:
        props.append(("hop_s", repr(float(window.hop_s))))
    if window.label is not None:
        props.append(("label", window.label[:MAX_LABEL_CHARS]))
    if window.alarm is not None:
        props.append(("alarm", alarm_to_json(window.alarm)))
    return buf.getvalue(), props


def decode(payload: bytes, props: list[tuple[str, str]]) -> WireWindow:
    """Raise WireError (one line) for anything a worker must skip."""
    p = dict(props or [])
    for key in ("source", "model", "seq", "window_start"):
        if key not in p:
            raise WireError(f"missing user property {key!r}")
    source, model = p["source"], p["model"]
    if not _SOURCE_NAME.match(source):
        raise WireError(f"bad source name {source[:60]!r}")
    if not valid_model_name(model):
        raise WireError(f"bad model name {model[:60]!r}")
    try:
        seq = int(p["seq"])
        start = float(p["window_start"])
        machine_id = int(p["machine_id"]) if "machine_id" in p else None
        hop_s = float(p["hop_s"]) if "hop_s" in p else None
    except ValueError as exc:
        raise WireError(f"bad number in user properties: {exc}") from None
    if seq < 0 or not math.isfinite(start):
        raise WireError(f"bad seq/window_start ({seq}, {start})")
    if hop_s is not None and not (math.isfinite(hop_s) and 0 < hop_s <= MAX_WINDOW_S):
        raise WireError(f"bad hop_s {hop_s}")
    alarm = alarm_from_json(p["alarm"]) if "alarm" in p else None
    try:
        samples, rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise WireError(f"payload is not a WAV: {str(exc)[:80]}") from None
    if rate != SAMPLE_RATE_HZ:
        raise WireError(f"sample rate must be {SAMPLE_RATE_HZ} Hz (got {rate})")
    if samples.ndim != 1 or len(samples) == 0 or len(samples) > MAX_WINDOW_S * SAMPLE_RATE_HZ:
        raise WireError(f"window must be mono, 1..{int(MAX_WINDOW_S)} s (got shape {samples.shape})")
    if not np.all(np.isfinite(samples)):
        raise WireError("samples are not finite")
    return WireWindow(source=source, model=model, seq=seq, start_time_s=start, samples=samples,
                      machine_id=machine_id, hop_s=hop_s, alarm=alarm,
                      label=p["label"][:MAX_LABEL_CHARS] if "label" in p else None)
