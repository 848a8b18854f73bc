import numpy as np
import pytest

from train.metrics import auc, harmonic_mean, pauc, roc_curve


def test_auc_by_hand():
    # 2 anomalous (1) vs 3 normal (0). Pairs (a > n): 0.8 beats all 3; 0.4 beats 0.1 and 0.35,
    # ties 0.4 (half) -> (3 + 2.5) / 6.
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    assert auc(y, s) == pytest.approx(5.5 / 6)


def test_pauc_by_hand():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    # ROC: (0,0) -> (0,.5) -> (1/3,1) [tie step] -> (2/3,1) -> (1,1).
    # Area for FPR in [0, .5]: 1/3 * (.5 + 1) / 2 + (1/2 - 1/3) * 1 = 0.41667; / 0.5.
    assert pauc(y, s, max_fpr=0.5) == pytest.approx((0.25 + 1 / 6) / 0.5)
    # Up to FPR 0.1 the curve rises from .5 to .65 along the tie diagonal: mean .575.
    assert pauc(y, s, max_fpr=0.1) == pytest.approx(0.575)


def test_perfect_random_and_inverted():
    y = np.array([0] * 50 + [1] * 50)
    assert auc(y, np.arange(100)) == 1.0
    assert pauc(y, np.arange(100)) == 1.0
    assert auc(y, -np.arange(100)) == 0.0
    assert auc(y, np.zeros(100)) == pytest.approx(0.5)
    assert pauc(y, np.zeros(100), 0.1) == pytest.approx(0.05)


def test_matches_mann_whitney_on_random_data():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + y * 0.7
    pos, neg = s[y == 1], s[y == 0]
    mw = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auc(y, s) == pytest.approx(mw)
    fpr, tpr = roc_curve(y, s)
    assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)


def test_single_class_is_an_error_and_hmean():
    with pytest.raises(ValueError):
        auc(np.zeros(4), np.arange(4))
    assert harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.9, None]) == pytest.approx(0.9)
