"""What travels between the daemon's stages, and the small interfaces between them.

Sources produce `AudioBlock`s (or whole `Window`s), ring buffers cut `Window`s, the inference
worker turns them into `Score`s, the alarm state machine emits `AlarmEvent`s, and publishers
(JSONL, MQTT) send them out. Times: `*_time_s` are wall-clock epoch seconds of the audio itself
(capture time of the first sample), `*_mono_s` are `time.monotonic()` readings for durations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class AudioBlock:
    """A chunk of one source's audio, already 16 kHz mono float32."""

    source: str
    samples: np.ndarray  # (frames,) float32, 16 kHz mono
    start_time_s: float  # wall-clock capture time of samples[0]
    # True when this block does not continue the previous one (seq gap, late chunk, device
    # restart, next file): the ring buffer drops what it holds so no window spans the gap.
    discontinuity: bool = False
    label: str | None = None  # e.g. the file a folder source read this block from


@dataclass(frozen=True)
class Window:
    """One window ready for scoring."""

    source: str
    samples: np.ndarray  # (window samples,) float32, 16 kHz mono
    start_time_s: float  # wall-clock capture time of the first sample
    duration_s: float
    ready_mono_s: float  # monotonic time the window became complete (latency measurements)
    label: str | None = None  # file name for folder sources
    machine_id: int | None = None

    @property
    def end_time_s(self) -> float:
        return self.start_time_s + self.duration_s


@dataclass(frozen=True)
class Score:
    source: str
    model: str
    score: float
    threshold: float
    window_start_s: float  # wall-clock
    window_end_s: float
    ready_mono_s: float  # when the window was complete, for window-end-to-publish latency
    scored_time_s: float  # wall-clock when the score was computed
    label: str | None = None

    @property
    def anomaly(self) -> bool:
        return self.score > self.threshold

    def to_json(self) -> dict:
        """The payload of `<prefix>/<node>/<source>/score` and of the JSONL sink."""
        out = {"ts": round(self.scored_time_s, 3), "source": self.source,
               "window_start": round(self.window_start_s, 3),
               "window_end": round(self.window_end_s, 3), "score": self.score,
               "threshold": self.threshold, "model": self.model, "anomaly": self.anomaly}
        if self.label is not None:
            out["file"] = self.label
        return out


@dataclass(frozen=True)
class AlarmEvent:
    """`start` when an alarm turns on, `update` on a new peak while on, `end` when it clears."""

    type: str  # "start" | "update" | "end" | "sensor_fault"
    id: str  # stable per alarm: consumers de-duplicate on (id, type, seq)
    source: str
    ts: float  # wall-clock of the window that caused it
    peak_score: float
    threshold: float
    seq: int = 0  # per-alarm counter of events, for de-duplication of updates
    clip: str | None = None  # evidence WAV path, when saved
    image: str | None = None  # evidence PNG path, when saved
    detail: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"type": self.type, "id": self.id, "source": self.source, "ts": round(self.ts, 3),
               "peak_score": self.peak_score, "threshold": self.threshold, "seq": self.seq,
               "clip": self.clip, "image": self.image}
        if self.detail:
            out["detail"] = self.detail
        return out


class ScoringModel(Protocol):
    """What the daemon calls on a model (monitor/detector.py's Detector; test doubles too)."""

    name: str
    window_s: float

    def score_windows(self, windows: np.ndarray, machine_ids) -> np.ndarray:
        """(batch, samples) 16 kHz windows -> (batch,) anomaly scores."""
        ...

    def threshold_for(self, machine_id: int | None) -> float:
        ...

    def log_mel(self, window: np.ndarray) -> np.ndarray:
        """(samples,) -> (n_mels, frames), for evidence images."""
        ...

    def error_map(self, window: np.ndarray, machine_id: int | None = None) -> np.ndarray | None:
        """The reconstruction error over the log-mel image; None for models that do not
        reconstruct one."""
        ...


class Publisher(Protocol):
    """A sink for everything the daemon reports (JSONL file, MQTT broker). Calls must not
    block for long: they are made from the inference worker's thread."""

    def start(self) -> None: ...

    def publish_score(self, score: Score) -> None: ...

    def publish_alarm_state(self, source: str, on: bool) -> None: ...

    def publish_event(self, event: AlarmEvent) -> None: ...

    def publish_source_state(self, source: str, state: str) -> None:
        """state: "running" | "stalled" | "ended"."""
        ...

    def publish_stats(self, stats: dict) -> None: ...

    def status(self) -> dict:
        """The sink's own counters for the stats message ({} when it keeps none)."""
        ...

    def stop(self) -> None:
        """Clean exit: publish `stopped`, flush what is queued, disconnect."""
        ...


BlockSink = Callable[[AudioBlock], None]  # where a source hands its audio (the ring buffer)
WindowSink = Callable[[Window], None]  # where whole-clip sources hand windows (inference queue)


class Source(Protocol):
    """A producer of audio for one `source` id. `start` returns at once (threads or callbacks
    do the work); the source calls `on_block` (streams) or `on_window` (whole clips)."""

    id: str

    def start(self, on_block: BlockSink, on_window: WindowSink) -> None: ...

    def stop(self) -> None: ...

    @property
    def finished(self) -> bool:
        """True once a finite source (a folder with watch: false) has delivered everything."""
        ...

    def status(self) -> dict:
        """Counters and state for stats/metrics, e.g. {"state": "running", "blocks": 12}."""
        ...
