"""Calibrated normal-score tails and false-alarm budgets.

At train time every training window is scored out of fold (`train/fit.py`); those honest normal
scores and a generalised-Pareto (GPD) fit of their upper tail are stored in the artifact. Here
they become a score distribution (`ScoreTail`: empirical below the tail threshold u, GPD above
it); monitor/rulesim.py turns a tail, through a simulation of the alarm rule, into an expected
number of false alarms per day for any threshold, and the threshold that meets a budget.

numpy only: the daemon uses this at start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from monitor.errors import ArtifactError

if TYPE_CHECKING:
    from monitor.manifest import Manifest

SECONDS_PER_DAY = 86_400.0
TAIL_QUANTILE = 0.9  # the GPD models scores above this quantile of the normal scores
MIN_SCORES = 20  # fewer out-of-fold scores: no calibration (the stored threshold is used)
MIN_PER_ID_TAIL = 200  # an ID with fewer scores uses the tail of all IDs' scores together
MIN_GPD_EXCEEDANCES = 10  # fewer: an exponential tail (GPD with shape 0) instead
XI_RANGE = (-0.5, 0.5)  # probability-weighted moments are valid for shape < 0.5


# --------------------------------------------------------------------------- the tail


def fit_gpd_pwm(excess: np.ndarray) -> tuple[float, float]:
    """(shape xi, scale sigma) of a GPD fitted to positive excesses by probability-weighted
    moments (Hosking & Wallis 1987); xi is clamped to XI_RANGE.

    The shape is not shrunk toward the exponential tail: fused detector scores of healthy
    synthetic slide rails have a heavy tail (xi 0.27 from 1,800 unseen clips of a seed-2 model,
    0.24 from its 180 out-of-fold scores), and shrinking it put the one-a-week threshold below
    the true one in 93 % of 180-score subsamples (72 % unshrunk). Small samples already
    extrapolate low; this is not the place to lower them further.

    Nor is a predictive tail (the mean of parametric-bootstrap refits, tried 2026-12-04) the
    answer: it left the default k-of-n threshold within 1.5 % of this one on seeds 0 and 2 of
    `train.alarm_bench` (seed 2 saw 3 false alarms in 18 h with it, window FPR 1.8 %: its
    out-of-fold scores sit below unseen healthy ones, a bias, not sampling error), and its
    heavier far tail raised the EWMA / CUSUM thresholds by 45 % so far that on seed 0 they
    caught 0 and 8 % of the faulty streams within 60 s."""
    y = np.sort(np.asarray(excess, dtype=float))
    n = len(y)
    a0 = float(y.mean())
    # a1 = E[Y (1 - F(Y))], unbiased estimate from the order statistics
    a1 = float(np.sum((n - np.arange(1, n + 1)) / (n - 1) * y) / n)
    denom = a0 - 2.0 * a1
    if not (a0 > 0 and denom > 0):
        return 0.0, max(a0, 1e-12)  # degenerate: exponential with the mean excess
    k = a0 / denom - 2.0  # Hosking's k = -xi
    xi = float(np.clip(-k, *XI_RANGE))
    # the scale that keeps the mean excess right for the (possibly clamped) shape
    sigma = a0 * (1.0 - xi)
    return xi, max(sigma, 1e-12)


@dataclass(frozen=True)
class ScoreTail:
    """The distribution of a model's normal scores: empirical up to u, GPD above."""

    scores: np.ndarray  # sorted out-of-fold normal scores
    quantile: float  # u is this quantile of `scores`
    u: float
    xi: float
    sigma: float
    method: str  # gpd | exponential

    @classmethod
    def fit(cls, scores, quantile: float = TAIL_QUANTILE) -> ScoreTail:
        s = np.sort(np.asarray(scores, dtype=float))
        s = s[np.isfinite(s)]
        if len(s) < MIN_SCORES:
            raise ValueError(f"need at least {MIN_SCORES} normal scores for a tail, got {len(s)}")
        u = float(np.quantile(s, quantile))
        excess = s[s > u] - u
        if len(excess) >= MIN_GPD_EXCEEDANCES:
            xi, sigma = fit_gpd_pwm(excess)
            method = "gpd"
        else:
            xi, sigma, method = 0.0, max(float(excess.mean()) if len(excess) else 0.0,
                                         float(s.std()) * 0.1, 1e-12), "exponential"
        return cls(s, float(quantile), u, xi, sigma, method)

    @property
    def n_scores(self) -> int:
        return int(len(self.scores))

    @property
    def n_exceed(self) -> int:
        return int(np.sum(self.scores > self.u))

    @property
    def mean(self) -> float:
        return float(self.scores.mean())

    @property
    def std(self) -> float:
        return float(max(self.scores.std(), 1e-12))

    def _gpd_sf(self, y: np.ndarray) -> np.ndarray:
        y = np.maximum(y, 0.0) / self.sigma
        if abs(self.xi) < 1e-9:
            return np.exp(-y)
        base = np.maximum(1.0 + self.xi * y, 0.0)
        with np.errstate(divide="ignore"):
            return np.where(base > 0, base ** (-1.0 / self.xi), 0.0)

    def sf(self, x) -> np.ndarray:
        """P(score > x) for a normal window."""
        x = np.asarray(x, dtype=float)
        p_u = 1.0 - self.quantile
        below = 1.0 - np.searchsorted(self.scores, x, side="right") / self.n_scores
        return np.where(x > self.u, p_u * self._gpd_sf(x - self.u), np.maximum(below, p_u))

    def isf(self, p) -> np.ndarray:
        """The score level that a normal window exceeds with probability p."""
        p = np.clip(np.asarray(p, dtype=float), 1e-300, 1.0)
        p_u = 1.0 - self.quantile
        r = np.minimum(p / p_u, 1.0)
        if abs(self.xi) < 1e-9:
            tail = self.u + self.sigma * -np.log(r)
        else:
            tail = self.u + self.sigma / self.xi * (r ** (-self.xi) - 1.0)
        body = np.quantile(self.scores, np.clip(1.0 - p, 0.0, 1.0))
        return np.where(p < p_u, tail, body)

    def to_json(self) -> dict:
        return {"method": self.method, "n_scores": self.n_scores, "n_exceed": self.n_exceed,
                "quantile": self.quantile, "u": self.u, "xi": self.xi, "sigma": self.sigma,
                "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class Calibration:
    """A model's calibrated tails: pooled (windows of unknown machine ID) and per machine ID."""

    pooled: ScoreTail  # windows scored without a machine ID (the pooled banks)
    per_id: Mapping[int, ScoreTail]  # IDs with MIN_PER_ID_TAIL scores or more
    folds: int
    hop_s: float
    # every ID's windows scored with their ID (per-ID banks and fusion statistics put them on
    # one scale), for IDs too small for their own tail
    known_id: ScoreTail | None = None

    def tail_for(self, machine_id: int | None) -> ScoreTail:
        if machine_id is not None and int(machine_id) in self.per_id:
            return self.per_id[int(machine_id)]
        if machine_id is not None and self.known_id is not None:
            return self.known_id
        return self.pooled

    def tail_name(self, machine_id: int | None) -> str:
        if machine_id is not None and int(machine_id) in self.per_id:
            return f"machine id {int(machine_id):02d}"
        if machine_id is not None and self.known_id is not None:
            return "all machine ids"
        return "pooled, unknown machine id"

    def to_manifest(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(the manifest's `calibration` entry, the tensors it refers to)."""
        entry = {"method": "out_of_fold", "folds": self.folds, "hop_s": self.hop_s,
                 "pooled": self.pooled.to_json(),
                 "per_id": {f"{m:02d}": t.to_json() for m, t in sorted(self.per_id.items())}}
        tensors = {"calibration.scores.pooled": self.pooled.scores}
        if self.known_id is not None:
            entry["known_id"] = self.known_id.to_json()
            tensors["calibration.scores.known_id"] = self.known_id.scores
        tensors.update({f"calibration.scores.{m:02d}": t.scores for m, t in self.per_id.items()})
        return entry, tensors

    @classmethod
    def from_manifest(cls, entry: dict, tensors: Mapping[str, object]) -> Calibration:
        """Refit-free: the stored shape and scale are used as they are (checked by
        `calibration_problem` first)."""

        def tail(key: str, d: dict) -> ScoreTail:
            scores = np.sort(np.asarray(_numpy(tensors[f"calibration.scores.{key}"]), dtype=float))
            return ScoreTail(scores, float(d["quantile"]), float(d["u"]), float(d["xi"]),
                             float(d["sigma"]), str(d["method"]))

        return cls(tail("pooled", entry["pooled"]),
                   {int(k): tail(k, v) for k, v in entry.get("per_id", {}).items()},
                   int(entry["folds"]), float(entry["hop_s"]),
                   tail("known_id", entry["known_id"]) if "known_id" in entry else None)


def load_calibration(manifest: Manifest, tensors, where: Path | str) -> Calibration | None:
    """The artifact's calibration, None for models trained before it; a broken entry is an
    ArtifactError naming the file and key."""
    entry = manifest.calibration
    if entry is None:
        return None
    why = calibration_problem(entry, tensors)
    if why is not None:
        raise ArtifactError(f"{where}: {why}")
    return Calibration.from_manifest(entry, tensors)


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if hasattr(t, "detach") else np.asarray(t)


def calibration_problem(entry, tensors: Mapping[str, object]) -> str | None:
    """Why a manifest's `calibration` entry cannot be used (key: message), or None."""
    if not isinstance(entry, dict):
        return "calibration: must be a mapping"
    if not _int_ok(entry.get("folds"), 2):
        return f"calibration.folds: must be an integer >= 2, got {entry.get('folds')!r}"
    if not _num_ok(entry.get("hop_s")) or entry["hop_s"] <= 0:
        return f"calibration.hop_s: must be a number > 0, got {entry.get('hop_s')!r}"
    per_id = entry.get("per_id", {})
    if not isinstance(per_id, dict):
        return "calibration.per_id: must be a mapping of machine ID to tail"
    named = [("pooled", entry.get("pooled"))]
    if "known_id" in entry:
        named.append(("known_id", entry["known_id"]))
    for key, d in [*named, *per_id.items()]:
        where = (f"calibration.{key}" if key in ("pooled", "known_id")
                 else f"calibration.per_id.{str(key)[:10]}")
        if key not in ("pooled", "known_id") and not (isinstance(key, str) and key.isdigit() and len(key) <= 6):
            return f"calibration.per_id: keys must be machine IDs like \"00\", got {str(key)[:10]!r}"
        if not isinstance(d, dict):
            return f"{where}: must be a mapping"
        if d.get("method") not in ("gpd", "exponential"):
            return f"{where}.method: must be gpd or exponential, got {str(d.get('method'))[:20]!r}"
        for name in ("u", "xi", "sigma"):
            if not _num_ok(d.get(name)):
                return f"{where}.{name}: must be a finite number, got {str(d.get(name))[:20]}"
        if not _num_ok(d.get("quantile")) or not 0 < d["quantile"] < 1:
            return f"{where}.quantile: must be in (0, 1), got {str(d.get('quantile'))[:20]}"
        if d["sigma"] <= 0 or not XI_RANGE[0] <= d["xi"] <= XI_RANGE[1]:
            return f"{where}: needs sigma > 0 and xi in [{XI_RANGE[0]}, {XI_RANGE[1]}]"
        name = f"calibration.scores.{key}"
        if name not in tensors:
            return f"{where}: tensor {name!r} is missing from model.safetensors"
        t = tensors[name]
        shape = tuple(getattr(t, "shape", ()))
        if len(shape) != 1 or shape[0] < MIN_SCORES:
            return f"{where}: tensor {name!r} must hold >= {MIN_SCORES} scores, got shape {shape}"
    return None


def _num_ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_ok(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo
