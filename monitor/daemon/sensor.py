"""Sensor faults: windows whose audio says more about the microphone than about the machine.

Per window: silence (RMS below `SILENCE_DBFS`, or every sample zero: a dead cable or muted
input), clipping (more than `CLIP_FRACTION` of the samples at |x| >= `CLIP_LEVEL`: gain too
high or a failing preamp) and DC offset (|mean| above `DC_OFFSET`: a biased or failing ADC).
`SensorFaultMonitor` turns these into episodes: one `sensor_fault` event when a kind starts
(detail.state "start") and one when it clears (detail.state "end"), never one per window.
Everything is NaN-safe and costs a few vector operations per window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from monitor.daemon.types import AlarmEvent, Window

SILENCE_DBFS = -70.0  # RMS of the window below this (dB re full scale) is silence
CLIP_LEVEL = 0.999  # a sample at or above this magnitude is clipped
CLIP_FRACTION = 0.001  # more than 0.1 % clipped samples in a window is a clipping fault
DC_OFFSET = 0.1  # |mean| of the window above this (full scale = 1) is a DC-offset fault
FAULT_KINDS = ("silence", "clipping", "dc_offset")


@dataclass(frozen=True)
class WindowLevels:
    rms_dbfs: float  # -inf for all-zero audio
    clipped_fraction: float
    dc_offset: float  # mean, signed


def measure(samples: np.ndarray) -> WindowLevels:
    """Levels of one window; non-finite samples count as clipped (never propagate NaN)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return WindowLevels(float("-inf"), 0.0, 0.0)
    finite = np.isfinite(x)
    bad = x.size - int(finite.sum())
    x = np.where(finite, x, 0.0)
    rms = float(np.sqrt(np.mean(x * x)))
    dbfs = 20.0 * np.log10(rms) if rms > 0 else float("-inf")
    clipped = (int(np.count_nonzero(np.abs(x) >= CLIP_LEVEL)) + bad) / x.size
    return WindowLevels(float(dbfs), clipped, float(np.mean(x)))


def window_faults(levels: WindowLevels) -> dict[str, tuple[float, float]]:
    """{kind: (measured value, limit)} for every fault present in the window."""
    out: dict[str, tuple[float, float]] = {}
    if levels.rms_dbfs < SILENCE_DBFS:
        out["silence"] = (levels.rms_dbfs, SILENCE_DBFS)
    if levels.clipped_fraction > CLIP_FRACTION:
        out["clipping"] = (levels.clipped_fraction, CLIP_FRACTION)
    if abs(levels.dc_offset) > DC_OFFSET:
        out["dc_offset"] = (levels.dc_offset, DC_OFFSET)
    return out


class SensorFaultMonitor:
    """Per source: fault episodes from consecutive windows (in capture order)."""

    def __init__(self, node: str, source: str):
        self.node = node
        self.source = source
        self.active: dict[str, str] = {}  # kind -> episode id
        self.episodes: dict[str, int] = {k: 0 for k in FAULT_KINDS}

    def update(self, window: Window) -> list[AlarmEvent]:
        found = window_faults(measure(window.samples))
        events = []
        for kind in FAULT_KINDS:
            if kind in found and kind not in self.active:
                self.active[kind] = f"{self.node}-{self.source}-{kind}-{int(window.start_time_s * 1000)}"
                self.episodes[kind] += 1
                events.append(self._event(kind, "start", 0, window, *found[kind]))
            elif kind not in found and kind in self.active:
                events.append(self._event(kind, "end", 1, window, None, None))
                del self.active[kind]
        return events

    def _event(self, kind: str, state: str, seq: int, window: Window, value: float | None,
               limit: float | None) -> AlarmEvent:
        # Non-finite numbers are not JSON: -inf dBFS (all zeros) travels as null.
        value_json = round(value, 6) if value is not None and np.isfinite(value) else None
        detail = {"kind": kind, "state": state, "value": value_json, "limit": limit,
                  "window_start": round(window.start_time_s, 3)}
        if window.label:
            detail["file"] = window.label
        return AlarmEvent(type="sensor_fault", id=self.active[kind], source=self.source,
                          ts=window.start_time_s if state == "start" else window.end_time_s,
                          peak_score=value_json if value_json is not None else 0.0,
                          threshold=limit if limit is not None else 0.0, seq=seq,
                          detail=detail)
