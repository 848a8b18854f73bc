"""The impulsiveness candidates of bench/feature_check.py respond to what they are named for."""

from __future__ import annotations

import numpy as np
import torch

from bench.feature_check import (_Diag, envelope, kurtosis, out_of_fold, profile, quantiles,
                                 window_figures)

FS = 16000


def _noise(seconds: float = 10.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * FS)) * 0.05


def _clicks(n: int, every_s: float, centre_hz: float = 4000.0) -> np.ndarray:
    """A train of short 4-kHz bursts (1 ms each), one every `every_s` seconds."""
    out = np.zeros(n)
    t = np.arange(16) / FS
    burst = np.sin(2 * np.pi * centre_hz * t) * np.hanning(16)
    for at in np.arange(0.05, n / FS - 0.01, every_s):
        i = int(at * FS)
        out[i:i + 16] += burst
    return out


def _feature(f, *waves) -> np.ndarray:
    return f(torch.from_numpy(np.stack(waves)).float()).numpy()


def test_sparse_clicks_raise_kurtosis_and_upper_quantiles_in_their_band_only():
    noise = _noise()
    clicky = noise + 0.5 * _clicks(noise.size, 0.1)  # about 3 % of the short frames
    k = _feature(kurtosis, noise, clicky)
    q = _feature(quantiles, noise, clicky)
    assert k[1].max() - k[0].max() > 0.4  # some mel band turns impulsive
    # quantiles: 16 bands of 500 Hz, p90 then p99; the 4-kHz band is index 7 (3.5-4 kHz) or 8
    p99 = q[:, 16:]
    assert p99[1, 7:9].max() - p99[0, 7:9].max() > 1.5
    assert np.abs(p99[1, :4] - p99[0, :4]).max() < 0.5  # bands far below the clicks hardly move


def _beating_band(noise_seed: int, band_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(steady, modulated): broadband noise plus noise in the 4-5 kHz band, whose power beats
    at 120 Hz in `modulated`, like impacts at a bearing's rate."""
    noise = _noise(seed=noise_seed)
    t = np.arange(noise.size) / FS
    spec = np.fft.rfft(np.random.default_rng(band_seed).standard_normal(noise.size) * 0.05)
    f = np.fft.rfftfreq(noise.size, 1 / FS)
    spec[(f < 4000) | (f > 5000)] = 0
    band = np.fft.irfft(spec, noise.size)
    return noise + 3 * band, noise + 3 * band * (1 + 0.9 * np.sin(2 * np.pi * 120 * t))


def test_envelope_peaks_where_a_band_is_modulated_at_a_defect_rate():
    steady, modulated = _beating_band(1, 2)
    e = _feature(envelope, steady, modulated)
    assert e[1, 4] - e[0, 4] > 1.5  # the 4-5 kHz band's envelope spectrum has a peak
    assert np.abs(e[1, :3] - e[0, :3]).max() < 1.0


def test_profile_has_a_line_at_the_modulation_rate_in_the_modulated_band_only():
    steady, modulated = _beating_band(4, 3)
    p = _feature(profile, steady, modulated).reshape(2, 8, -1)  # 8 bands x 3.9-Hz bins
    grid = np.fft.rfftfreq(1024, 16 / FS)  # the envelope's 1-s segments at 1 kHz
    grid = grid[(grid >= 8) & (grid < 488)]
    assert p.shape[2] == grid.size // 4
    line = int(np.argmin(np.abs(grid - 120))) // 4
    rise = p[1] - p[0]
    assert rise[4, line] > 3.0  # the 4-5 kHz band, the 120-Hz bin
    assert np.median(np.abs(rise[4])) < 1.0  # the rest of that band's profile barely moves
    assert np.abs(rise[:3, line]).max() < 1.0  # bands far below it do not see the line


def test_diag_scores_count_only_louder_dimensions_when_one_sided():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((200, 3))
    ids = np.repeat([0, 1], 100)
    model = _Diag(train, ids)
    x = np.array([[3.0, 0.0, 0.0], [-3.0, 0.0, 0.0]])
    two = model.score(x, np.array([0, 0]))
    one = model.score(x, np.array([0, 0]), one_sided=True)
    assert abs(two[0] - two[1]) < 0.2 and two[0] > 2.5
    assert one[0] > 2.5 and one[1] < 0.5


def test_out_of_fold_scores_a_row_without_it_in_the_fit():
    x = np.zeros((10, 1))
    x[:, 0] = np.arange(10) % 2  # 0, 1, 0, 1, ...
    x[3, 0] = 50.0  # an outlier: in-sample it would inflate its own spread
    ids = np.zeros(10, dtype=int)
    oof = out_of_fold(x, ids)
    in_sample = _Diag(x, ids).score(x, ids)
    assert oof[3] > 5 * in_sample[3]


def test_window_figures_share_above_the_highest_healthy_window_and_auc():
    healthy = np.r_[np.arange(10.0), np.arange(10.0) + 100]  # ID 0 tops at 9, ID 1 at 109
    hid = np.r_[np.zeros(10, int), np.ones(10, int)]
    fault = np.array([10.0, 5.0, 110.0, 50.0, 20.0, 20.0])
    fid = np.array([0, 0, 1, 1, 0, 0])
    ftype = np.array(["a"] * 4 + ["b"] * 2)
    fsev = np.array([0.5, 0.5, 0.5, 0.5, 0.625, 0.75])
    out = window_figures(healthy, hid, fault, fid, ftype, fsev)
    assert out["a"]["0.5"] == 0.5  # 10 > 9 and 110 > 109; 5 and 50 are not above their ID's top
    assert out["a"]["0.625"] is None and out["b"]["0.5"] is None  # no windows there
    assert out["b"]["0.625"] == 1.0 and out["b"]["0.75"] == 1.0
    assert 0.5 < out["a"]["auc_at_0.5"] < 1.0 and out["b"]["auc_at_0.5"] is None
