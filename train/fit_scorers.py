"""Fitting the scorers of one model on standardised training features: the distance scorers'
statistics and the reconstruction decoder's training loop. Used by `harken train` (train/fit.py)
and by the out-of-fold calibration (train/calibrate.py), which fits one model per fold."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from monitor.logs import get_logger
from monitor.scorers import (SCORERS, Features, KnnScorer, ReconScorer, resolve_view, scorer_kind,
                             split_scorer_name)
from train.config import TrainConfig


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    lr: float


def train_autoencoder(scorer: ReconScorer, f_train: Features, f_val: Features,
                      cfg: TrainConfig, device: torch.device, progress: bool = True) -> list[EpochLog]:
    """Adam + ReduceLROnPlateau + early stopping, all on the held-out loss; keeps the best weights."""
    log = get_logger(stage="train")
    model = scorer.model.to(device)
    x_train, y_train = (t.to(device) for t in scorer.prepare(f_train.to(device)))
    x_val, y_val = (t.to(device) for t in scorer.prepare(f_val.to(device)))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, since_best = math.inf, None, 0
    history: list[EpochLog] = []
    bar = tqdm(range(1, cfg.max_epochs + 1), unit="epoch", desc="training", disable=not progress,
               leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(x_train.shape[0], generator=gen).to(device)
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2 and scorer.needs_map:
                continue  # BatchNorm cannot train on a batch of one
            xb, yb = x_train[idx], y_train[idx]
            loss = ((model(xb) - yb) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * xb.shape[0]
        model.eval()
        with torch.inference_mode():
            val = float(torch.cat([((model(x_val[j : j + 64]) - y_val[j : j + 64]) ** 2).flatten(1)
                                   for j in range(0, x_val.shape[0], 64)]).mean())
        sched.step(val)
        entry = EpochLog(epoch, total / x_train.shape[0], val, opt.param_groups[0]["lr"])
        history.append(entry)
        log.info("epoch_done", epoch=epoch, train_loss=round(entry.train_loss, 6),
                 val_loss=round(val, 6), lr=entry.lr)
        bar.set_postfix(train=f"{entry.train_loss:.4f}", val=f"{val:.4f}")
        if val < best - cfg.early_stop_min_delta:
            best, since_best = val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= cfg.early_stop_patience:
                log.info("early_stop", epoch=epoch, best_val_loss=round(best, 6))
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def scorer_views(cfg: TrainConfig, views: dict | None) -> dict[str, list[int] | None]:
    """Which slice of the embedding each distance scorer reads: the view its name gives
    (`diag@shape`; `@all` is the whole vector), else its kind's default view for this encoder
    (the stats encoder's DEFAULT_SCORER_VIEWS)."""
    from monitor.encoders.stats import DEFAULT_SCORER_VIEWS

    wanted = DEFAULT_SCORER_VIEWS if cfg.encoder == "stats" else {}
    out: dict[str, list[int] | None] = {}
    for name in cfg.scorer_names:
        kind, view = split_scorer_name(name)
        view = wanted.get(kind) if view is None else view
        out[name] = None if view in (None, "all") else resolve_view(views, view)
    return out


def fit_scorers(cfg: TrainConfig, f_tr: Features, ids_tr: list[int | None], f_val: Features,
                dev: torch.device, progress: bool = True,
                views: dict | None = None) -> tuple[dict, list[EpochLog]]:
    """Fit every configured scorer on standardised training features (f_val: the decoder's
    early-stopping set; views: the encoder's named embedding slices). Returns
    (name -> scorer, the decoder's epoch log)."""
    scorers: dict = {}
    history: list[EpochLog] = []
    view_of = scorer_views(cfg, views)
    for name in cfg.scorer_names:
        kind = scorer_kind(name)
        if kind == "recon":
            map_shape = list(f_tr.map.shape[1:]) if f_tr.map is not None else None
            rec = ReconScorer.build(cfg.decoder, f_tr.vector.shape[1], cfg.decoder_dims, map_shape)
            rec.fit_stats(f_tr)
            history = train_autoencoder(rec, f_tr, f_val, cfg, dev, progress)
            scorers[name] = rec
        elif kind == "knn":
            scorers[name] = KnnScorer.fit(f_tr.vector, ids_tr, k=cfg.knn_k,
                                          metric=cfg.knn_metric_for_encoder, view=view_of[name])
        elif kind in ("mahalanobis", "diag"):
            scorers[name] = SCORERS[kind].fit(f_tr.vector, ids_tr, view=view_of[name])
        scorers[name].name = name  # the instance name keys its tensors and its fusion statistics
    return scorers, history
