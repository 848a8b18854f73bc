"""Calibrated tails, budgets and alarm rules (monitor/calibration.py, monitor/daemon/rules.py)."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.calibration import Calibration, ScoreTail, fit_gpd_pwm
from monitor.rulesim import (RuleSimulator, RuleSpec, count_episodes, cusum_series, ewma_series,
                             hold_windows)
from monitor.daemon.alarm import AlarmStateMachine
from monitor.daemon.config import AlarmConfig
from monitor.daemon.rules import CusumRule, EwmaRule, KOfNRule
from monitor.daemon.thresholds import resolve_alarm
from monitor.daemon.types import Score


def _score(value: float, i: int, threshold: float = 1.0, hop_s: float = 10.0) -> Score:
    return Score(source="s", model="m", score=float(value), threshold=threshold,
                 window_start_s=i * hop_s, window_end_s=i * hop_s + 10.0, ready_mono_s=0.0,
                 scored_time_s=0.0)


def _episodes(values, rule, hold_s=30.0, threshold=1.0) -> int:
    m = AlarmStateMachine("n", "s", k=getattr(rule, "k", 1), n=getattr(rule, "n", 1),
                          hold_s=hold_s, rule=rule)
    return sum(e.type == "start" for i, v in enumerate(values)
               for e in m.update(_score(v, i, threshold)))


def test_gpd_fit_recovers_shape_and_scale():
    rng = np.random.default_rng(0)
    xi, sigma = 0.2, 1.5
    y = sigma / xi * (rng.uniform(size=20_000) ** -xi - 1.0)  # GPD by inversion
    got_xi, got_sigma = fit_gpd_pwm(y)
    assert got_xi == pytest.approx(xi, abs=0.05)
    assert got_sigma == pytest.approx(sigma, rel=0.08)


def test_tail_quantiles_invert_and_extrapolate_like_the_true_distribution():
    rng = np.random.default_rng(1)
    scores = rng.exponential(1.0, 5000)
    tail = ScoreTail.fit(scores)
    assert tail.method == "gpd" and tail.n_scores == 5000 and tail.n_exceed == 500
    for p in (0.3, 0.05, 1e-3, 1e-4):  # 1e-4: 2x beyond the data
        x = float(tail.isf(p))
        assert float(tail.sf(x)) == pytest.approx(p, rel=0.05)
        assert x == pytest.approx(-np.log(p), rel=0.2)  # exponential: isf(p) = -ln p


def test_few_scores_fall_back_to_an_exponential_tail_and_too_few_are_refused():
    assert ScoreTail.fit(np.random.default_rng(2).normal(size=40)).method == "exponential"
    with pytest.raises(ValueError, match="at least 20"):
        ScoreTail.fit(np.arange(5.0))


@pytest.mark.parametrize("rule", ["kofn", "ewma", "cusum"])
def test_a_larger_budget_gives_a_lower_threshold(rule):
    tail = ScoreTail.fit(np.random.default_rng(3).gamma(2.0, 1.0, 2000))
    spec = RuleSpec(rule)
    thresholds = [RuleSimulator(tail, spec, hop_s=10, window_s=10, budget_per_day=b)
                  .threshold_for_budget(b) for b in (1.0, 10.0, 100.0)]
    assert thresholds[0] > thresholds[1] > thresholds[2]


def test_vectorised_episode_count_agrees_with_the_state_machine():
    rng = np.random.default_rng(4)
    values = rng.normal(size=4000)
    for k, n, hold_s in ((2, 3, 30.0), (1, 1, 0.0), (3, 5, 40.0)):
        above = values > 1.2
        hits = np.convolve(above.astype(int), np.ones(n, dtype=int))[:len(above)]
        want = count_episodes(hits >= k, above, hold_windows(hold_s, 10.0))
        assert _episodes(values, KOfNRule(k, n), hold_s, threshold=1.2) == want
        assert want > 5


def test_streaming_rules_match_their_vectorised_statistics():
    z = np.random.default_rng(5).normal(size=500)
    ewma, cusum = EwmaRule(mean=0, std=1, lam=0.2, h=9), CusumRule(mean=0, std=1, k_ref=0.5, h=9)
    got_e = [ewma.update(_score(v, i)).statistic for i, v in enumerate(z)]
    got_c = [cusum.update(_score(v, i)).statistic for i, v in enumerate(z)]
    np.testing.assert_allclose(got_e, ewma_series(z, 0.2), atol=1e-12)
    np.testing.assert_allclose(got_c, cusum_series(z, 0.5), atol=1e-9)


@pytest.mark.parametrize("rule", [EwmaRule(mean=0, std=1, lam=0.2, h=1.0),
                                  CusumRule(mean=0, std=1, k_ref=0.5, h=4.0)])
def test_a_single_loud_window_does_not_alarm_but_a_slow_drift_does(rule):
    quiet = np.random.default_rng(6).normal(scale=0.3, size=200)
    spike = quiet.copy()
    spike[100] = 4.0  # one loud window: over any k-of-n threshold below 4
    assert _episodes(spike, rule) == 0
    assert _episodes(spike, KOfNRule(1, 1), threshold=3.0) == 1  # what 1-of-1 would do
    drift = quiet + np.clip((np.arange(200) - 100) * 0.03, 0, None)  # +0.03 sd per window
    assert _episodes(drift, rule) == 1


def test_expected_false_alarms_match_a_long_replay_within_a_factor_of_two():
    """Tail fitted on 3000 'out-of-fold' scores; a new 20-day stream of the same machine,
    through AlarmStateMachine at the resolved threshold, for each rule."""
    rng = np.random.default_rng(7)
    draw = lambda n: rng.lognormal(0.0, 0.6, n)  # noqa: E731 - skewed like distance scores
    tail = ScoreTail.fit(draw(3000))
    cal = Calibration(tail, {}, folds=20, hop_s=10.0)
    stream = draw(20 * 8640)
    for rule in ("kofn", "ewma", "cusum"):
        alarm = AlarmConfig(rule=rule, false_alarms_per_day=5.0)
        r = resolve_alarm(cal, 0.0, alarm, hop_s=10.0, window_s=10.0)
        assert r.origin == "budget" and r.expected_per_day == pytest.approx(5.0, rel=0.2)
        m = AlarmStateMachine("n", "s", k=alarm.k, n=alarm.n, hold_s=alarm.hold_s,
                              rule=r.build_rule())
        starts = sum(e.type == "start" for i, v in enumerate(stream)
                     for e in m.update(_score(v, i, r.window_threshold)))
        observed = starts / 20.0
        assert r.expected_per_day / 2 <= observed <= r.expected_per_day * 2, (rule, observed)


def test_an_explicit_threshold_overrides_the_budget_and_gets_its_expected_rate():
    tail = ScoreTail.fit(np.random.default_rng(8).normal(size=1000))
    cal = Calibration(tail, {}, folds=20, hop_s=10.0)
    low = resolve_alarm(cal, 9.9, AlarmConfig(threshold=1.0), hop_s=10, window_s=10)
    high = resolve_alarm(cal, 9.9, AlarmConfig(threshold=3.0), hop_s=10, window_s=10)
    assert (low.origin, low.threshold) == ("config", 1.0)
    assert low.expected_per_day > high.expected_per_day
    assert "from alarm.threshold in the config" in low.describe()


def test_overlapping_windows_need_a_higher_threshold_than_the_same_budget_at_a_full_hop():
    """Half the hop doubles the windows a day; the rule's threshold must rise to stay in budget."""
    tail = ScoreTail.fit(np.random.default_rng(9).normal(size=2000))
    cal = Calibration(tail, {}, folds=20, hop_s=10.0)
    full = resolve_alarm(cal, 0.0, AlarmConfig(), hop_s=10.0, window_s=10.0)
    half = resolve_alarm(cal, 0.0, AlarmConfig(), hop_s=5.0, window_s=10.0)
    assert half.threshold > full.threshold


