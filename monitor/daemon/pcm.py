"""Pure decoding of MQTT audio payloads: raw PCM chunks and whole WAV clips.

Nothing here touches the network or keeps state, so it can be fuzzed. Every malformed payload
raises `PayloadError` with a short `reason` (the key of the source's `rejected` counters); no
other exception escapes.
"""

from __future__ import annotations

import io
import math
import struct

import numpy as np
import soundfile as sf

from monitor.audio import MAX_RATE_HZ, MIN_RATE_HZ
from monitor.errors import first_line

PCM_FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}
WAV_FORMATS = ("WAV", "WAVEX", "RF64")


class PayloadError(ValueError):
    """A message payload that cannot be used as audio; `reason` is a snake_case counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_pcm(payload: bytes, *, format: str, channels: int,
               select_channels: tuple[int, ...] | None = None,
               max_payload_bytes: int) -> np.ndarray:
    """Interleaved little-endian PCM -> (frames, selected channels) float32 in [-1, 1].

    `format`, `channels` and `select_channels` come from validated configuration; the payload is
    untrusted.
    """
    dtype = PCM_FORMATS[format]
    n = len(payload)
    if n == 0:
        raise PayloadError("empty", "empty payload")
    if n > max_payload_bytes:
        raise PayloadError("too_large", f"payload of {n} bytes exceeds {max_payload_bytes}")
    frame_bytes = dtype.itemsize * channels
    if n % dtype.itemsize:
        raise PayloadError("partial_sample",
                           f"{n} bytes is not a whole number of {format} samples")
    if n % frame_bytes:
        raise PayloadError("partial_frame",
                           f"{n} bytes is not a whole number of {channels}-channel frames")
    x = np.frombuffer(payload, dtype=dtype).reshape(-1, channels)
    if select_channels is not None:
        x = x[:, list(select_channels)]
    if dtype.kind == "i":
        return x.astype(np.float32) / np.float32(32768.0)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise PayloadError("non_finite", "payload contains NaN or infinite samples")
    return x


def decode_wav(payload: bytes, *, max_payload_bytes: int) -> tuple[np.ndarray, int]:
    """A whole WAV file's bytes -> ((frames, channels) float32, rate_hz)."""
    n = len(payload)
    if n == 0:
        raise PayloadError("empty", "empty payload")
    if n > max_payload_bytes:
        raise PayloadError("too_large", f"payload of {n} bytes exceeds {max_payload_bytes}")
    if payload[:4] not in (b"RIFF", b"RIFX", b"RF64"):
        raise PayloadError("not_wav", "payload is not a WAV file (no RIFF header)")
    try:
        with sf.SoundFile(io.BytesIO(payload)) as f:
            if f.format not in WAV_FORMATS:
                raise PayloadError("not_wav", f"payload is {f.format}, not WAV")
            rate_hz = int(f.samplerate)
            if not MIN_RATE_HZ <= rate_hz <= MAX_RATE_HZ:
                raise PayloadError("bad_rate", f"sample rate {rate_hz} Hz is outside "
                                   f"{MIN_RATE_HZ}-{MAX_RATE_HZ} Hz")
            samples = f.read(dtype="float32", always_2d=True)
    except PayloadError:
        raise
    # libsndfile reports a malformed header through several exception types.
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError, EOFError,
            OverflowError, MemoryError, struct.error) as exc:
        raise PayloadError("not_wav", f"payload is not a readable WAV file ({first_line(exc)})") from None
    if samples.shape[0] == 0:
        raise PayloadError("empty", "WAV payload contains no samples")
    if not np.isfinite(samples).all():
        raise PayloadError("non_finite", "WAV payload contains NaN or infinite samples")
    return samples, rate_hz


MAX_SEQ = 2**63 - 1  # a sender's 64-bit counter
# Capture times are epoch seconds: 1e300 would make a 300-digit alarm id and file name.
MAX_TS = 4_102_444_800.0  # 2100-01-01


def parse_user_properties(pairs) -> tuple[int | None, float | None]:
    """MQTT v5 user properties [(name, value), ...] -> (seq, ts); absent ones are None.

    seq: an integer in 0..2^63-1; ts: epoch seconds in 0..MAX_TS (year 2100)."""
    seq: int | None = None
    ts: float | None = None
    for name, value in pairs or ():
        if name == "seq":
            try:
                seq = int(value)
            except (TypeError, ValueError):
                raise PayloadError("bad_property", f"user property seq={str(value)[:40]!r} is not an "
                                   "integer") from None
            if not 0 <= seq <= MAX_SEQ:
                raise PayloadError("bad_property", f"user property seq={str(value)[:40]} is "
                                   "outside 0..2^63-1")
        elif name == "ts":
            try:
                ts = float(value)
            except (TypeError, ValueError):
                raise PayloadError("bad_property", f"user property ts={str(value)[:40]!r} is not a "
                                   "number") from None
            if not (math.isfinite(ts) and 0 <= ts <= MAX_TS):
                raise PayloadError("bad_property", f"user property ts={str(value)[:40]!r} is not a "
                                   "capture time (epoch seconds up to the year 2100)")
    return seq, ts
