"""Out-of-fold normal scores for the calibrated tail (monitor/calibration.py).

The threshold used to rest on the held-out 10 % of the training clips: a handful of windows per
machine ID. Here every training window is scored by a model that never saw its clip: the clips
of each machine ID are dealt into K folds; for fold j the fusion statistics come from the next
folds (j+1.., a share like the final model's held-out clips, so that an ID gets its own
statistics as it does there), the standardiser and scorers are fitted on the rest, and fold j
is scored, with and without its machine ID. K = 2 / val_fraction (20 by default) makes each
fold's model see about as many clips as the final one (85 % against 90 %): distance and
Gaussian scorers fitted on fewer clips score new normal clips higher, which would push the
thresholds up for nothing. Models with a trained decoder use 5 folds (training time).
"""

from __future__ import annotations

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from monitor.calibration import MIN_PER_ID_TAIL, MIN_SCORES, Calibration, ScoreTail
from monitor.logs import get_logger
from monitor.scorers import Features, Fusion, Standardizer
from train.fit_scorers import fit_scorers

MAX_FOLDS = 20
DECODER_FOLDS = 5  # each fold trains a decoder: time
MIN_FOLDS = 3  # one to fit on, one for the fusion statistics, one to score
CALIBRATION_HOP_S = 2.5  # clips longer than a window give overlapping windows at this hop


def calibration_hop_s(clips, window_s: float, train_hop_s: float | None) -> float | None:
    """A finer hop than training's where some clip is long enough for a second window at it;
    None: reuse the training windows as they are."""
    hop = train_hop_s if train_hop_s is not None else window_s
    if hop <= CALIBRATION_HOP_S:
        return None
    longest = 0.0
    for c in dict.fromkeys(clips):
        try:
            longest = max(longest, sf.info(str(c.path)).duration)
        except (RuntimeError, sf.LibsndfileError):
            continue  # unreadable: embed_clips skips and counts it
    return CALIBRATION_HOP_S if longest >= window_s + CALIBRATION_HOP_S else None


def assign_folds(clips, folds: int, seed: int) -> np.ndarray:
    """A fold per window: by file, dealt round-robin within each machine ID after a shuffle."""
    rng = np.random.default_rng(seed + 7919)
    by_id: dict = {}
    for c in dict.fromkeys(clips):
        by_id.setdefault(c.machine_id, []).append(c.path)
    fold_of = {}
    for mid in sorted(by_id, key=lambda m: -1 if m is None else m):
        files = by_id[mid]
        for rank, i in enumerate(rng.permutation(len(files))):
            fold_of[files[i]] = rank % folds
    return np.array([fold_of[c.path] for c in clips])


def n_folds(clips, cfg) -> int:
    counts: dict = {}
    for c in dict.fromkeys(clips):
        counts[c.machine_id] = counts.get(c.machine_id, 0) + 1
    wanted = DECODER_FOLDS if "recon" in cfg.scorer_names else MAX_FOLDS
    wanted = min(wanted, max(MIN_FOLDS, int(round(2.0 / cfg.val_fraction))))
    return min(wanted, min(counts.values()))


def n_fusion_folds(folds: int, val_fraction: float) -> int:
    return max(1, min(folds - 2, int(round(folds * val_fraction))))


def out_of_fold_scores(cfg, embedded, dev: torch.device, *, views=None, progress: bool = True
                       ) -> tuple[np.ndarray, np.ndarray, list, int]:
    """(scores with the machine ID, scores without it, machine IDs, folds) for every window."""

    clips = embedded.clips
    folds = n_folds(clips, cfg)
    n_fuse = n_fusion_folds(folds, cfg.val_fraction)
    fold = assign_folds(clips, folds, cfg.seed)
    ids = embedded.machine_ids
    with_id = np.full(len(clips), np.nan)
    without_id = np.full(len(clips), np.nan)
    for j in tqdm(range(folds), unit="fold", desc="calibrating", disable=not progress,
                  leave=False):
        score_idx = np.flatnonzero(fold == j)
        fuse_folds = [(j + 1 + i) % folds for i in range(n_fuse)]
        fuse_idx = np.flatnonzero(np.isin(fold, fuse_folds))
        fit_idx = np.flatnonzero((fold != j) & ~np.isin(fold, fuse_folds))
        std = Standardizer.fit(embedded.embeddings[fit_idx])

        def feats(idx):
            f = embedded.features(idx)
            return Features(std(f.vector), f.map, f.image)

        f_fit, f_fuse, f_score = feats(fit_idx), feats(fuse_idx), feats(score_idx)
        scorers, _ = fit_scorers(cfg, f_fit, [ids[i] for i in fit_idx], f_fuse, dev,
                                 progress=False, views=views)
        fuse_ids = [ids[i] for i in fuse_idx]
        score_ids = [ids[i] for i in score_idx]
        with torch.inference_mode():
            parts = {n: s.score(f_fuse.to(dev), fuse_ids).double().cpu() for n, s in scorers.items()}
            fusion = Fusion.fit(cfg.fusion, parts, cfg.fusion_transform, fuse_ids)
            parts = {n: s.score(f_score.to(dev), score_ids).double().cpu() for n, s in scorers.items()}
            with_id[score_idx] = fusion.combine(parts, score_ids).numpy()
            blind = [None] * len(score_idx)
            parts = {n: s.score(f_score.to(dev), blind).double().cpu() for n, s in scorers.items()}
            without_id[score_idx] = fusion.combine(parts).numpy()
    return with_id, without_id, ids, folds


def fit_calibration(cfg, embedded, dev: torch.device, *, hop_s: float, views=None,
                    progress: bool = True) -> Calibration | None:
    """The calibrated tails of a training set, or None (logged) when it is too small."""
    log = get_logger(stage="train")
    folds = n_folds(embedded.clips, cfg)
    if folds < MIN_FOLDS:
        log.warning("calibration_skipped", reason=f"a machine ID has fewer than {MIN_FOLDS} "
                    "clips; the stored threshold will be used")
        return None
    with_id, without_id, ids, folds = out_of_fold_scores(cfg, embedded, dev, views=views,
                                                         progress=progress)
    ok = np.isfinite(with_id) & np.isfinite(without_id)
    if ok.sum() < MIN_SCORES:
        log.warning("calibration_skipped", reason=f"only {int(ok.sum())} finite out-of-fold scores")
        return None
    id_arr = np.array([-1 if m is None else m for m in ids])
    per_id = {}
    for mid in sorted(set(id_arr.tolist()) - {-1}):
        sel = ok & (id_arr == mid)
        if sel.sum() >= MIN_PER_ID_TAIL:
            per_id[int(mid)] = ScoreTail.fit(with_id[sel])
    known = ok & (id_arr != -1)
    known_tail = ScoreTail.fit(with_id[known]) if known.sum() >= MIN_SCORES else None
    cal = Calibration(ScoreTail.fit(without_id[ok]), per_id, folds, float(hop_s), known_tail)
    log.info("calibrated", scores=int(ok.sum()), folds=folds, method=cal.pooled.method,
             per_id=len(per_id))
    return cal
