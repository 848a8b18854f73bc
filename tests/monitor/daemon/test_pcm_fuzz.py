"""Payload decoding against hostile bytes: only `PayloadError` ever escapes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.daemon import pcm

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wav_bytes(x: np.ndarray, rate: int = 16_000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@FUZZ
@given(payload=st.binary(max_size=600), fmt=st.sampled_from(["s16le", "f32le"]),
       channels=st.integers(1, 4), limit=st.integers(1, 700))
def test_decode_pcm_raises_only_payload_error(payload, fmt, channels, limit):
    try:
        x = pcm.decode_pcm(payload, format=fmt, channels=channels, max_payload_bytes=limit)
    except pcm.PayloadError as exc:
        assert exc.reason in {"empty", "too_large", "partial_sample", "partial_frame", "non_finite"}
        return
    assert x.dtype == np.float32 and x.shape[1] == channels
    assert np.isfinite(x).all() and np.abs(x).max(initial=0) <= 1.0 or fmt == "f32le"


VALID_WAV = wav_bytes(np.sin(np.arange(800) / 5.0).astype(np.float32) * 0.5)


@FUZZ
@given(data=st.data())
def test_decode_wav_raises_only_payload_error(data):
    choice = data.draw(st.sampled_from(["random", "mutated", "truncated"]))
    if choice == "random":
        payload = data.draw(st.binary(max_size=400))
        if data.draw(st.booleans()):
            payload = b"RIFF" + payload
    elif choice == "truncated":
        payload = VALID_WAV[: data.draw(st.integers(0, len(VALID_WAV)))]
    else:
        buf = bytearray(VALID_WAV)
        for _ in range(data.draw(st.integers(1, 8))):
            buf[data.draw(st.integers(0, 60))] = data.draw(st.integers(0, 255))
        payload = bytes(buf)
    try:
        x, rate = pcm.decode_wav(payload, max_payload_bytes=1_000_000)
    except pcm.PayloadError as exc:
        assert exc.reason in {"empty", "too_large", "not_wav", "bad_rate", "non_finite"}
        return
    assert x.ndim == 2 and x.shape[0] > 0 and np.isfinite(x).all()
    assert 8_000 <= rate <= 48_000


def test_pcm_decodes_interleaved_channels_and_selects():
    frames = np.array([[1000, -2000, 3000], [-4000, 5000, -6000]], dtype="<i2")
    x = pcm.decode_pcm(frames.tobytes(), format="s16le", channels=3, select_channels=(2, 0),
                       max_payload_bytes=100)
    np.testing.assert_allclose(x, frames[:, [2, 0]] / 32768.0)


@pytest.mark.parametrize("payload, kw, reason", [
    (b"\x00" * 5, dict(format="s16le", channels=1), "partial_sample"),
    (b"\x00" * 6, dict(format="s16le", channels=2), "partial_frame"),
    (np.array([0.0, np.nan], "<f4").tobytes(), dict(format="f32le", channels=1), "non_finite"),
    (np.array([np.inf, 0.0], "<f4").tobytes(), dict(format="f32le", channels=2), "non_finite"),
    (b"\x00" * 202, dict(format="s16le", channels=1), "too_large"),
    (b"", dict(format="s16le", channels=1), "empty"),
])
def test_pcm_rejections(payload, kw, reason):
    with pytest.raises(pcm.PayloadError) as info:
        pcm.decode_pcm(payload, max_payload_bytes=200, **kw)
    assert info.value.reason == reason


def test_wav_rejections():
    flac = io.BytesIO()
    sf.write(flac, np.zeros(100, np.float32), 16_000, format="FLAC")
    with pytest.raises(pcm.PayloadError, match="not a WAV") as info:
        pcm.decode_wav(flac.getvalue(), max_payload_bytes=10**6)
    assert info.value.reason == "not_wav"
    with pytest.raises(pcm.PayloadError) as info:
        pcm.decode_wav(wav_bytes(np.zeros(100, np.float32), rate=96_000), max_payload_bytes=10**6)
    assert info.value.reason == "bad_rate"
    nan = wav_bytes(np.array([0.0, np.nan, 0.1], np.float32), subtype="FLOAT")
    with pytest.raises(pcm.PayloadError) as info:
        pcm.decode_wav(nan, max_payload_bytes=10**6)
    assert info.value.reason == "non_finite"
    with pytest.raises(pcm.PayloadError) as info:
        pcm.decode_wav(VALID_WAV, max_payload_bytes=100)
    assert info.value.reason == "too_large"


def test_user_properties():
    assert pcm.parse_user_properties([("seq", "7"), ("ts", "1700000000.5"), ("x", "y")]) == (7, 1700000000.5)
    assert pcm.parse_user_properties(None) == (None, None)
    for bad in ([("seq", "x")], [("seq", "-1")], [("ts", "nan")], [("ts", "soon")]):
        with pytest.raises(pcm.PayloadError):
            pcm.parse_user_properties(bad)
