"""Out-of-fold normal scores for the calibrated tail (monitor/calibration.py), and the fusion
statistics of the final model.

The threshold used to rest on the held-out 10 % of the training clips: a handful of windows per
machine ID. Here every training window is scored by a model that never saw its clip: the clips
of each machine ID are dealt into K folds; for fold j the standardiser and scorers are fitted on
the other folds and fold j is scored, with and without its machine ID. K = 2 / val_fraction (20
by default) makes each fold's model see about as many clips as the final one (95 % against
90 %): distance and Gaussian scorers fitted on fewer clips score new normal clips higher, which
would push the thresholds up for nothing. Models with a trained decoder use 5 folds (training
time).

Fusion (z-scoring each scorer per machine ID, monitor/scorers.py `Fusion`) is fitted once, on
the out-of-fold scores of every training window: an ID's statistics rest on all its clips
instead of the ~6 held-out ones, whose mean and spread were noisy enough to shift one machine's
fused scores by a whole unit against another's. The final model uses that same fusion, so the
tail below is the tail of the scores the daemon computes, from scorers that did not see the clip.
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
MIN_FOLDS = 3  # a fold to score and at least two to fit on
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


def out_of_fold_parts(cfg, embedded, dev: torch.device, *, views=None, progress: bool = True
                      ) -> tuple[dict, dict, list, int]:
    """Each scorer's scores of every window by the fold model that did not see its clip: (with
    the machine ID, without it, machine IDs, folds)."""

    clips = embedded.clips
    folds = n_folds(clips, cfg)
    fold = assign_folds(clips, folds, cfg.seed)
    ids = embedded.machine_ids
    recon = "recon" in cfg.scorer_names
    with_id: dict[str, torch.Tensor] = {}
    blind: dict[str, torch.Tensor] = {}
    for j in tqdm(range(folds), unit="fold", desc="calibrating", disable=not progress,
                  leave=False):
        score_idx = np.flatnonzero(fold == j)
        # a trained decoder stops early on the next fold, which it then does not fit on
        val_idx = np.flatnonzero(fold == (j + 1) % folds) if recon else np.zeros(0, dtype=int)
        fit_idx = np.flatnonzero((fold != j) & ~np.isin(np.arange(len(fold)), val_idx))
        std = Standardizer.fit(embedded.embeddings[fit_idx])

        def feats(idx):
            f = embedded.features(idx)
            return Features(std(f.vector), f.map, f.image)

        f_fit, f_score = feats(fit_idx), feats(score_idx)
        scorers, _ = fit_scorers(cfg, f_fit, [ids[i] for i in fit_idx],
                                 feats(val_idx) if recon else None, dev, progress=False,
                                 views=views)
        score_ids = [ids[i] for i in score_idx]
        at = torch.from_numpy(score_idx)
        with torch.inference_mode():
            for n, s in scorers.items():
                for out, these in ((with_id, score_ids), (blind, [None] * len(score_idx))):
                    v = s.score(f_score.to(dev), these).double().cpu()
                    out.setdefault(n, torch.full((len(clips),), float("nan"), dtype=torch.float64))
                    out[n][at] = v
    return with_id, blind, ids, folds


def fit_calibration(cfg, embedded, dev: torch.device, *, hop_s: float, views=None,
                    progress: bool = True) -> tuple[Calibration | None, Fusion | None]:
    """The calibrated tails of a training set and the fusion fitted on its out-of-fold scores;
    (None, None), logged, when the set is too small."""
    log = get_logger(stage="train")
    folds = n_folds(embedded.clips, cfg)
    if folds < MIN_FOLDS:
        log.warning("calibration_skipped", reason=f"a machine ID has fewer than {MIN_FOLDS} "
                    "clips; the stored threshold will be used")
        return None, None
    parts, blind_parts, ids, folds = out_of_fold_parts(cfg, embedded, dev, views=views,
                                                       progress=progress)
    finite = torch.stack([torch.isfinite(v) for v in [*parts.values(), *blind_parts.values()]])
    ok_t = finite.all(dim=0)
    ok = ok_t.numpy()
    if ok.sum() < MIN_SCORES:
        log.warning("calibration_skipped", reason=f"only {int(ok.sum())} finite out-of-fold scores")
        return None, None
    ok_ids = [m for m, good in zip(ids, ok) if good]
    fusion = Fusion.fit(cfg.fusion, {n: v[ok_t] for n, v in parts.items()}, cfg.fusion_transform,
                        ok_ids)
    with_id = fusion.combine({n: v[ok_t] for n, v in parts.items()}, ok_ids).numpy()
    without_id = fusion.combine({n: v[ok_t] for n, v in blind_parts.items()}).numpy()
    id_arr = np.array([-1 if m is None else m for m in ok_ids])
    per_id = {}
    for mid in sorted(set(id_arr.tolist()) - {-1}):
        sel = id_arr == mid
        if sel.sum() >= MIN_PER_ID_TAIL:
            per_id[int(mid)] = ScoreTail.fit(with_id[sel])
    known = id_arr != -1
    known_tail = ScoreTail.fit(with_id[known]) if known.sum() >= MIN_SCORES else None
    cal = Calibration(ScoreTail.fit(without_id), per_id, folds, float(hop_s), known_tail)
    log.info("calibrated", scores=int(ok.sum()), folds=folds, method=cal.pooled.method,
             per_id=len(per_id))
    return cal, fusion