def test_without_calibration_the_stored_threshold_is_used_and_rules_need_one():
    r = resolve_alarm(None, 0.42, AlarmConfig(), hop_s=10, window_s=10)
    assert (r.threshold, r.origin, r.expected_per_day) == (0.42, "artifact", None)
    with pytest.raises(Exception, match="needs a model with a calibrated tail"):
        resolve_alarm(None, 0.42, AlarmConfig(rule="ewma"), hop_s=10, window_s=10)


def test_auto_is_ewma_on_a_calibrated_model_and_kofn_at_a_score_threshold_or_without_a_tail():
    cal = Calibration(ScoreTail.fit(np.random.default_rng(10).normal(size=1000)), {}, folds=20,
                      hop_s=10.0)
    assert AlarmConfig().rule == "auto"
    budget = resolve_alarm(cal, 9.9, AlarmConfig(), hop_s=10, window_s=10)
    assert (budget.rule, budget.origin, budget.score_cap) == ("ewma", "budget", 3.0)
    assert "ewma lambda 0.2, cap 3" in budget.describe()
    assert isinstance(budget.build_rule(), EwmaRule)
    at_score = resolve_alarm(cal, 9.9, AlarmConfig(threshold=2.5), hop_s=10, window_s=10)
    assert (at_score.rule, at_score.threshold) == ("kofn", 2.5)
    old = resolve_alarm(None, 0.42, AlarmConfig(), hop_s=10, window_s=10)
    assert (old.rule, old.threshold) == ("kofn", 0.42)
    assert resolve_alarm(cal, 9.9, AlarmConfig(rule="kofn"), hop_s=10, window_s=10).rule == "kofn"
    # a config with its own k of n meant k of n
    assert resolve_alarm(cal, 9.9, AlarmConfig(k=1, n=1), hop_s=10, window_s=10).rule == "kofn"


