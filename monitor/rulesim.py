"""The alarm rules simulated on a calibrated tail (monitor/calibration.py): expected false
alarms per day of any threshold, and the threshold of a false-alarm budget.

Dependence. A rule sees consecutive windows; when windows overlap (hop_s < window_s) their scores
are not independent. The simulation models a window's score as a monotone function of a moving
average of m = window_s / hop_s independent hop-sized pieces (latent Gaussian), so neighbouring
windows correlate by their overlap share (1 - lag / m) and exceedances come in clusters, as
they do on real streams. Non-overlapping windows are treated as independent; slow drifts of a
real machine (warm-up, shifts) make exceedances cluster more, which this model does not know.
The figures are checked against real replays (tests, `harken evaluate --stream`).

numpy and scipy only: the daemon uses this at start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from monitor.calibration import SECONDS_PER_DAY, ScoreTail

DEFAULT_BUDGET_PER_DAY = 1.0 / 7.0
SIM_SEED = 20260401  # common random numbers: thresholds move monotonically with the budget
SIM_TARGET_EPISODES = 40  # simulate long enough to expect this many alarms at the budget
SIM_MIN_DAYS = 30.0
SIM_MAX_WINDOWS = 4_000_000
SIM_CHUNK_WINDOWS = 1_000_000


# --------------------------------------------------------------------------- the rules, simulated


@dataclass(frozen=True)
class RuleSpec:
    """What the simulation needs to know about an alarm rule (see monitor/daemon/rules.py)."""

    rule: str  # kofn | ewma | cusum
    k: int = 2
    n: int = 3
    hold_s: float = 30.0
    ewma_lambda: float = 0.2
    cusum_k: float = 0.5
    score_cap: float | None = None  # ewma/cusum: standardised scores clipped at this level


def hold_windows(hold_s: float, hop_s: float) -> int:
    """An alarm ends at the first window whose end is >= hold_s after the last active one's."""
    return max(1, math.ceil(hold_s / hop_s - 1e-9))


def count_episodes(trigger: np.ndarray, active: np.ndarray, hold: int) -> int:
    """Alarm episodes in a window sequence: an episode starts at a triggering window and lasts
    while active windows follow each other within `hold` windows (AlarmStateMachine's logic,
    vectorised; the state machine itself is checked against it in the tests). Exact while
    n <= hold + 1 (the default 2 of 3 with 30 s hold at any hop up to 10 s); with a longer n
    the state machine's fresh start after an alarm makes it count slightly fewer."""
    idx = np.flatnonzero(active | trigger)
    if len(idx) == 0:
        return 0
    cluster = np.concatenate([[0], np.cumsum(np.diff(idx) > hold)])
    return int(len(np.unique(cluster[trigger[idx]])))


def ewma_series(z: np.ndarray, lam: float, start: float = 0.0) -> np.ndarray:
    """E_t = lam z_t + (1 - lam) E_{t-1}, E_0 = start (the EwmaRule's statistic)."""
    from scipy.signal import lfilter

    out = lfilter([lam], [1.0, -(1.0 - lam)], z)
    return out + start * (1.0 - lam) ** np.arange(1, len(z) + 1) if start else out


def cusum_series(z: np.ndarray, k_ref: float, start: float = 0.0) -> np.ndarray:
    """S_t = max(0, S_{t-1} + z_t - k_ref), S_0 = start >= 0, by Lindley's identity (the
    CusumRule's)."""
    c = np.cumsum(z - k_ref)
    return c - np.minimum(np.minimum.accumulate(c), -start)


def rule_series(z: np.ndarray, spec: RuleSpec, start: float = 0.0) -> np.ndarray:
    """The ewma / cusum statistic of standardised scores z, capped at spec.score_cap as the
    rule caps them, from the level `start`."""
    if spec.score_cap is not None:
        z = np.minimum(z, spec.score_cap)
    if spec.rule == "ewma":
        return ewma_series(z, spec.ewma_lambda, start)
    return cusum_series(z, spec.cusum_k, start)


