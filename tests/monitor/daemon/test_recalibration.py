"""The threshold follows the confirmed false alarms as a rate: (1 + N) / (1 + E) times the
calibrated rate, met at the source's budget; the loudness of a judged sound does not set it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from monitor.daemon.config import AlarmConfig
from monitor.daemon.exposure import Exposure
from monitor.daemon.recalibration import judged_scores, peak_statistic, rate_factor, recalibrate
from monitor.daemon.thresholds import ResolvedAlarm, resolve_for_detector
from monitor.detector import Detector
from monitor.reference import ReferenceStore
from tests.helpers import tone_clip
from tests.monitor.test_verdicts import fault_clip, ref_model  # noqa: F401

ALARM = AlarmConfig(k=1, n=1, hold_s=0.0)


def _resolve(det, overlay, alarm=ALARM, days=0.0):
    base = resolve_for_detector(det, alarm, hop_s=10.0, machine_id=None)
    return base, recalibrate(det, overlay, alarm, hop_s=10.0, machine_id=None, no_verdict=base,
                             exposure_days=days)


def _at_budget(det, per_day):
    return resolve_for_detector(det, dataclasses.replace(ALARM, false_alarms_per_day=per_day),
                                hop_s=10.0, machine_id=None)


def test_the_rate_factor_is_the_posterior_mean_of_a_gamma_poisson():
    assert rate_factor(0, 0.0) == 1.0
    assert rate_factor(1, 0.0) == 2.0  # the first false alarm on a fresh source
    assert rate_factor(1, 1.0) == 1.0  # one where one was expected: the calibration holds
    assert rate_factor(3, 1.0) == 2.0
    assert rate_factor(1, -5.0) == 2.0  # no negative exposure


def test_a_false_alarm_raises_the_threshold_by_its_rate_not_to_its_loudness(tmp_path, ref_model):
    det = Detector.load(ref_model, device="cpu")
    assert det.calibration is not None
    store = ReferenceStore(tmp_path, "fan")
    judged = fault_clip(7)
    store.add("n1-fan-1", "v1", det.embed(judged[None]).cpu(), [None])
    one = store.load()
    base, moved = _resolve(det, one)
    loud = judged_scores(det, one)
    # the first verdict is scored by the model alone: the score it alarmed with
    assert loud[0] == pytest.approx(det.score_windows(judged[None])[0], rel=1e-5)
    assert loud[0] > base.threshold
    # one confirmed false alarm on a fresh source: twice the calibrated rate, met at the budget
    assert moved.threshold == pytest.approx(_at_budget(det, base.budget_per_day / 2).threshold)
    assert base.threshold < moved.threshold < loud[0], "deaf to faults quieter than the verdict"
    assert moved.origin == "budget" and moved.budget_per_day == base.budget_per_day
    assert moved.expected_per_day <= base.budget_per_day * 1.05
    assert "1 confirmed false alarm" in moved.tail

    # another false alarm, a sound unlike the first: three times the rate, a higher threshold
    other = tone_clip(np.random.default_rng(11), 1, anomalous=True)
    store.add("n1-fan-2", "v2", det.embed(other[None]).cpu(), [None])
    two = store.load()
    assert judged_scores(det, two)[1] >= base.threshold
    _, moved2 = _resolve(det, two)
    assert moved2.threshold == pytest.approx(_at_budget(det, base.budget_per_day / 3).threshold)
    assert moved2.threshold > moved.threshold

    store.undo("v2")
    store.undo("v1")
    _, restored = _resolve(det, store.load())
    assert restored.threshold == base.threshold


def test_a_false_alarm_after_long_quiet_service_leaves_the_threshold(tmp_path, ref_model):
    det = Detector.load(ref_model, device="cpu")
    store = ReferenceStore(tmp_path, "fan")
    store.add("n1-fan-1", "v1", det.embed(fault_clip(7)[None]).cpu(), [None])
    base, fresh = _resolve(det, store.load(), days=0.0)
    days = 2.0 / base.expected_per_day  # two false alarms expected in that time, one seen
    _, seasoned = _resolve(det, store.load(), days=days)
    assert fresh.threshold > base.threshold
    assert seasoned.threshold == base.threshold


def test_an_explicit_threshold_is_never_changed(tmp_path, ref_model):
    det = Detector.load(ref_model, device="cpu")
    store = ReferenceStore(tmp_path, "fan")
    store.add("n1-fan-1", "v1", det.embed(fault_clip(7)[None]).cpu(), [None])
    fixed = AlarmConfig(k=1, n=1, hold_s=0.0, threshold=3.5)
    base, after = _resolve(det, store.load(), fixed)
    assert base.origin == "config" and after.threshold == base.threshold == 3.5


def test_a_judged_sound_below_the_threshold_leaves_it(tmp_path, ref_model):
    det = Detector.load(ref_model, device="cpu")
    store = ReferenceStore(tmp_path, "fan")
    hum = tone_clip(np.random.default_rng(5), 0, anomalous=False)  # a normal take: no alarm
    store.add("n1-fan-1", "v1", det.embed(hum[None]).cpu(), [None])
    base, after = _resolve(det, store.load())
    assert judged_scores(det, store.load()).max() < base.threshold
    assert after.threshold == base.threshold


def test_exposure_is_kept_across_restarts_and_an_unreadable_file_counts_from_zero(tmp_path):
    first = Exposure(tmp_path)
    first.add("fan", 10.0)
    first.add("fan", 10.0)
    first.add("pump", 5.0)
    first.save()
    again = Exposure(tmp_path)
    assert again.scored_s("fan") == 20.0 and again.scored_s("pump") == 5.0
    again.add("fan", 86_380.0)
    assert again.days("fan") == pytest.approx(1.0)
    again.save()
    assert Exposure(tmp_path).scored_s("fan") == pytest.approx(86_400.0)
    (tmp_path / "exposure.json").write_text("{not json")
    assert Exposure(tmp_path).scored_s("fan") == 0.0


@pytest.mark.parametrize("rule", ["ewma", "cusum"])
def test_under_a_statistic_rule_a_false_alarm_raises_its_level_by_rate(tmp_path, ref_model,
                                                                         rule):
    """ewma / cusum thresholds are levels of the rule's statistic; the verdict counts when its
    windows took the statistic to the threshold, and the new level stays below their peak."""
    det = Detector.load(ref_model, device="cpu")
    alarm = AlarmConfig(rule=rule, hold_s=0.0)
    store = ReferenceStore(tmp_path, "fan")
    judged = np.stack([fault_clip(7), fault_clip(8), fault_clip(9)])
    store.add("n1-fan-1", "v1", det.embed(judged).cpu(), [None] * 3)
    base, moved = _resolve(det, store.load(), alarm)
    assert base.rule == rule and base.origin == "budget"
    peak = peak_statistic(base, judged_scores(det, store.load()))
    assert peak > base.threshold
    halved = dataclasses.replace(alarm, false_alarms_per_day=base.budget_per_day / 2)
    want = resolve_for_detector(det, halved, hop_s=10.0, machine_id=None).threshold
    assert moved.threshold == pytest.approx(min(want, peak))
    assert base.threshold < moved.threshold <= peak
    assert "1 confirmed false alarm" in moved.tail


def test_the_peak_statistic_starts_at_the_threshold_and_follows_the_rule():
    base = ResolvedAlarm(
        rule="ewma", threshold=2.0, window_threshold=5.0, origin="budget", expected_per_day=0.1,
        budget_per_day=0.1, mean=1.0, std=2.0, k=2, n=3, ewma_lambda=0.5, cusum_k=0.5, tail="",
        score_cap=3.0)
    # z = (scores - 1) / 2, capped at 3: [0, 3, 3]; E from 2: 1.0, 2.0, 2.5
    assert peak_statistic(base, np.array([1.0, 9.0, 101.0])) == pytest.approx(2.5)
    cusum = dataclasses.replace(base, rule="cusum")
    # S from 2: 2 + (0 - .5) = 1.5, + 2.5 = 4.0, + 2.5 = 6.5
    assert peak_statistic(cusum, np.array([1.0, 9.0, 101.0])) == pytest.approx(6.5)
    assert peak_statistic(dataclasses.replace(base, rule="kofn"), np.array([1.0, 9.0])) == 9.0


def test_an_auto_source_stays_on_its_statistic_rule_when_the_new_level_is_bounded(tmp_path,
                                                                                 ref_model):
    """The rate would push the level past the verdicts' peak; bounded there, it is still the
    ewma's level (`auto` must not turn into kofn because a threshold is now set)."""
    det = Detector.load(ref_model, device="cpu")
    alarm = AlarmConfig(ewma_lambda=0.01, hold_s=0.0)  # auto: ewma on this calibrated model
    store = ReferenceStore(tmp_path, "fan")
    for i in range(20):
        store.add(f"n1-fan-{i}", f"v{i}", det.embed(fault_clip(7 + i)[None]).cpu(), [None])
    base, moved = _resolve(det, store.load(), alarm)
    assert base.rule == "ewma"
    assert (moved.rule, moved.window_threshold) == ("ewma", base.window_threshold)
    assert moved.threshold > base.threshold


