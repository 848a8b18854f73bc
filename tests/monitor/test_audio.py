import numpy as np
import pytest
import soundfile as sf
import torch

from monitor.audio import LogMel, MelParams, load_audio, read_wav, split_windows, to_mono_16k, window_starts
from monitor.errors import AudioError


def sine(rate, seconds, freq=440.0, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def dominant_hz(x, rate=16000):
    spec = np.abs(np.fft.rfft(x))
    return np.argmax(spec) * rate / len(x)


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000])
def test_any_rate_becomes_16k_and_keeps_pitch(rate):
    mono = to_mono_16k(sine(rate, 2.0, 440.0), rate)
    assert mono.dtype == np.float32
    assert abs(len(mono) - 32000) <= 2
    assert abs(dominant_hz(mono) - 440.0) < 2.0


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_bit_depths_read_to_same_signal(tmp_path, subtype):
    x = sine(16000, 1.0)
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, x, 16000, subtype=subtype)
    y = load_audio(path)
    tol = 1e-4 if subtype == "PCM_16" else 1e-6
    assert np.max(np.abs(y - x[:, 0])) < tol


def test_multichannel_is_downmixed(tmp_path):
    left = sine(16000, 1.0, 300.0)[:, 0]
    stereo = np.stack([left, -left * 0.0 + 0.25], axis=1)
    path = tmp_path / "st.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    samples, rate = read_wav(path)
    assert samples.shape == (16000, 2) and rate == 16000
    assert np.allclose(load_audio(path), (left + 0.25) / 2, atol=1e-6)


def test_integer_arrays_are_scaled():
    x = np.array([[16384], [-32768]], dtype=np.int16)
    assert np.allclose(to_mono_16k(x, 16000), [0.5, -1.0])


def test_rejects_bad_rate_nan_and_empty():
    with pytest.raises(AudioError, match="96000 Hz"):
        to_mono_16k(np.zeros((100, 1), np.float32), 96000)
    bad = np.zeros(100, np.float32)
    bad[3] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        to_mono_16k(bad, 16000)
    with pytest.raises(AudioError):
        to_mono_16k(np.zeros((0, 1), np.float32), 16000)


def test_non_audio_and_missing_files_name_the_file(tmp_path):
    junk = tmp_path / "notes.wav"
    junk.write_text("this is not a wav file")
    with pytest.raises(AudioError, match="notes.wav"):
        read_wav(junk)
    with pytest.raises(AudioError, match="no such file"):
        read_wav(tmp_path / "missing.wav")


def test_truncated_wav_reads_what_is_there(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, sine(16000, 2.0), 16000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header still claims 2 s
    mono = load_audio(path)
    assert 0 < len(mono) < 32000


def test_short_clip_is_zero_padded_long_clip_is_windowed():
    short = np.ones(16000 * 3, np.float32)
    w = split_windows(short)
    assert w.shape == (1, 160000)
    assert w[0, :48000].min() == 1.0 and w[0, 48000:].max() == 0.0

    eleven = np.arange(16000 * 11, dtype=np.float32)
    w = split_windows(eleven)  # a DCASE 11-s clip: its first 10 s
    assert w.shape == (1, 160000) and w[0, 0] == 0

    long = np.arange(16000 * 25, dtype=np.float32)
    w = split_windows(long, hop_s=5.0)
    assert window_starts(len(long), hop_s=5.0) == [0, 80000, 160000, 240000]
    assert w.shape == (4, 160000)
    assert w[1, 0] == 80000 and w[3, -1] == 16000 * 25 - 1


def test_log_mel_has_seed_shape_and_is_batched():
    params = MelParams()
    assert (params.n_fft, params.hop_length, params.n_mels) == (512, 160, 128)
    x = torch.from_numpy(np.stack([sine(16000, 10.0)[:, 0], np.zeros(160000, np.float32)]))
    mel = LogMel(params)(x)
    assert mel.shape == (2, 128, 1001)
    # Batching does not change the result.
    alone = LogMel(params)(x[:1])
    assert torch.allclose(mel[:1], alone, atol=1e-5)
    # A 440 Hz tone puts its energy in the low bands, silence sits at the floor.
    assert mel[0].mean(dim=1).argmax() < 40
    assert torch.allclose(mel[1], torch.full_like(mel[1], np.log(1e-6)), atol=1e-3)
