"""The one audio front end shared by training, evaluation, replay and the daemon.

Everything here is a function of arrays (or, for `read_wav`, of a file's bytes turned into an
array) so a live stream and a folder of WAV files go through exactly the same code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from monitor.errors import AudioError, first_line
from monitor.resample import resample_whole

SAMPLE_RATE_HZ = 16_000
WINDOW_S = 10.0
MIN_RATE_HZ = 8_000
MAX_RATE_HZ = 48_000
MIN_HOP_S = 0.01  # 160 samples; smaller hops only multiply work
# Float audio is nominally within [-1, 1]; beyond 80 dB over full scale it is not audio but
# garbage (x 1e30 overflows the mel power to infinity and every score is NaN).
MAX_ABS_SAMPLE = 1e4


@dataclass(frozen=True)
class MelParams:
    """Log-mel settings of the seed study (16 kHz, window 512, hop 160, 128 bands)."""

    sample_rate_hz: int = SAMPLE_RATE_HZ
    n_fft: int = 512
    hop_length: int = 160
    n_mels: int = 128
    f_min_hz: float = 0.0
    f_max_hz: float | None = None
    log_floor: float = 1e-6

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read any WAV/FLAC soundfile can decode; returns (frames, channels) float32 and the rate.

    Raises AudioError naming the file for anything that is not usable audio.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        samples, rate_hz = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as exc:
        raise AudioError(f"{path}: not a readable audio file ({first_line(exc)})") from None
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: contains no audio samples")
    return samples, int(rate_hz)


def to_mono_16k(samples: np.ndarray, rate_hz: int, *, source: str = "audio") -> np.ndarray:
    """Any rate in 8-48 kHz, any channel count -> 16 kHz mono float32 (1-D).

    `samples` is (frames,) or (frames, channels), float or integer PCM.
    """
    x = np.asarray(samples)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise AudioError(f"{source}: expected (frames, channels) audio, got shape {x.shape}")
    if not MIN_RATE_HZ <= rate_hz <= MAX_RATE_HZ:
        raise AudioError(
            f"{source}: sample rate {rate_hz} Hz is outside the supported "
            f"{MIN_RATE_HZ}-{MAX_RATE_HZ} Hz"
        )
    if np.issubdtype(x.dtype, np.integer):
        scale = float(2 ** (8 * x.dtype.itemsize - 1))
        x = x.astype(np.float32) / scale
    x = x.astype(np.float32, copy=False)
    _check_samples(x, source)
    mono = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if rate_hz != SAMPLE_RATE_HZ:
        # The same polyphase filter live streams use (one StreamResampler per source), so a
        # file and the same audio arriving in blocks give the same samples.
        mono = resample_whole(mono, rate_hz, SAMPLE_RATE_HZ)
    return np.ascontiguousarray(mono, dtype=np.float32)


def to_mono(samples: np.ndarray, *, source: str = "audio",
            select_channels: tuple[int, ...] | None = None) -> np.ndarray:
    """(frames,) or (frames, channels) float or integer PCM -> (frames,) float32 mono, checked
    finite; no resampling (a stream's own StreamResampler does that)."""
    x = np.asarray(samples)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise AudioError(f"{source}: expected (frames, channels) audio, got shape {x.shape}")
    if select_channels:
        x = x[:, list(select_channels)]
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
    x = x.astype(np.float32, copy=False)
    _check_samples(x, source)
    return np.ascontiguousarray(x.mean(axis=1) if x.shape[1] > 1 else x[:, 0], dtype=np.float32)


def _check_samples(x: np.ndarray, source: str) -> None:
    if not np.isfinite(x).all():
        raise AudioError(f"{source}: contains NaN or infinite samples")
    peak = float(np.max(np.abs(x), initial=0.0))
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(f"{source}: samples up to {peak:.3g}, far outside [-1, 1]; not audio "
                         f"(or scaled wrongly)")


def load_audio(path: str | Path) -> np.ndarray:
    """Read a file and return it as 16 kHz mono float32."""
    samples, rate_hz = read_wav(path)
    return to_mono_16k(samples, rate_hz, source=str(path))


def window_starts(n_samples: int, window_s: float = WINDOW_S, hop_s: float | None = None,
                  rate_hz: int = SAMPLE_RATE_HZ) -> list[int]:
    """Start offsets of the windows `split_windows` returns for a clip of n_samples."""
    win = int(round(window_s * rate_hz))
    hop = int(round((hop_s or window_s) * rate_hz))
    if hop < 1 or win < 1:
        raise ValueError(f"window ({window_s} s) and hop ({hop_s} s) must be at least one sample")
    if n_samples <= win:
        return [0]
    starts = list(range(0, n_samples - win + 1, hop))
    # A tail longer than half a window is scored too rather than silently ignored.
    if n_samples - (starts[-1] + win) > win // 2:
        starts.append(n_samples - win)
    return starts


def iter_windows(mono: np.ndarray, window_s: float = WINDOW_S, hop_s: float | None = None,
                 rate_hz: int = SAMPLE_RATE_HZ):
    """(start, window) pairs, the same windows as `split_windows`, one at a time (views into
    `mono`, padded copies for short clips): memory stays one window whatever the hop."""
    win = int(round(window_s * rate_hz))
    if mono.shape[0] < win:
        yield 0, split_windows(mono, window_s, hop_s, rate_hz)[0]
        return
    for start in window_starts(mono.shape[0], window_s, hop_s, rate_hz):
        yield start, mono[start:start + win]


def split_windows(mono: np.ndarray, window_s: float = WINDOW_S, hop_s: float | None = None,
                  rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """Cut a 1-D clip into (n_windows, window samples): zero-pad short clips, window long ones.

    A clip of up to one window plus half a window is cropped to its first window, matching how
    DCASE clips of 10-11 s are used.
    """
    win = int(round(window_s * rate_hz))
    if mono.shape[0] < win:
        out = np.zeros((1, win), dtype=np.float32)
        out[0, : mono.shape[0]] = mono
        return out
    starts = window_starts(mono.shape[0], window_s, hop_s, rate_hz)
    idx = np.asarray(starts)[:, None] + np.arange(win)[None, :]
    return mono[idx].astype(np.float32, copy=False)


class LogMel(torch.nn.Module):
    """(batch, samples) 16 kHz float -> (batch, n_mels, frames) natural-log mel power."""

    def __init__(self, params: MelParams = MelParams()):
        super().__init__()
        self.params = params
        with warnings.catch_warnings():
            # The seed's 128 bands over a 512-point FFT leave a few low bands empty; expected.
            warnings.filterwarnings("ignore", message="At least one mel filterbank")
            self.mel = self._build(params)

    @staticmethod
    def _build(params: MelParams) -> torch.nn.Module:
        return torchaudio.transforms.MelSpectrogram(
            sample_rate=params.sample_rate_hz,
            n_fft=params.n_fft,
            hop_length=params.hop_length,
            n_mels=params.n_mels,
            f_min=params.f_min_hz,
            f_max=params.f_max_hz,
            power=2.0,
        )

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        # (batch, samples) -> (batch, n_mels, frames)
        return torch.log(self.mel(waves) + self.params.log_floor)


def expected_frames(n_samples: int, hop_length: int) -> int:
    """Frames torchaudio's centred STFT returns for n_samples."""
    return 1 + n_samples // hop_length