def test_the_daemon_moves_the_live_ewma_level_and_undo_brings_it_back(tmp_path, ref_model):
    """SourceAlarms.recalibrate changes what the running rule compares, not only the published
    per-window threshold."""
    import types

    from monitor.daemon.config import DaemonConfig, SourceConfig
    from monitor.daemon.source_alarms import SourceAlarms
    from monitor.logs import get_logger

    det = Detector.load(ref_model, device="cpu")
    src = SourceConfig(id="fan", kind="folder", model=str(ref_model), path=str(tmp_path))
    cfg = DaemonConfig(sources=(src,), node="n1", state_dir=str(tmp_path / "state"),
                       alarm=AlarmConfig(rule="ewma", hold_s=0.0))
    alarms: dict = {}
    sa = SourceAlarms(cfg, {str(ref_model): det}, alarms, Exposure(tmp_path / "state"),
                      get_logger(stage="test"))
    overrides = sa.build()
    worker = types.SimpleNamespace(detectors={"base": det}, threshold_overrides=overrides)
    base_level = alarms["fan"].rule.h
    store = ReferenceStore(tmp_path, "fan")
    judged = np.stack([fault_clip(7), fault_clip(8), fault_clip(9)])
    store.add("n1-fan-1", "v1", det.embed(judged).cpu(), [None] * 3)
    sa.recalibrate("fan", store.load(), worker, "base")
    assert alarms["fan"].rule.h > base_level
    store.undo("v1")
    sa.recalibrate("fan", store.load(), worker, "base")
    assert alarms["fan"].rule.h == base_level