def test_capped_rules_match_their_vectorised_statistics_on_clipped_scores():
    z = np.random.default_rng(11).standard_t(2, size=500) * 2
    ewma = EwmaRule(mean=0, std=1, lam=0.2, h=9, cap=1.5)
    cusum = CusumRule(mean=0, std=1, k_ref=0.5, h=9, cap=1.5)
    got_e = [ewma.update(_score(v, i)).statistic for i, v in enumerate(z)]
    got_c = [cusum.update(_score(v, i)).statistic for i, v in enumerate(z)]
    assert (z > 1.5).sum() > 20
    np.testing.assert_allclose(got_e, ewma_series(np.minimum(z, 1.5), 0.2), atol=1e-12)
    np.testing.assert_allclose(got_c, cusum_series(np.minimum(z, 1.5), 0.5), atol=1e-9)


@pytest.mark.parametrize("rule", ["ewma", "cusum"])
def test_the_cap_keeps_the_budget_when_rare_loud_healthy_windows_escape_the_calibration(rule):
    """The tail is fitted on 3,000 healthy scores without any loud window; the stream has one
    window in 400 far out (a clank, a dropped tool): too rare for a calibration set to price.
    Capped, the observed rate stays within a factor of 2 of the expected; uncapped it does not."""
    rng = np.random.default_rng(12)
    cal = Calibration(ScoreTail.fit(rng.normal(size=3000)), {}, folds=20, hop_s=10.0)
    stream = rng.normal(size=20 * 8640)
    stream[rng.random(stream.size) < 0.0025] = 12.0

    def observed(alarm):
        r = resolve_alarm(cal, 0.0, alarm, hop_s=10.0, window_s=10.0)
        m = AlarmStateMachine("n", "s", k=2, n=3, hold_s=alarm.hold_s, rule=r.build_rule())
        starts = sum(e.type == "start" for i, v in enumerate(stream)
                     for e in m.update(_score(v, i, r.window_threshold)))
        return starts / 20.0, r.expected_per_day

    capped, expected = observed(AlarmConfig(rule=rule, false_alarms_per_day=2.0))
    assert expected / 2 <= capped <= expected * 2, (capped, expected)
    loud, expected = observed(AlarmConfig(rule=rule, false_alarms_per_day=2.0, score_cap=None))
    assert loud > 10 * expected, (loud, expected)


def test_cap_settings_are_checked():
    from monitor.daemon.thresholds import rule_problems

    assert rule_problems(AlarmConfig(score_cap=0.0), "alarm") == [
        "alarm.score_cap: must be > 0 (standard deviations of normal scores) or null for no "
        "cap, got 0.0"]
    assert "must be above cusum_k" in rule_problems(
        AlarmConfig(rule="cusum", cusum_k=1.0, score_cap=1.0), "alarm")[0]
    assert rule_problems(AlarmConfig(score_cap=None), "alarm") == []


def test_a_rule_restored_from_another_rules_checkpoint_starts_fresh():
    """The config's rule changed across a restart (auto on an upgraded alarm stage): the
    checkpoint holds a k-of-n list where an ewma level is wanted, or the other way round."""
    ewma = EwmaRule(mean=0, std=1, lam=0.2, h=1.0)
    ewma.restore([True, False, True])
    assert ewma.value == 0.0
    ewma.restore(0.75)
    assert ewma.value == 0.75
    kofn = KOfNRule(2, 3)
    kofn.restore(1.25)
    assert kofn.snapshot() == []
    kofn.restore([True, True])
    assert kofn.snapshot() == [True, True]
