"""A source's threshold follows the false alarms a person confirmed (its `normal` verdicts).

The calibrated tail (`monitor/calibration.py`) predicts how often normal audio crosses a
threshold; each `normal` verdict is a counted case of it doing so. The overlay
(`monitor/reference.py`) makes the judged sound itself score low from then on; what the verdicts
also say is that the calibration may be underestimating how often *unseen* normal sounds alarm.
That is a rate, so it is corrected as one (a Poisson rate with a gamma prior):

    factor = (1 + N) / (1 + E)

N: verdicts whose windows reached the no-verdict threshold when scored by the model and the
verdicts recorded before them (how the sound scored when it alarmed); a verdict on a sound that
did not alarm is no false alarm. E: the false alarms the
calibration expected in the audio this source has been scored on (`monitor/daemon/exposure.py`)
at the no-verdict threshold. The prior is one expected false alarm, so the first verdict on a
fresh source doubles the predicted rate, and one in months of audio at a budget of one a week
changes nothing. The threshold is then the one at which factor x the calibrated rate meets the
source's `false_alarms_per_day` (the same simulation of the alarm rule as at start, at
budget / factor), never below the no-verdict threshold and never above the largest judged score.

How loud a judged sound was does not matter: a threshold raised to the loudest false alarm would
make the source deaf to every quieter fault. An explicit `alarm.threshold` and a model without a
calibrated tail keep the no-verdict threshold.

For ewma and cusum the threshold is a level of the rule's statistic, so "reached" and "the
largest judged" are taken on that statistic: the rule run over the verdict's windows starting
from the threshold itself (the alarm was on at its first window), scores capped as the rule
caps them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from monitor.daemon.thresholds import ResolvedAlarm, resolve_for_detector
from monitor.overlay import with_reference
from monitor.rulesim import RuleSpec, rule_series
from monitor.scorers import Features

PRIOR_EPISODES = 1.0  # gamma prior on (true rate / calibrated rate): mean 1, one episode's weight


def judged_by_verdict(detector, overlay) -> list[np.ndarray]:
    """Per verdict, in the order recorded: its windows scored by the model and the verdicts
    before it."""
    out = []
    start = 0
    emb, ids = overlay.embeddings, overlay.machine_ids
    for entry in overlay.entries:
        stop = start + entry.windows
        before = with_reference(detector, emb[:start], ids[:start])
        scored = before.score_features(Features(emb[start:stop].to(detector.device)),
                                       list(ids[start:stop]))["score"]
        out.append(scored.double().cpu().numpy())
        start = stop
    return out


def judged_scores(detector, overlay) -> np.ndarray:
    """(overlay windows,) every verdict's windows, each scored by the verdicts before it."""
    parts = judged_by_verdict(detector, overlay)
    return np.concatenate(parts) if parts else np.zeros(0)


def peak_statistic(resolved: ResolvedAlarm, scores: np.ndarray) -> float:
    """The highest level a verdict's windows took the rule's statistic to: the score itself
    for kofn; for ewma / cusum the statistic started at the threshold (the alarm was on)."""
    if resolved.rule == "kofn":
        return float(np.max(scores))
    spec = RuleSpec(resolved.rule, ewma_lambda=resolved.ewma_lambda, cusum_k=resolved.cusum_k,
                    score_cap=resolved.score_cap)
    stat = rule_series((scores - resolved.mean) / resolved.std, spec, start=resolved.threshold)
    return float(np.max(stat))


def rate_factor(false_alarms: int, expected: float) -> float:
    """Posterior mean of true / calibrated false-alarm rate after `false_alarms` confirmed
    where the calibration expected `expected`."""
    return (PRIOR_EPISODES + false_alarms) / (PRIOR_EPISODES + max(0.0, expected))


def recalibrate(detector, overlay, alarm, *, hop_s: float, machine_id: int | None,
                no_verdict: ResolvedAlarm, exposure_days: float) -> ResolvedAlarm:
    """The source's alarm settings with this overlay (`no_verdict` when it does not apply).
    detector: the source's model without the overlay; exposure_days: audio the source has
    been scored on."""
    if (getattr(detector, "calibration", None) is None or no_verdict.origin != "budget"
            or overlay.windows == 0
            or no_verdict.expected_per_day is None or no_verdict.budget_per_day is None):
        return no_verdict
    alarm = dataclasses.replace(alarm, rule=no_verdict.rule)  # auto stays what it resolved to
    peaks = [peak_statistic(no_verdict, s[np.isfinite(s)])
             for s in judged_by_verdict(detector, overlay) if np.isfinite(s).any()]
    false_alarms = sum(p >= no_verdict.threshold for p in peaks)
    expected = no_verdict.expected_per_day * max(0.0, exposure_days)
    factor = rate_factor(false_alarms, expected)
    if not false_alarms or factor <= 1.0:
        return no_verdict
    budget = no_verdict.budget_per_day
    resolved = resolve_for_detector(
        detector, dataclasses.replace(alarm, false_alarms_per_day=budget / factor),
        hop_s=hop_s, machine_id=machine_id)
    bounded = min(max(resolved.threshold, no_verdict.threshold), max(peaks))
    if bounded != resolved.threshold:  # the calibrated expectation at the bounded threshold
        resolved = resolve_for_detector(detector, dataclasses.replace(alarm, threshold=bounded),
                                        hop_s=hop_s, machine_id=machine_id)
    why = (f"; rate x{factor:.2f} after {false_alarms} confirmed false alarm(s) in "
           f"{exposure_days:.2f} days scored (calibration expected {expected:.2f})")
    return dataclasses.replace(resolved, origin="budget", budget_per_day=budget,
                               expected_per_day=resolved.expected_per_day * factor,
                               tail=resolved.tail + why)
