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
from functools import cached_property
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
PREDICTIVE_DRAWS = 256  # parametric-bootstrap refits whose mixture is the predictive tail
PREDICTIVE_SEED = 20261204
PREDICTIVE_GRID = 2048  # excess levels on which the mixture's inverse is interpolated


# --------------------------------------------------------------------------- the tail


def fit_gpd_pwm(excess: np.ndarray) -> tuple[float, float]:
    """(shape xi, scale sigma) of a GPD fitted to positive excesses by probability-weighted
    moments (Hosking & Wallis 1987); xi is clamped to XI_RANGE.

    The shape is not shrunk toward the exponential tail: fused detector scores of healthy
    synthetic slide rails have a heavy tail (xi 0.27 from 1,800 unseen clips of a seed-2 model,
    0.24 from its 180 out-of-fold scores), and shrinking it put the one-a-week threshold below
    the true one in 93 % of 180-score subsamples (72 % unshrunk). Small samples already
    extrapolate low; this is not the place to lower them further."""
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


def _pwm_rows(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fit_gpd_pwm on each row of y (rows sorted ascending), vectorised."""
    n = y.shape[1]
    a0 = y.mean(axis=1)
    a1 = (y * ((n - np.arange(1, n + 1)) / (n - 1))).sum(axis=1) / n
    denom = a0 - 2.0 * a1
    ok = (a0 > 0) & (denom > 0)
    xi = np.where(ok, np.clip(-(a0 / np.where(ok, denom, 1.0) - 2.0), *XI_RANGE), 0.0)
    sigma = np.maximum(np.where(ok, a0 * (1.0 - xi), a0), 1e-12)
    return xi, sigma


def gpd_sf(y: np.ndarray, xi, sigma) -> np.ndarray:
    """P(excess > y) of GPD(xi, sigma); xi and sigma may be arrays that broadcast with y."""
    z = np.maximum(y, 0.0) / sigma
    xi = np.asarray(xi, dtype=float)
    small = np.abs(xi) < 1e-9
    safe = np.where(small, 1.0, xi)
    base = np.maximum(1.0 + safe * z, 0.0)
    with np.errstate(divide="ignore", over="ignore"):
        heavy = np.where(base > 0, base ** (-1.0 / safe), 0.0)
    return np.where(small, np.exp(-z), heavy)


def predictive_draws(xi: float, sigma: float, n_exceed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shapes and scales that n_exceed excesses drawn from GPD(xi, sigma) give when refitted:
    the sampling spread of the fit, by parametric bootstrap with a fixed seed (the same tail
    always gives the same draws, so thresholds are reproducible)."""
    rng = np.random.default_rng(PREDICTIVE_SEED + int(n_exceed))
    v = rng.random((PREDICTIVE_DRAWS, int(n_exceed)))
    if abs(xi) < 1e-9:
        y = -sigma * np.log(v)
    else:
        y = sigma / xi * (v ** (-xi) - 1.0)
    return _pwm_rows(np.sort(y, axis=1))


@dataclass(frozen=True)
class ScoreTail:
    """The distribution of a model's normal scores: empirical up to u, GPD above.

    Above u, sf and isf use the predictive tail: the mean of the GPDs that the fit's own
    sampling error allows (`predictive_draws`), not the one point estimate. With a few hundred
    scores the shape is uncertain by about +-0.15, and the plug-in tail extrapolates to a
    one-a-week level (p ~ 1e-3 per window) too low more often than not: the heavy-tailed
    draws weigh in, so the threshold rises where the data say least. `xi` and `sigma` stay
    the point estimate (stored in the manifest; old artifacts get the same predictive tail).
    An exponential tail (too few exceedances for a shape) is used as it is."""

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

    @cached_property
    def _draws(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.method != "gpd" or self.n_exceed < MIN_GPD_EXCEEDANCES:
            return None
        return predictive_draws(self.xi, self.sigma, self.n_exceed)

    @cached_property
    def _inverse_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(log excess, log predictive sf) on a geometric grid reaching sf ~ 1e-16."""
        xis, sigmas = self._draws
        safe = np.where(np.abs(xis) < 1e-9, 1.0, xis)
        # each draw's excess at sf 1e-16 (near the endpoint for a negative shape)
        reach = np.where(np.abs(xis) < 1e-9, sigmas * -np.log(1e-16),
                         sigmas / safe * (1e-16 ** -safe - 1.0))
        top = float(reach.max())
        y = np.geomspace(self.sigma * 1e-6, max(top, self.sigma), PREDICTIVE_GRID)
        sf = self._gpd_sf(y)
        keep = sf > 0
        return np.log(y[keep]), np.log(sf[keep])

    def _gpd_sf(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=float)
        if self._draws is None:
            return gpd_sf(y, self.xi, self.sigma)
        xis, sigmas = self._draws
        flat = y.reshape(-1, 1)
        out = np.concatenate([gpd_sf(flat[i:i + 4096], xis[None, :], sigmas[None, :]).mean(axis=1)
                              for i in range(0, max(len(flat), 1), 4096)])
        return out[:len(flat)].reshape(y.shape)

    def _gpd_isf(self, r: np.ndarray) -> np.ndarray:
        """The excess over u that the tail exceeds with probability r (0 < r <= 1)."""
        if self._draws is None:
            if abs(self.xi) < 1e-9:
                return self.sigma * -np.log(r)
            return self.sigma / self.xi * (r ** (-self.xi) - 1.0)
        log_y, log_sf = self._inverse_grid
        # log sf falls along the grid: interpolate log y against it, reversed to rise
        out = np.exp(np.interp(-np.log(r), -log_sf, log_y))
        return np.where(r >= 1.0, 0.0, out)

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
        tail = self.u + self._gpd_isf(r)
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
