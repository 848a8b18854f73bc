"""`stats`: harken's weight-free default front end. Per-band statistics of the log-mel
spectrogram at two time-frequency resolutions, summarising a whole window.

Why these: a one-class density model needs few, stable dimensions per machine ID (60 training
clips give 60 samples), and machine faults show up as changes in level, spread, peaks and
frame-to-frame roughness of some bands. Measured (closing note of issue 12): frame- and
segment-level Gaussians, modulation spectra and higher moments all scored below these five
statistics; the finer resolution helps impulsive faults (clicks, impacts).

The vector has two views of the same statistics, which the scorers pick by name (`views`):
- `level`: the statistics as they are, so a fault that makes a band louder counts;
- `shape`: the band means relative to the window's overall level, plus that level as one
  dimension. A full-covariance Gaussian is better conditioned there, because a gain change
  (microphone placement, recording level) moves one dimension instead of all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torchaudio
from torch import nn

from monitor.audio import SAMPLE_RATE_HZ
from monitor.encoders.base import Embedding

STATISTICS = ("mean", "std", "p90", "max", "roughness")

# The view a scorer named without `@view` reads: level-sensitive diagonal and kNN models; the
# full covariance sees both views (it scored above either alone on every development set).
DEFAULT_SCORER_VIEWS = {"diag": "level", "knn": "level", "mahalanobis": None}


@dataclass(frozen=True)
class Resolution:
    n_fft: int
    hop_length: int
    n_mels: int

    def to_json(self) -> dict:
        return asdict(self)


# 64 ms / 32 ms frames for the stationary sound, 32 ms / 16 ms for transients (16 ms / 8 ms
# scored the same and cost four times as much: small FFTs are slow per sample).
DEFAULT_RESOLUTIONS = (Resolution(1024, 512, 32), Resolution(512, 256, 32))


class BandStats(nn.Module):
    """(batch, samples) -> (batch, n_mels, frames) log-mel in dB at one resolution, and its
    per-band statistics."""

    def __init__(self, res: Resolution, f_min_hz: float = 20.0, f_max_hz: float = 8000.0):
        super().__init__()
        self.res = res
        self.register_buffer("window", torch.hann_window(res.n_fft), persistent=False)
        fb = torchaudio.functional.melscale_fbanks(res.n_fft // 2 + 1, f_min_hz, f_max_hz, res.n_mels,
                                                   SAMPLE_RATE_HZ, norm="slaney", mel_scale="slaney")
        self.register_buffer("fbank", fb, persistent=False)  # (freq bins, n_mels)

    def log_mel_db(self, waves: torch.Tensor) -> torch.Tensor:
        # A centred STFT (reflect padding) written as frames + rfft: torch.stft measured 3x slower
        # on one CPU thread for these sizes.
        half = self.res.n_fft // 2
        padded = nn.functional.pad(waves.float()[:, None], (half, half), mode="reflect")[:, 0]
        frames = padded.unfold(1, self.res.n_fft, self.res.hop_length) * self.window  # (b, t, n_fft)
        spec = torch.fft.rfft(frames, dim=2)
        power = spec.real**2 + spec.imag**2  # (batch, frames, freq)
        mel = power @ self.fbank  # (batch, frames, n_mels)
        return 10.0 * torch.log10(mel.transpose(1, 2) + 1e-10)  # (batch, n_mels, frames)

    def forward(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (level stats (batch, 5 * n_mels), overall level (batch,))."""
        db = self.log_mel_db(waves)
        mean = db.mean(dim=2)  # (batch, n_mels)
        # 90th percentile by selection, not a full sort (torch.quantile sorts: 5x slower here)
        k = min(db.shape[2], int(0.9 * (db.shape[2] - 1)) + 1)
        parts = [
            mean,
            db.std(dim=2),
            db.kthvalue(k, dim=2).values - mean,
            db.amax(dim=2) - mean,
            (db[:, :, 1:] - db[:, :, :-1]).abs().mean(dim=2),  # frame-to-frame roughness
        ]
        return torch.cat(parts, dim=1), mean.mean(dim=1)


class StatsEncoder(nn.Module):
    name = "stats"

    def __init__(self, resolutions: tuple[Resolution, ...] = DEFAULT_RESOLUTIONS):
        super().__init__()
        self.resolutions = tuple(resolutions)
        self.bands = nn.ModuleList(BandStats(r) for r in self.resolutions)
        n_level = sum(len(STATISTICS) * r.n_mels for r in self.resolutions)
        self.embedding_dim = 2 * n_level + len(self.resolutions)
        # Slices of the vector that scorers select by name (see the module docstring).
        self.views = {"level": [0, n_level], "shape": [n_level, self.embedding_dim]}

    def forward(self, waves: torch.Tensor) -> Embedding:
        # (batch, samples) -> (batch, embedding_dim); a log of low-precision power loses the floor
        with torch.autocast(waves.device.type, enabled=False):
            return self._encode(waves)

    def _encode(self, waves: torch.Tensor) -> Embedding:
        level, shape, overall = [], [], []
        for band in self.bands:
            stats, gain = band(waves.float())
            level.append(stats)
            n = band.res.n_mels
            # Means relative to the window's own level; the other statistics are gain-free.
            shape.append(torch.cat([stats[:, :n] - gain[:, None], stats[:, n:]], dim=1))
            overall.append(gain[:, None])
        return Embedding(vector=torch.cat(level + shape + overall, dim=1))

    def spec(self) -> dict:
        return {"name": self.name, "resolutions": [r.to_json() for r in self.resolutions],
                "statistics": list(STATISTICS), "views": self.views}


def build_stats(spec: dict, device: torch.device) -> StatsEncoder:
    res = tuple(Resolution(**r) for r in spec.get("resolutions", [r.to_json() for r in DEFAULT_RESOLUTIONS]))
    return StatsEncoder(res).to(device).eval()
