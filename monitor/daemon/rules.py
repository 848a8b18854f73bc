"""Alarm rules: when a stream of window scores turns an alarm on, and what keeps it on.

`AlarmStateMachine` (alarm.py) owns the episode (ids, events, hold); a rule only says, window by
window, whether the alarm should start (`trigger`) and whether this window keeps it alive
(`active`). Three rules, chosen by `alarm.rule` (`auto`, the default, is ewma on a model with a
calibrated tail, kofn where the config sets a score threshold or its own k / n, or the model has
no tail; monitor/daemon/thresholds.py `effective_rule`):

- `kofn`: k of the last n windows above the window threshold (the daemon's rule until the
  ewma default; a window is above when `score > threshold`).
- `ewma`: exponentially weighted moving average of the standardised score z = (score - mean) /
  std of normal scores, E_t = lambda z_t + (1 - lambda) E_{t-1}; on while E_t > h. A single loud
  window moves E by only lambda z, a slow drift accumulates.
- `cusum`: one-sided CUSUM, S_t = max(0, S_{t-1} + z_t - k_ref); on while S_t > h. Sums small
  persistent shifts above k_ref standard deviations.

For both, z is clipped at `score_cap` (alarm.score_cap, default 3): a robust control chart.
Healthy machines make rare loud windows (a clank, a dropped tool) far out in the tail, too
rare for a few hundred calibration scores to price; uncapped, one of them moves the statistic
as much as many windows of a real fault, so the threshold must sit above them all. Capped, a
single window adds at most cap * lambda (ewma) or cap - k_ref (cusum), and a fault is caught
by lasting, not by loudness.

Each rule's statistic has a vectorised twin in monitor/rulesim.py (`ewma_series`,
`cusum_series`) that the false-alarm simulation uses; the tests check that they agree.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from monitor.daemon.types import Score

RULES = ("kofn", "ewma", "cusum")
RULE_CHOICES = ("auto", *RULES)  # what alarm.rule takes
DEFAULT_K, DEFAULT_N = 2, 3  # the k of n of AlarmConfig


@dataclass(frozen=True)
class RuleStep:
    trigger: bool  # start an alarm now (when none is on)
    active: bool  # this window keeps an alarm on (resets the hold timer)
    statistic: float  # what the rule compared with its threshold


class AlarmRule(Protocol):
    name: str

    def update(self, score: Score) -> RuleStep: ...

    def reset(self) -> None:
        """Called when an alarm has ended."""

    def snapshot(self) -> list | float:
        """The rule's state as JSON (AlarmStateMachine.snapshot)."""

    def restore(self, state) -> None: ...


def _standardised(score: float, mean: float, std: float, cap: float | None) -> float:
    z = (score - mean) / std
    return z if cap is None else min(z, cap)


def _restored_level(state) -> float:
    """An ewma / cusum level from a checkpoint; 0 (a fresh start) for another rule's state."""
    ok = isinstance(state, (int, float)) and not isinstance(state, bool) and math.isfinite(state)
    return float(state) if ok else 0.0


class KOfNRule:
    name = "kofn"

    def __init__(self, k: int, n: int):
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
        self.k, self.n = k, n
        self._recent: deque[bool] = deque(maxlen=n)

    def update(self, score: Score) -> RuleStep:
        above = score.anomaly
        self._recent.append(above)
        return RuleStep(sum(self._recent) >= self.k, above, score.score)

    def reset(self) -> None:
        self._recent.clear()  # a new alarm needs k fresh exceedances

    def snapshot(self) -> list:
        return list(self._recent)

    def restore(self, state) -> None:
        # a state of another rule (the config's rule changed across a restart): start fresh
        recent = state if isinstance(state, list) else []
        self._recent = deque((bool(x) for x in recent), maxlen=self.n)


class EwmaRule:
    name = "ewma"

    def __init__(self, *, mean: float, std: float, lam: float, h: float,
                 cap: float | None = None):
        if not 0 < lam <= 1:
            raise ValueError(f"ewma lambda must be in (0, 1], got {lam}")
        self.mean, self.std, self.lam, self.h, self.cap = mean, std, lam, h, cap
        self.value = 0.0

    def update(self, score: Score) -> RuleStep:
        z = _standardised(score.score, self.mean, self.std, self.cap)
        self.value = self.lam * z + (1.0 - self.lam) * self.value
        over = self.value > self.h
        return RuleStep(over, over, self.value)

    def reset(self) -> None:
        pass  # the average decays by itself; resetting it would hide a fault still present

    def snapshot(self) -> float:
        return self.value

    def restore(self, state) -> None:
        self.value = _restored_level(state)


class CusumRule:
    name = "cusum"

    def __init__(self, *, mean: float, std: float, k_ref: float, h: float,
                 cap: float | None = None):
        self.mean, self.std, self.k_ref, self.h, self.cap = mean, std, k_ref, h, cap
        self.value = 0.0

    def update(self, score: Score) -> RuleStep:
        z = _standardised(score.score, self.mean, self.std, self.cap)
        self.value = max(0.0, self.value + z - self.k_ref)
        over = self.value > self.h
        return RuleStep(over, over, self.value)

    def reset(self) -> None:
        pass  # the sum has fallen below h for hold_s already; it drains on its own

    def snapshot(self) -> float:
        return self.value

    def restore(self, state) -> None:
        self.value = _restored_level(state)
