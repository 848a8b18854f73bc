"""Which threshold a source alarms at, and how many false alarms a day it expects.

One function for everything that turns scores into alarms (the daemon, `check-config`,
`harken evaluate --stream`, a separate alarm stage): `resolve_alarm` takes the model's
calibration (or none, for models trained before it), the stored threshold, the source's alarm
settings, hop and machine ID, and returns a `ResolvedAlarm` whose `build_rule()` gives the
rule that AlarmStateMachine runs. Order of precedence: an explicit `alarm.threshold`, else the
budget `alarm.false_alarms_per_day` through the calibrated tail, else the stored threshold.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from monitor.calibration import SECONDS_PER_DAY, Calibration, load_calibration
from monitor.rulesim import RuleSimulator, RuleSpec
from monitor.daemon.rules import (DEFAULT_K, DEFAULT_N, RULE_CHOICES, AlarmRule, CusumRule,
                                  EwmaRule, KOfNRule)
from monitor.errors import UsageError

if TYPE_CHECKING:
    from monitor.manifest import Manifest

MAX_BUDGET_PER_DAY = 1_000.0  # beyond, a 2-of-3 alarm at 10 s is on more often than off


@dataclass(frozen=True)
class ResolvedAlarm:
    rule: str
    threshold: float  # what the rule compares: a score (kofn) or its statistic (ewma, cusum)
    window_threshold: float  # per-window threshold published with each score (score units)
    origin: str  # config | budget | artifact
    expected_per_day: float | None  # None: no calibration to tell
    budget_per_day: float | None
    mean: float  # normal score mean and std: ewma/cusum standardise with them
    std: float
    k: int
    n: int
    ewma_lambda: float
    cusum_k: float
    tail: str  # what the expectation rests on
    score_cap: float | None = None  # ewma / cusum: standardised scores clipped at this level

    def build_rule(self) -> AlarmRule:
        if self.rule == "ewma":
            return EwmaRule(mean=self.mean, std=self.std, lam=self.ewma_lambda, h=self.threshold,
                            cap=self.score_cap)
        if self.rule == "cusum":
            return CusumRule(mean=self.mean, std=self.std, k_ref=self.cusum_k, h=self.threshold,
                             cap=self.score_cap)
        return KOfNRule(self.k, self.n)

    def rule_words(self) -> str:
        """The rule and its settings: "2 of 3", "ewma lambda 0.2, cap 3"."""
        cap = "" if self.score_cap is None else f", cap {self.score_cap:g}"
        return {"kofn": f"{self.k} of {self.n}", "ewma": f"ewma lambda {self.ewma_lambda:g}{cap}",
                "cusum": f"cusum k {self.cusum_k:g}{cap}"}[self.rule]

    def describe(self) -> str:
        what = self.rule_words()
        where = ("alarm.threshold in the config" if self.origin == "config"
                 else f"budget {self.budget_per_day:.4g}/day" if self.origin == "budget"
                 else "the model's stored threshold (no calibrated tail)")
        expect = ("unknown" if self.expected_per_day is None
                  else f"{self.expected_per_day:.3g}")
        return (f"rule {what}, threshold {self.threshold:.6g} from {where}; expected false "
                f"alarms/day {expect} ({self.tail})")

    def to_json(self) -> dict:
        return {"rule": self.rule, "threshold": self.threshold,
                "window_threshold": self.window_threshold, "origin": self.origin,
                "expected_false_alarms_per_day": self.expected_per_day,
                "budget_per_day": self.budget_per_day, "score_cap": self.score_cap,
                "tail": self.tail}


def rule_problems(alarm, path: str) -> list[str]:
    """Value checks of the rule keys of an AlarmConfig (config.validate calls this)."""
    out = []
    if alarm.rule not in RULE_CHOICES:
        out.append(f"{path}.rule: must be one of {', '.join(RULE_CHOICES)}, "
                   f"got {str(alarm.rule)[:40]!r}")
    if not 0 < alarm.false_alarms_per_day <= MAX_BUDGET_PER_DAY:
        out.append(f"{path}.false_alarms_per_day: must be > 0 and <= {MAX_BUDGET_PER_DAY:g}, "
                   f"got {alarm.false_alarms_per_day}")
    if not 0 < alarm.ewma_lambda <= 1:
        out.append(f"{path}.ewma_lambda: must be in (0, 1], got {alarm.ewma_lambda}")
    if alarm.cusum_k < 0:
        out.append(f"{path}.cusum_k: must be >= 0, got {alarm.cusum_k}")
    cap = getattr(alarm, "score_cap", None)
    if cap is not None and not cap > 0:
        out.append(f"{path}.score_cap: must be > 0 (standard deviations of normal scores) or "
                   f"null for no cap, got {cap}")
    elif cap is not None and alarm.rule == "cusum" and cap <= alarm.cusum_k:
        out.append(f"{path}.score_cap: must be above cusum_k ({alarm.cusum_k:g}), or the sum "
                   f"can never grow; got {cap}")
    if alarm.rule in ("ewma", "cusum") and alarm.threshold is not None and alarm.threshold <= 0:
        out.append(f"{path}.threshold: an {alarm.rule} threshold is a level of its statistic "
                   f"and must be > 0, got {alarm.threshold}")
    return out


def effective_rule(alarm, calibrated: bool) -> str:
    """The rule `auto` stands for: ewma where the model's calibrated tail can set its level
    from the budget; kofn where the config gives a score threshold (a level of a score, not of
    a statistic) or its own k / n (other than the default 2 of 3), or the model has no tail
    (only a stored score threshold)."""
    if alarm.rule != "auto":
        return alarm.rule
    own_kofn = (alarm.k, alarm.n) != (DEFAULT_K, DEFAULT_N)
    return "ewma" if calibrated and alarm.threshold is None and not own_kofn else "kofn"


def resolve_alarm(calibration: Calibration | None, stored_threshold: float, alarm, *,
                  hop_s: float, window_s: float, machine_id: int | None = None,
                  normal_summary: dict | None = None) -> ResolvedAlarm:
    """The rule, threshold and expected false alarms of one source (see the module doc).

    stored_threshold: the artifact's threshold for this machine ID; normal_summary: the
    manifest's `normal_scores` (mean, std) used to standardise when there is no calibration."""
    alarm = dataclasses.replace(alarm, rule=effective_rule(alarm, calibration is not None))
    spec = RuleSpec(alarm.rule, alarm.k, alarm.n, alarm.hold_s, alarm.ewma_lambda, alarm.cusum_k,
                    alarm.score_cap)
    budget = float(alarm.false_alarms_per_day)
    common = dict(rule=alarm.rule, k=alarm.k, n=alarm.n, ewma_lambda=alarm.ewma_lambda,
                  cusum_k=alarm.cusum_k, score_cap=alarm.score_cap)
    if calibration is None:
        if alarm.rule != "kofn" and alarm.threshold is None:
            raise UsageError(f"alarm.rule {alarm.rule} needs a model with a calibrated tail "
                             "(retrain it with this harken) or an explicit alarm.threshold")
        summary = normal_summary or {}
        mean = float(summary.get("mean", 0.0))
        std = float(summary.get("std", 1.0)) or 1.0
        threshold = float(alarm.threshold if alarm.threshold is not None else stored_threshold)
        return ResolvedAlarm(threshold=threshold,
                             window_threshold=threshold if alarm.rule == "kofn" else stored_threshold,
                             origin="config" if alarm.threshold is not None else "artifact",
                             expected_per_day=None, budget_per_day=None, mean=mean, std=std,
                             tail="the model has no calibration", **common)
    tail = calibration.tail_for(machine_id)
    sim = RuleSimulator(tail, spec, hop_s=hop_s, window_s=window_s, budget_per_day=budget)
    if alarm.threshold is not None:
        threshold, origin = float(alarm.threshold), "config"
    else:
        threshold, origin = sim.threshold_for_budget(budget), "budget"
    expected = sim.episodes_per_day(threshold)
    if alarm.rule == "kofn":
        window_threshold = threshold
    else:  # a window alone at this level would spend the whole budget
        window_threshold = float(tail.isf(min(1.0, budget * hop_s / SECONDS_PER_DAY)))
    who = calibration.tail_name(machine_id)
    desc = (f"{tail.method} tail over {tail.n_scores} out-of-fold normal scores ({who}, "
            f"{tail.n_exceed} above u), {sim.days:.0f} simulated days at hop {hop_s:g} s")
    return ResolvedAlarm(threshold=threshold, window_threshold=window_threshold, origin=origin,
                         expected_per_day=expected, budget_per_day=budget, mean=tail.mean,
                         std=tail.std, tail=desc, **common)


