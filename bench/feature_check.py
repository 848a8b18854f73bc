"""Would an impulsiveness feature catch the quiet faults the default detector misses? (issue 13)

    python -m bench.feature_check --out bench-alarms --seed 1 [--hours 1] [--json]

The alarm benchmark's misses are rail damage and the bearing's outer race at severities
0.5-0.75 (README, "What it does not reach"): trains of short impacts whose energy lies 5-15 dB
below the healthy machine in every band. Condition monitoring's answers to such faults are
impulsiveness statistics, so this measures five on `train.alarm_bench`'s exact model, healthy
clips and fault clips (the fault part of each faulty stream), each scored by a per-ID diagonal
Gaussian of the 60 training clips per ID (sum of squared z, `DiagScorer`'s form):
- `kurtosis`: spectral kurtosis, log(E[P^2] / E[P]^2) of each mel band's power over the
  window's frames (STFT 256 / 64 samples: 16 ms / 4 ms), the classic detector of impacts;
- `envelope`: per 1-kHz band of a 4 ms / 1 ms STFT, the peak of the band power's envelope
  spectrum (Welch, 1-s segments) over its median in 5-490 Hz: bearings ring at a defect rate;
- `quantiles`: per 500-Hz band of the same STFT, the 90th and 99th percentiles of log power over
  the frames, less the median: impacts lift the upper quantiles, steady noise does not;
- `profile`: the whole envelope spectrum of the same 1-kHz bands, log power in 3.9-Hz bins over
  8-488 Hz (8 x 122 values), with only z > 0 counted: a line at any modulation rate the healthy
  machine does not make, where `envelope` keeps one peak-over-median number per band;
- `one-sided`: the stats encoder's level view with only z > 0 counted (louder than normal).
And `default+quantiles`, `default+envelope`, `default+profile`: the default model's score and
that candidate's, each standardised per ID on normal scores it did not train on (the daemon's
standardisation for the default, 5 folds of the training clips for the candidate), averaged 3:1
(the weight a fourth fusion member would get).

Prints, per fault type, the share of fault windows above the ID's highest healthy window (a
threshold near the window rate the one-a-week budget allows) at severities 0.5 / 0.625 / 0.75,
and the window AUC at 0.5.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from monitor.audio import SAMPLE_RATE_HZ

SEVERITIES = (0.5, 0.625, 0.75)
FOLDS = 5
FUSED_WEIGHT = 0.25  # one of four fusion members


def _power(waves: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(batch, samples) -> (batch, frames, n_fft // 2) power, DC dropped."""
    half = n_fft // 2
    padded = torch.nn.functional.pad(waves[:, None], (half, half), mode="reflect")[:, 0]
    frames = padded.unfold(1, n_fft, hop) * torch.hann_window(n_fft)
    spec = torch.fft.rfft(frames, dim=2)
    return (spec.real**2 + spec.imag**2)[:, :, 1:]


