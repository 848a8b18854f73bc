"""AUC and partial AUC as DCASE 2020 Task 2 defines them, written out so they can be checked by hand.

pAUC is the area under the ROC curve for FPR in [0, max_fpr], divided by max_fpr (so a perfect
detector scores 1 and a random one max_fpr / 2). This is the task's definition; note that
scikit-learn's `roc_auc_score(max_fpr=...)` applies the McClish correction instead.
"""

from __future__ import annotations

import numpy as np


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) points from (0, 0) to (1, 1); tied scores form one diagonal step."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs both normal and anomalous clips")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = np.cumsum(~y)[distinct]
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    return fpr, tpr


def auc(labels, scores) -> float:
    fpr, tpr = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def pauc(labels, scores, max_fpr: float = 0.1) -> float:
    fpr, tpr = roc_curve(labels, scores)
    stop = np.searchsorted(fpr, max_fpr, side="right")
    x, y = fpr[:stop], tpr[:stop]
    if x[-1] < max_fpr:  # interpolate the curve up to exactly max_fpr
        t_end = np.interp(max_fpr, fpr, tpr)
        x, y = np.r_[x, max_fpr], np.r_[y, t_end]
    return float(np.trapezoid(y, x) / max_fpr)


def harmonic_mean(values) -> float:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0 or np.any(v <= 0):
        return float("nan") if len(v) == 0 else 0.0
    return float(len(v) / np.sum(1.0 / v))