def resolve_for_detector(detector, alarm, *, hop_s: float, machine_id: int | None) -> ResolvedAlarm:
    """resolve_alarm for a loaded Detector (it carries `calibration`)."""
    return resolve_alarm(getattr(detector, "calibration", None), detector.threshold_for(machine_id),
                         alarm, hop_s=hop_s, window_s=detector.window_s, machine_id=machine_id,
                         normal_summary=detector.manifest.normal_scores)


def resolve_for_manifest(manifest: Manifest, tensors, where, alarm, *, hop_s: float,
                         machine_id: int | None) -> ResolvedAlarm:
    """resolve_alarm from an artifact's manifest and tensors (check-config: no encoder built)."""
    calibration = load_calibration(manifest, tensors, where)
    th = manifest.threshold
    stored = float(th.get("per_id", {}).get(f"{int(machine_id):02d}", th["value"])
                   if machine_id is not None else th["value"])
    return resolve_alarm(calibration, stored, alarm, hop_s=hop_s,
                         window_s=float(manifest.window_s), machine_id=machine_id,
                         normal_summary=manifest.normal_scores)


def source_alarm_lines(cfg) -> tuple[list[str], list[str]]:
    """(a line per source saying its rule, threshold and expected false alarms; problems)."""
    from monitor.artifact import load_artifact

    lines, problems = [], []
    loaded: dict = {}
    for i, s in enumerate(cfg.sources):
        alarm = s.alarm or cfg.alarm
        try:
            if s.model not in loaded:
                loaded[s.model] = load_artifact(s.model)
            art = loaded[s.model]
            r = resolve_for_manifest(art.manifest, art.tensors, Path(s.model) / "manifest.json",
                                     alarm, hop_s=s.hop_s, machine_id=s.machine_id)
        except UsageError as exc:
            problems.append(f"sources[{i}].alarm: {exc}")
            continue
        if getattr(s, "learn_for", None) is not None:  # the tail comes from the live stream
            lines.append(f"  {s.id}: learns for {s.learn_for} (or reuses its enrolment in the "
                         f"state directory), then alarms by rule {effective_rule(alarm, True)} at the threshold "
                         "of its own enrolled tail")
            continue
        lines.append(f"  {s.id}: {r.describe()}")
    return lines, problems