class RuleSimulator:
    """Long simulated normal score streams for one tail, hop and rule: the expected false alarms
    per day of any threshold, and the threshold of a budget. Built once per source at start."""

    def __init__(self, tail: ScoreTail, spec: RuleSpec, *, hop_s: float, window_s: float,
                 budget_per_day: float = DEFAULT_BUDGET_PER_DAY):
        self.tail = tail
        self.spec = spec
        self.hop_s = float(hop_s)
        self.m = max(1, int(round(window_s / hop_s)))  # windows sharing audio with each other
        days = max(SIM_MIN_DAYS, SIM_TARGET_EPISODES / max(budget_per_day, 1e-9))
        self.n_windows = int(min(SIM_MAX_WINDOWS, math.ceil(days * SECONDS_PER_DAY / hop_s)))
        self.days = self.n_windows * self.hop_s / SECONDS_PER_DAY
        self.hold = hold_windows(spec.hold_s, hop_s)
        self._chunks = list(self._latent_chunks())
        self._stats: list[np.ndarray] | None = None

    def _latent_chunks(self):
        rng = np.random.default_rng(SIM_SEED)
        left = self.n_windows
        while left > 0:
            n = min(left, SIM_CHUNK_WINDOWS)
            e = rng.standard_normal(n + self.m - 1)
            if self.m == 1:
                yield e
            else:  # moving average of m pieces: correlation 1 - lag/m between windows
                c = np.cumsum(np.concatenate([[0.0], e]))
                yield (c[self.m:] - c[:-self.m]) / math.sqrt(self.m)
            left -= n

    def _rule_stats(self) -> list[np.ndarray]:
        """EWMA / CUSUM statistic of the standardised simulated scores, per chunk."""
        if self._stats is None:
            t, spec = self.tail, self.spec
            out, carry = [], 0.0
            for lat in self._chunks:
                scores = t.isf(ndtr(-lat))  # latent -> score with the same exceedance chance
                # the state carries over the chunk edge: it continues from the last value
                stat = rule_series((scores - t.mean) / t.std, spec, carry)
                carry = float(stat[-1])
                out.append(stat)
            self._stats = out
        return self._stats

    def episodes_per_day(self, threshold: float) -> float:
        """Expected false alarm episodes per day at `threshold` (score units for kofn, the
        statistic's units, standard deviations of normal scores, for ewma/cusum)."""
        spec = self.spec
        total = 0
        if spec.rule == "kofn":
            p = float(self.tail.sf(threshold))
            if p <= 0.0:
                return 0.0
            c = float(-ndtri(p))  # latent level with the same exceedance probability
            for lat in self._chunks:
                above = lat > c
                hits = np.convolve(above.astype(np.int8), np.ones(spec.n, dtype=np.int8))[:len(above)]
                total += count_episodes(hits >= spec.k, above, self.hold)
        else:
            for stat in self._rule_stats():
                over = stat > threshold
                total += count_episodes(over, over, self.hold)
        return total / self.days

    def threshold_for_budget(self, budget_per_day: float) -> float:
        """The lowest threshold whose expected false alarms per day stay within the budget."""
        if self.spec.rule == "kofn":
            lo = float(self.tail.isf(0.5))  # half of all normal windows above: surely too low
            hi = float(self.tail.isf(1e-12))
        else:
            lo, hi = 0.0, max(float(max(s.max() for s in self._rule_stats())), 1e-6) * 1.001
        if self.episodes_per_day(lo) <= budget_per_day:
            return lo
        for _ in range(40):  # bisection; the rate is monotone in the threshold
            mid = 0.5 * (lo + hi)
            if self.episodes_per_day(mid) <= budget_per_day:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-6 * max(1.0, abs(hi)):
                break
        return hi
