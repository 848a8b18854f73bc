"""A source's threshold follows its normal reference overlay (monitor/reference.py).

The judged windows are normal sounds the calibration never saw. Each verdict's windows are
scored leave-one-verdict-out (by the model plus the overlay without that verdict: how the
sound scores before a person said it was normal), those scores join the stored out-of-fold
normal scores of the calibrated tail (`ScoreTail.scores`), the tail is fitted again
(`ScoreTail.fit`, as in training), and the threshold for the source's false-alarm budget comes
from it through `resolve_for_detector`, as at start. Bounds: never below the no-verdict
threshold, and never above the largest judged score (beyond it even the judged sounds would not
alarm without the overlay). An explicit `alarm.threshold`, a model without a calibrated tail
and the ewma / cusum rules (their threshold is a level of a statistic, not of a score) keep
the no-verdict threshold.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from monitor.calibration import Calibration, ScoreTail
from monitor.daemon.thresholds import ResolvedAlarm, resolve_for_detector
from monitor.overlay import with_reference
from monitor.scorers import Features


def judged_scores(detector, overlay) -> np.ndarray:
    """(overlay windows,) each verdict's windows scored without that verdict in the overlay."""
    out = []
    start = 0
    emb, ids = overlay.embeddings, overlay.machine_ids
    for entry in overlay.entries:
        stop = start + entry.windows
        rest = with_reference(detector, torch.cat([emb[:start], emb[stop:]]),
                              ids[:start] + ids[stop:])
        scored = rest.score_features(Features(emb[start:stop].to(detector.device)),
                                     list(ids[start:stop]))["score"]
        out.append(scored.double().cpu().numpy())
        start = stop
    return np.concatenate(out) if out else np.zeros(0)


def _with_tail(cal: Calibration, machine_id: int | None, tail: ScoreTail) -> Calibration:
    """`cal` with the tail that `machine_id` is judged by replaced."""
    if machine_id is not None and int(machine_id) in cal.per_id:
        return dataclasses.replace(cal, per_id={**cal.per_id, int(machine_id): tail})
    if machine_id is not None and cal.known_id is not None:
        return dataclasses.replace(cal, known_id=tail)
    return dataclasses.replace(cal, pooled=tail)


def recalibrate(detector, overlay, alarm, *, hop_s: float, machine_id: int | None,
                no_verdict: ResolvedAlarm) -> ResolvedAlarm:
    """The source's alarm settings with this overlay (`no_verdict` when it does not apply).
    detector: the source's model without the overlay."""
    cal = getattr(detector, "calibration", None)
    if (cal is None or no_verdict.origin != "budget" or no_verdict.rule != "kofn"
            or overlay.windows == 0):
        return no_verdict
    judged = judged_scores(detector, overlay)
    judged = judged[np.isfinite(judged)]
    if not len(judged):
        return no_verdict
    tail = cal.tail_for(machine_id)
    refit = ScoreTail.fit(np.concatenate([tail.scores, judged]), tail.quantile)
    det = copy.copy(detector)
    det.calibration = _with_tail(cal, machine_id, refit)
    resolved = resolve_for_detector(det, alarm, hop_s=hop_s, machine_id=machine_id)
    low, high = no_verdict.threshold, max(no_verdict.threshold, float(judged.max()))
    bounded = min(max(resolved.threshold, low), high)
    if bounded != resolved.threshold:  # the expectation at the bounded threshold, same tail
        at = resolve_for_detector(det, dataclasses.replace(alarm, threshold=bounded),
                                  hop_s=hop_s, machine_id=machine_id)
        resolved = dataclasses.replace(at, origin="budget",
                                       budget_per_day=no_verdict.budget_per_day)
    return resolved
