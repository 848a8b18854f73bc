"""Per-source ring buffer: audio blocks in, fixed-length overlapping windows out.

One preallocated float32 array of one window. Blocks of any size are copied in; each time it is
full a `Window` (a copy) is cut and the buffer slides by the hop. Window timestamps come from
the stream's anchor (the capture time of the first sample after the last reset) plus the sample
count, so they do not depend on how the audio was chunked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from monitor.audio import SAMPLE_RATE_HZ
from monitor.daemon.types import AudioBlock, Window


class RingBuffer:
    def __init__(self, source: str, *, window_s: float = 10.0, hop_s: float = 10.0,
                 rate_hz: int = SAMPLE_RATE_HZ, machine_id: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.source = source
        self.rate_hz = rate_hz
        self.window_samples = int(round(window_s * rate_hz))
        self.hop_samples = int(round(hop_s * rate_hz))
        if not 0 < self.hop_samples <= self.window_samples:
            raise ValueError(f"hop ({hop_s} s) must be > 0 and <= the window ({window_s} s)")
        self.window_s = self.window_samples / rate_hz
        self.machine_id = machine_id
        self._clock = clock
        self._buf = np.zeros(self.window_samples, dtype=np.float32)
        self._fill = 0
        self._anchor_time_s = 0.0  # capture time of the first sample since the last reset
        self._buf_offset = 0  # samples since the anchor at which _buf[0] was captured
        self._started = False
        self._lock = threading.Lock()  # a mic callback and a stats reader may meet here
        self.resets = 0
        self.samples_in = 0
        self.windows_out = 0
        self.last_audio_mono_s: float | None = None

    def reset(self) -> None:
        """Forget the partial window (a gap in the audio: nothing may span it)."""
        with self._lock:
            self._fill = 0
            self._started = False

    def push(self, block: AudioBlock) -> list[Window]:
        """Copy a block in; return the windows it completed (usually none or one)."""
        x = np.asarray(block.samples, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"{self.source}: expected 1-D 16 kHz mono samples, got shape {x.shape}")
        out: list[Window] = []
        with self._lock:
            if block.discontinuity and self._started:
                self._fill = 0
                self._started = False
                self.resets += 1
            if not self._started:
                self._anchor_time_s = block.start_time_s
                self._buf_offset = 0
                self._started = True
            self.samples_in += x.shape[0]
            self.last_audio_mono_s = self._clock()
            pos = 0
            while pos < x.shape[0]:
                take = min(self.window_samples - self._fill, x.shape[0] - pos)
                self._buf[self._fill:self._fill + take] = x[pos:pos + take]
                self._fill += take
                pos += take
                if self._fill == self.window_samples:
                    out.append(self._cut(block.label))
        return out

    def _cut(self, label: str | None) -> Window:
        start = self._anchor_time_s + self._buf_offset / self.rate_hz
        win = Window(source=self.source, samples=self._buf.copy(), start_time_s=start,
                     duration_s=self.window_s, ready_mono_s=self._clock(), label=label,
                     machine_id=self.machine_id)
        keep = self.window_samples - self.hop_samples
        self._buf[:keep] = self._buf[self.hop_samples:]
        self._fill = keep
        self._buf_offset += self.hop_samples
        self.windows_out += 1
        return win
