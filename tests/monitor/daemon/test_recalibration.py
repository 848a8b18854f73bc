"""The threshold follows the normal reference: leave-one-verdict-out scores join the calibrated
tail, bounded by the no-verdict threshold and the largest judged score."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.daemon.config import AlarmConfig
from monitor.daemon.recalibration import judged_scores, recalibrate
from monitor.daemon.thresholds import resolve_for_detector
from monitor.detector import Detector
from monitor.reference import ReferenceStore
from tests.helpers import tone_clip
from tests.monitor.test_verdicts import fault_clip, ref_model  # noqa: F401

ALARM = AlarmConfig(k=1, n=1, hold_s=0.0)


def _resolve(det, overlay, alarm=ALARM):
    base = resolve_for_detector(det, alarm, hop_s=10.0, machine_id=None)
    return base, recalibrate(det, overlay, alarm, hop_s=10.0, machine_id=None, no_verdict=base)


def test_a_verdict_moves_the_threshold_within_its_bounds_and_undo_restores_it(tmp_path, ref_model):
    det = Detector.load(ref_model, device="cpu")
    assert det.calibration is not None
    store = ReferenceStore(tmp_path, "fan")
    judged = fault_clip(7)
    near = fault_clip(8)  # the same fault, another take: judged against the first verdict
    store.add("n1-fan-1", "v1", det.embed(judged[None]).cpu(), [None])
    one = store.load()
    base, moved = _resolve(det, one)
    alone = judged_scores(det, one)
    # with no other verdict, leave-one-out is the model's own score of the sound
    assert alone[0] == pytest.approx(det.score_windows(judged[None])[0], rel=1e-5)
    assert base.threshold < moved.threshold
    # one loud verdict in a 20-score tail asks for far more; the bound is the judged score
    assert moved.threshold == pytest.approx(alone.max())
    assert moved.expected_per_day is not None and moved.origin == "budget"

    store.add("n1-fan-2", "v2", det.embed(near[None]).cpu(), [None])
    two = store.load()
    both = judged_scores(det, two)
    assert both[0] < alone[0], "each take scored against the other take's verdict"
    _, moved2 = _resolve(det, two)
    assert base.threshold <= moved2.threshold <= max(base.threshold, both.max())

    store.undo("v2")
    store.undo("v1")
    _, restored = _resolve(det, store.load())
    assert restored.threshold == base.threshold


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
    # the refit tail asks for a little more, but no judged sound alarmed: nothing to raise for
    assert after.threshold == base.threshold