def _bands(power: torch.Tensor, bins: int) -> torch.Tensor:
    """(batch, frames, freq) -> (batch, frames, freq // bins): power summed over `bins` bins."""
    b, t, f = power.shape
    return power[:, :, :f // bins * bins].reshape(b, t, f // bins, bins).sum(dim=3)


def kurtosis(waves: torch.Tensor) -> torch.Tensor:
    power = _power(waves, 256, 64)  # (batch, frames, 128)
    fbank = torchaudio.functional.melscale_fbanks(129, 20.0, 8000.0, 32, SAMPLE_RATE_HZ,
                                                  norm="slaney", mel_scale="slaney")[1:]
    mel = power @ fbank  # (batch, frames, 32)
    return torch.log((mel**2).mean(dim=1) / mel.mean(dim=1).pow(2).clamp_min(1e-30))


def _envelope_psd(waves: torch.Tensor, seg: int) -> tuple[torch.Tensor, np.ndarray]:
    """Welch spectrum of each 1-kHz band's power envelope (4 ms / 1 ms STFT, `seg`-frame
    segments): (batch, 8 bands, seg // 2 + 1) and its modulation frequencies (Hz)."""
    hop = 16
    env = _bands(_power(waves, 64, hop), 4).transpose(1, 2)  # (batch, 8 bands, frames) at 1 kHz
    env = env / env.mean(dim=2, keepdim=True).clamp_min(1e-30)
    segs = env.unfold(2, seg, seg // 2)  # (batch, bands, segments, seg)
    segs = (segs - segs.mean(dim=3, keepdim=True)) * torch.hann_window(seg)
    psd = (torch.fft.rfft(segs, dim=3).abs() ** 2).mean(dim=2)
    return psd, np.fft.rfftfreq(seg, hop / SAMPLE_RATE_HZ)


def envelope(waves: torch.Tensor, seg: int = 1024) -> torch.Tensor:
    psd, freq = _envelope_psd(waves, seg)
    band = psd[:, :, torch.from_numpy((freq >= 5) & (freq <= 490))]
    return torch.log(band.amax(dim=2) / band.median(dim=2).values.clamp_min(1e-30))


def profile(waves: torch.Tensor, seg: int = 1024, width_hz: float = 4.0) -> torch.Tensor:
    psd, freq = _envelope_psd(waves, seg)
    psd = psd[:, :, torch.from_numpy((freq >= 8) & (freq < 488))]
    per_bin = int(round(width_hz / freq[1]))  # the strongest 0.98-Hz line in each 3.9-Hz bin
    b, bands, f = psd.shape
    psd = psd[:, :, :f // per_bin * per_bin].reshape(b, bands, f // per_bin, per_bin).amax(dim=3)
    return torch.log(psd.clamp_min(1e-30)).reshape(b, -1)


def quantiles(waves: torch.Tensor) -> torch.Tensor:
    logp = torch.log(_bands(_power(waves, 64, 16), 2) + 1e-12)  # (batch, frames, 16 bands)
    t = logp.shape[1]
    median = logp.kthvalue(t // 2, dim=1).values
    return torch.cat([logp.kthvalue(int(q * t), dim=1).values - median for q in (0.9, 0.99)], dim=1)


FEATURES = {"kurtosis": kurtosis, "envelope": envelope, "profile": profile, "quantiles": quantiles}
ONE_SIDED = ("level", "profile")  # scored on z > 0 only


class _Diag:
    """Per-ID mean and spread of training vectors; scores sum of squared (or positive) z."""

    def __init__(self, x: np.ndarray, ids: np.ndarray):
        self.stats = {m: (x[ids == m].mean(0), x[ids == m].std(0) + 1e-3 * x.std(0).mean() + 1e-9)
                      for m in np.unique(ids)}

    def z(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        out = np.zeros_like(x, dtype=np.float64)
        for m, (mu, sd) in self.stats.items():
            out[ids == m] = (x[ids == m] - mu) / sd
        return out

    def score(self, x: np.ndarray, ids: np.ndarray, one_sided: bool = False) -> np.ndarray:
        z = self.z(x, ids)
        return np.sqrt(((np.clip(z, 0, None) if one_sided else z) ** 2).sum(axis=1))


def out_of_fold(x: np.ndarray, ids: np.ndarray, one_sided: bool = False) -> np.ndarray:
    """Diagonal-Gaussian scores of the training vectors, each from a fit without its fold."""
    fold = np.arange(len(x)) % FOLDS
    out = np.zeros(len(x))
    for k in range(FOLDS):
        held = fold == k
        out[held] = _Diag(x[~held], ids[~held]).score(x[held], ids[held], one_sided)
    return out


def standardise(s: np.ndarray, ids: np.ndarray, ref: dict[int, tuple[float, float]]) -> np.ndarray:
    mean = np.array([ref[m][0] for m in ids])
    std = np.array([ref[m][1] for m in ids])
    return (s - mean) / std


def window_figures(healthy: np.ndarray, hid: np.ndarray, fault: np.ndarray, fid: np.ndarray,
                   ftype: np.ndarray, fsev: np.ndarray) -> dict:
    """Per fault type: share above the ID's highest healthy score per severity, AUC at 0.5."""
    from train.metrics import auc

    top = {m: healthy[hid == m].max() for m in np.unique(hid)}
    above = fault > np.array([top[m] for m in fid])
    out = {}
    for name in sorted(set(ftype)):
        row = {}
        for s in SEVERITIES:  # None where the type has no windows at that severity
            sel = (ftype == name) & (fsev == s)
            row[f"{s:g}"] = float(above[sel].mean()) if sel.any() else None
        low = (ftype == name) & (fsev == SEVERITIES[0])
        ref = np.isin(hid, np.unique(fid[low]))  # against the same IDs' healthy windows
        labels = np.r_[np.zeros(int(ref.sum())), np.ones(int(low.sum()))]
        row["auc_at_0.5"] = (float(auc(labels, np.r_[healthy[ref], fault[low]]))
                             if low.any() and ref.any() else None)
        out[name] = row
    return out


def fault_levels(seed: int) -> dict:
    """Per fault type and machine ID: the fault part's energy against the healthy part's in the
    500-Hz band where the fault is strongest (dB), in the first fault clip of the benchmark's
    stream at severity 0.5; for bearing_defect also the impacts' spacing at cruise speed (ms)."""
    from train.alarm_bench import IDS, LEAD_IN_CLIPS, SNR_DB
    from train.alarm_bench import SEVERITIES as STREAM_SEVERITIES
    from train.synth import FAULTS, MachineParams, clip_seed, render_components

    s_i = STREAM_SEVERITIES.index(SEVERITIES[0])
    out: dict = {}
    for mid in IDS:
        params = MachineParams.for_id(mid, seed)
        for f_i, fault in enumerate(FAULTS):
            rng = np.random.default_rng(clip_seed(seed, mid, "test_anomaly",
                                                  200_000 + (f_i * 10 + s_i) * 100 + LEAD_IN_CLIPS))
            parts = render_components(params, fault, SEVERITIES[0], rng=rng, snr_db=SNR_DB)
            healthy = np.abs(np.fft.rfft(parts.machine + parts.background)) ** 2
            faulty = np.abs(np.fft.rfft(parts.fault)) ** 2
            band = (np.fft.rfftfreq(len(parts.fault), 1 / SAMPLE_RATE_HZ) // 500).astype(int)
            ratio = np.bincount(band, faulty) / np.maximum(np.bincount(band, healthy), 1e-30)
            row = {"margin_db": round(float(10 * np.log10(max(ratio.max(), 1e-30))), 1)}
            if fault == "bearing_defect":
                row["impact_spacing_ms"] = round(1000 / (params.shaft_hz * params.bearing_order), 1)
            out.setdefault(fault, {})[f"{mid:02d}"] = row
    return out


def collect(out: Path, seed: int, hours: float, progress: bool):
    """The default model's scores and every candidate feature for the benchmark's clips."""
    from monitor.daemon.config import AlarmConfig
    from monitor.daemon.thresholds import resolve_for_detector
    from monitor.detector import Detector
    from monitor.encoders.stats import StatsEncoder
    from train.alarm_bench import LEAD_IN_CLIPS, build_model, fault_clips, healthy_clips

    data, model = build_model(out, seed, progress)
    det = Detector.load(model, device="cpu")
    stats = StatsEncoder().eval()
    level = slice(*stats.views["level"])

    def features(clips: list[np.ndarray]) -> dict[str, np.ndarray]:
        waves = torch.from_numpy(np.stack(clips)).float()
        with torch.inference_mode():
            got = {name: f(waves).numpy() for name, f in FEATURES.items()}
            got["level"] = stats(waves).vector[:, level].numpy()
        return got

    def gather(parts: list[dict]) -> dict[str, np.ndarray]:
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    with open(data / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    train = gather([features([sf.read(data / r["file"], dtype="float32")[0]]) for r in rows])
    train["id"] = np.array([int(r["machine_id"]) for r in rows])

    healthy_parts = []
    for mid, batches in healthy_clips(seed, hours, progress=progress):
        for batch in batches:
            part = features(batch)
            part["default"] = det.score_windows(np.stack(batch), [mid] * len(batch))
            part["id"] = np.full(len(batch), mid)
            healthy_parts.append(part)
    fault_parts = []
    for mid, fault, sev, clips in fault_clips(seed):
        clips = clips[LEAD_IN_CLIPS:]
        part = features(clips)
        part["default"] = det.score_windows(np.stack(clips), [mid] * len(clips))
        part.update(id=np.full(len(clips), mid), fault=np.array([fault] * len(clips)),
                    severity=np.full(len(clips), sev))
        fault_parts.append(part)
    standard = {}
    for mid in np.unique(train["id"]):
        r = resolve_for_detector(det, AlarmConfig(), hop_s=10.0, machine_id=int(mid))
        standard[int(mid)] = (r.mean, r.std)
    return train, gather(healthy_parts), gather(fault_parts), standard


def run(out: Path, *, seed: int, hours: float, progress: bool = True) -> dict:
    train, healthy, fault, standard = collect(out, seed, hours, progress)
    hid, fid = healthy["id"], fault["id"]
    scores = {"default": (healthy["default"], fault["default"])}
    for name in (*FEATURES, "level"):
        model = _Diag(train[name], train["id"])
        key = "one-sided" if name == "level" else name
        scores[key] = (model.score(healthy[name], hid, name in ONE_SIDED),
                       model.score(fault[name], fid, name in ONE_SIDED))
    for name in ("quantiles", "envelope", "profile"):
        oof = np.log(out_of_fold(train[name], train["id"], name in ONE_SIDED))
        ref = {int(m): (oof[train["id"] == m].mean(), oof[train["id"] == m].std())
               for m in np.unique(train["id"])}
        scores[f"default+{name}"] = tuple(
            (1 - FUSED_WEIGHT) * standardise(default, ids, standard)
            + FUSED_WEIGHT * standardise(np.log(own), ids, ref)
            for default, own, ids in ((healthy["default"], scores[name][0], hid),
                                      (fault["default"], scores[name][1], fid)))
    return {"seed": seed, "hours_per_id": hours, "healthy_windows": int(len(hid)),
            "fault_levels": fault_levels(seed),
            "candidates": {name: window_figures(h, hid, f, fid, fault["fault"], fault["severity"])
                           for name, (h, f) in scores.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.feature_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="working directory (train.alarm_bench's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hours", type=float, default=1.0, help="healthy hours per machine ID")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.hours <= 0:
        p.error(f"--hours must be > 0, got {args.hours}")
    result = run(Path(args.out), seed=args.seed, hours=args.hours, progress=not args.json)
    if args.json:
        print(json.dumps(result))
        return 0
    sevs = " / ".join(f"{s:g}" for s in SEVERITIES)
    print(f"seed {args.seed}: {result['healthy_windows']} healthy windows; share of fault windows "
          f"above the ID's highest healthy one at severity {sevs}, window AUC at 0.5")
    for name, per_fault in result["candidates"].items():
        cells = []
        for fault, row in per_fault.items():
            shares = " / ".join("-" if row[f"{s:g}"] is None else f"{row[f'{s:g}']:.2f}"
                                for s in SEVERITIES)
            area = "-" if row["auc_at_0.5"] is None else f"{row['auc_at_0.5']:.3f}"
            cells.append(f"{fault} {shares} (AUC {area})")
        print(f"  {name:18s} " + "; ".join(cells))
    print("  fault energy against the healthy machine's in the fault's strongest 500-Hz band at "
          "severity 0.5, per machine ID:")
    for fault, per_id in result["fault_levels"].items():
        cells = [f"{mid} {row['margin_db']:+.1f} dB" + (f" (impacts {row['impact_spacing_ms']:g} ms apart)"
                                                        if "impact_spacing_ms" in row else "")
                 for mid, row in per_id.items()]
        print(f"    {fault}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    from monitor.errors import run_script

    run_script(main, "python -m bench.feature_check")
