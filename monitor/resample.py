"""A streaming polyphase resampler: one per audio stream, carrying its filter state across
blocks, so a stream cut into 0.1-s blocks comes out exactly as the whole file would.

The filter is a Hann-windowed sinc low-pass (6 zero crossings, cut-off at 99 % of the lower
Nyquist frequency), the design torchaudio's default `resample` uses, so files (resampled whole,
`push` then `flush`) and live streams (`push` per block) share one filter and one result.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

LOWPASS_ZERO_CROSSINGS = 6
ROLLOFF = 0.99


@lru_cache(maxsize=16)
def polyphase_kernel(orig_hz: int, new_hz: int) -> tuple[np.ndarray, int, int, int]:
    """(kernel (new, taps) float64, width, orig, new) for the rate pair reduced by their gcd.

    Output sample p of each frame (p = 0..new-1) is the dot product of kernel[p] with `taps`
    input samples starting `width` samples before the frame's first input sample.
    """
    g = math.gcd(orig_hz, new_hz)
    orig, new = orig_hz // g, new_hz // g
    cutoff = min(orig, new) * ROLLOFF  # in cycles per `orig` input samples
    width = math.ceil(LOWPASS_ZERO_CROSSINGS * orig / cutoff)
    offsets = np.arange(-width, width + orig, dtype=np.float64) / orig  # input sample times
    phases = -np.arange(new, dtype=np.float64)[:, None] / new  # output sample times
    t = (phases + offsets[None, :]) * cutoff  # (new, taps), in units of the cut-off period
    t = np.clip(t, -LOWPASS_ZERO_CROSSINGS, LOWPASS_ZERO_CROSSINGS)
    window = np.cos(t * math.pi / LOWPASS_ZERO_CROSSINGS / 2) ** 2
    kernel = np.sinc(t) * window * (cutoff / orig)
    return kernel, width, orig, new


class StreamResampler:
    """`push(block)` returns the output samples the block completes; `flush()` the tail.

    Output is float32 and time-aligned with the input: output sample j is at time j / new_hz
    from the stream's first input sample. `lag_s` says how far the output lags the input.
    `reset()` starts a new stream (after a gap nothing may be filtered across it).
    """

    def __init__(self, orig_hz: int, new_hz: int):
        self.orig_hz, self.new_hz = int(orig_hz), int(new_hz)
        self.passthrough = self.orig_hz == self.new_hz
        if not self.passthrough:
            kernel, self._width, self._orig, self._new = polyphase_kernel(self.orig_hz, self.new_hz)
            self._kernel_t = np.ascontiguousarray(kernel.T)  # (taps, new)
            self._taps = kernel.shape[1]
        self.reset()

    def reset(self) -> None:
        width = 0 if self.passthrough else self._width
        self._buf = np.zeros(width, dtype=np.float64)  # the left zero padding, then input
        self.samples_in = 0
        self.samples_out = 0

    @property
    def lag_s(self) -> float:
        """Input time already pushed minus output time already returned."""
        return self.samples_in / self.orig_hz - self.samples_out / self.new_hz

    def push(self, block: np.ndarray) -> np.ndarray:
        x = np.asarray(block, dtype=np.float32).reshape(-1)
        self.samples_in += x.shape[0]
        if self.passthrough:
            self.samples_out += x.shape[0]
            return x.copy()
        self._buf = np.concatenate([self._buf, x.astype(np.float64)])
        return self._emit()

    def flush(self) -> np.ndarray:
        """The remaining output of a finite stream (as if zeros followed it), trimmed to
        ceil(samples_in * new / orig) samples in all."""
        if self.passthrough:
            return np.zeros(0, dtype=np.float32)
        self._buf = np.concatenate([self._buf, np.zeros(self._width + self._orig)])
        tail = self._emit()
        total = -(-self.samples_in * self._new // self._orig)  # ceil
        keep = max(0, total - (self.samples_out - tail.shape[0]))
        self.samples_out = self.samples_out - tail.shape[0] + min(keep, tail.shape[0])
        return tail[:keep]

    def _emit(self) -> np.ndarray:
        n = self._buf.shape[0]
        if n < self._taps:
            return np.zeros(0, dtype=np.float32)
        frames = (n - self._taps) // self._orig + 1
        view = np.lib.stride_tricks.sliding_window_view(self._buf, self._taps)[::self._orig][:frames]
        out = (view @ self._kernel_t).reshape(-1)  # (frames, new) -> frame-major samples
        self._buf = self._buf[frames * self._orig:].copy()
        self.samples_out += out.shape[0]
        return out.astype(np.float32)


def resample_whole(x: np.ndarray, orig_hz: int, new_hz: int) -> np.ndarray:
    """A finite signal at once: the same filter, and so the same samples, as a stream."""
    r = StreamResampler(orig_hz, new_hz)
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    step = 4 * r.orig_hz  # pushed in pieces: temporaries stay a few MB for any file length
    parts = [r.push(x[i:i + step]) for i in range(0, x.shape[0], step)]
    parts.append(r.flush())
    return np.concatenate(parts)
