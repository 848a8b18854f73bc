"""`harken train`: embed normal clips, fit the scorers, calibrate the threshold, save the artifact."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from monitor.artifact import save_artifact
from monitor.audio import SAMPLE_RATE_HZ, WINDOW_S
from monitor.detector import Detector, resolve_device
from monitor.encoders.registry import build_encoder
from monitor.errors import UsageError
from monitor.labels import split_dir
from monitor.logs import get_logger
from monitor.scorers import SCORERS, Features, Fusion, Standardizer, scorer_kind
from train.cache import EmbeddingCache, default_cache_dir
from train.calibrate import calibration_hop_s, fit_calibration
from train.config import TrainConfig
from train.data import data_fingerprint, embed_clips, normal_training_clips, split_held_out
from train.fit_scorers import fit_scorers
from train.finetune import (check_fine_tune_config, fine_tune_encoder, load_window_waves, re_embed,
                            tuned_encoder_tensors)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes: tells tuned weights apart in the spec (and any cache key)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def encoder_spec(cfg: TrainConfig) -> dict:
    spec: dict = {"name": cfg.encoder}
    if cfg.weights:
        spec["weights"] = str(Path(cfg.weights).resolve())
    if cfg.embedding:
        spec["embedding"] = cfg.embedding
    return spec


def calibrate_threshold(scores: np.ndarray, method: str, quantile: float) -> dict:
    """DCASE-style: fit a gamma distribution to held-out normal scores and take its quantile."""
    scores = np.asarray(scores, dtype=float)
    used = method
    value = float(np.quantile(scores, quantile))
    if method == "gamma":
        if scores.min() > 0 and len(scores) >= 3 and scores.std() > 0:
            shape, loc, scale = stats.gamma.fit(scores, floc=0.0)
            value = float(stats.gamma.ppf(quantile, shape, loc=loc, scale=scale))
        else:  # fused z-scores can be negative; a gamma fit makes no sense there
            used = "quantile"
    return {"value": value, "method": used, "quantile": quantile}


MIN_HELD_OUT_FOR_ID_THRESHOLD = 3


def per_id_thresholds(held_scores: np.ndarray, machine_ids, cfg: TrainConfig) -> dict[str, float]:
    """A threshold per machine ID from that ID's held-out normal scores (same method), for IDs
    with at least MIN_HELD_OUT_FOR_ID_THRESHOLD held-out windows; the others use the pooled one."""
    out: dict[str, float] = {}
    ids = np.array([-1 if m is None else m for m in machine_ids])
    for mid in sorted(set(ids.tolist()) - {-1}):
        sel = held_scores[ids == mid]
        if len(sel) >= MIN_HELD_OUT_FOR_ID_THRESHOLD:
            out[f"{mid:02d}"] = calibrate_threshold(sel, cfg.threshold_method,
                                                    cfg.threshold_quantile)["value"]
    return out


def score_summary(scores: np.ndarray) -> dict:
    s = np.asarray(scores, dtype=float)
    return {"n": int(len(s)), "mean": float(s.mean()), "std": float(s.std()),
            "p50": float(np.quantile(s, 0.5)), "p90": float(np.quantile(s, 0.9)),
            "p99": float(np.quantile(s, 0.99)), "max": float(s.max())}


def training_entry(cfg: TrainConfig, root: Path, embedded, n_held_out: int, history, tuned,
                   n_params: int, *, embed_s: float, fit_s: float, device) -> dict:
    """The manifest's `training` entry: where the data came from and how the fit went."""
    per_id: dict[str, int] = {}
    for c in dict.fromkeys(embedded.clips):
        key = "unknown" if c.machine_id is None else f"{c.machine_id:02d}"
        per_id[key] = per_id.get(key, 0) + 1
    best = min(history, key=lambda e: e.val_loss) if history else None
    return {
        "data_dir": str(Path(root).resolve()),
        "n_files": len(set(c.path for c in embedded.clips)),
        "n_windows": int(embedded.embeddings.shape[0]),
        "n_held_out_windows": int(n_held_out),
        "files_per_id": per_id,
        "skipped_files": embedded.skipped.total,
        "data_sha256": data_fingerprint(list(dict.fromkeys(embedded.clips))),
        "epochs": len(history),
        "best_epoch": best.epoch if best else None,
        "best_val_loss": best.val_loss if best else None,
        "decoder_parameters": int(n_params),
        "fine_tune": None if tuned is None else {
            "encoder_lr": cfg.fine_tune_lr, "epochs": len(tuned.history),
            "best_epoch": tuned.best_epoch, "val_loss_before": tuned.val_loss_before,
            "val_loss_after": tuned.val_loss_after,
            "history": [e.__dict__ for e in tuned.history]},
        "embed_seconds": round(embed_s, 3),
        "fit_seconds": round(fit_s, 3),
        "device": str(device),
        "config": cfg.to_json(),
    }


def manifest_entries(cfg: TrainConfig, spec: dict, scorers: dict, fusion: Fusion,
                     std: Standardizer, threshold: dict, held_scores: np.ndarray,
                     cal_entry: dict | None, training: dict) -> dict:
    """What the artifact's manifest says beyond what save_artifact stamps (format, versions,
    time, tensor hash), in the order it is written."""
    return {
        "name": f"{cfg.encoder}+" + "+".join(
            (cfg.decoder if scorer_kind(n) == "recon" else n) for n in cfg.scorer_names),
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "window_s": WINDOW_S,
        "encoder": spec,
        "scorers": [s.config() for s in scorers.values()],
        "fusion": fusion.to_json(),
        "normalisation": {"kind": "per-dimension z-score", "dim": int(std.mean.shape[0]),
                          "tensors": ["standardizer.mean", "standardizer.std"]},
        "threshold": threshold,
        "normal_scores": score_summary(held_scores),
        **({"calibration": cal_entry} if cal_entry is not None else {}),
        "training": training,
    }


def fit_model(data: str | Path, out: str | Path, cfg: TrainConfig, *, device: str = "auto",
              progress: bool = True, cache_dir: Path | None = None) -> dict:
    """Train and save an artifact; returns a summary dict for the CLI."""
    log = get_logger(stage="train")
    seed_everything(cfg.seed)
    dev = resolve_device(device)
    for name in cfg.scorer_names:
        if scorer_kind(name) not in SCORERS:
            raise UsageError(f"unknown scorer {name!r}; available: {', '.join(SCORERS)} "
                             "(optionally @view, e.g. diag@shape)")
        if scorer_kind(name) == "recon" and "@" in name:
            raise UsageError(f"scorer {name!r}: recon reads the whole embedding; drop the @view")
    if len(set(cfg.scorer_names)) != len(cfg.scorer_names):
        raise UsageError(f"scorers: each scorer once, got {','.join(cfg.scorer_names)}")
    check_fine_tune_config(cfg)
    root = split_dir(data, "train")
    clips = normal_training_clips(root)
    t0 = time.monotonic()
    encoder = build_encoder(encoder_spec(cfg), dev)
    use_cache = cfg.embedding_cache == "on" or (
        cfg.embedding_cache == "auto" and cfg.encoder not in ("mel", "conv", "stats"))
    cache = EmbeddingCache(cache_dir or default_cache_dir(), encoder.spec(), WINDOW_S, cfg.hop_s) if use_cache else None
    with_map = any(scorer_kind(n) == "recon" for n in cfg.scorer_names) and cfg.decoder == "cnn"
    embedded = embed_clips(clips, encoder, dev, window_s=WINDOW_S, hop_s=cfg.hop_s,
                           batch_size=cfg.embed_batch_size, progress=progress, cache=cache,
                           with_map=with_map)
    embed_s = time.monotonic() - t0
    log.info("embedded", windows=embedded.embeddings.shape[0], dim=embedded.embeddings.shape[1],
             skipped=embedded.skipped.total, seconds=round(embed_s, 2))
    tr, ho = split_held_out(embedded.clips, cfg.val_fraction, cfg.seed)
    ids = embedded.machine_ids
    ids_tr, ids_ho = [ids[i] for i in tr], [ids[i] for i in ho]
    std = Standardizer.fit(embedded.embeddings[tr])
    f_tr, f_ho = embedded.features(tr), embedded.features(ho)
    f_tr = Features(std(f_tr.vector), f_tr.map, f_tr.image)
    f_ho = Features(std(f_ho.vector), f_ho.map, f_ho.image)

    t1 = time.monotonic()
    scorers, history = fit_scorers(cfg, f_tr, ids_tr, f_ho, dev, progress,
                                   views=getattr(encoder, "views", None))
    tuned = None
    if cfg.fine_tune:  # phase 2: encoder + the warmed-up decoder, end to end on waves
        waves = load_window_waves(embedded.clips, WINDOW_S, cfg.hop_s)
        tuned = fine_tune_encoder(encoder, scorers["recon"], waves[tr], f_tr.image, waves[ho],
                                  f_ho.image, cfg, dev, progress)
        # Re-embed with the tuned encoder so the standardiser and held-out scores match it.
        vectors, maps = re_embed(encoder, waves, dev, cfg.fine_tune_batch_size)
        del waves
        std = Standardizer.fit(vectors[tr])
        f_tr = Features(std(vectors[tr]), maps[tr], f_tr.image)
        f_ho = Features(std(vectors[ho]), maps[ho], f_ho.image)
    fit_s = time.monotonic() - t1

    calibration, oof_fusion = None, None
    # a fine-tuned encoder would need a fine-tuning per fold: not calibrated
    if tuned is None and cfg.calibrate:
        cal_hop = calibration_hop_s(embedded.clips, WINDOW_S, cfg.hop_s)
        cal_set = embedded if cal_hop is None else embed_clips(
            list(dict.fromkeys(embedded.clips)), encoder, dev, window_s=WINDOW_S, hop_s=cal_hop,
            batch_size=cfg.embed_batch_size, progress=progress, cache=None, with_map=with_map,
            desc="embedding (calibration)")
        calibration, oof_fusion = fit_calibration(
            cfg, cal_set, dev, hop_s=cal_hop or cfg.hop_s or WINDOW_S,
            views=getattr(encoder, "views", None), progress=progress)

    with torch.inference_mode():
        parts = {n: s.score(f_ho.to(dev), ids_ho).double().cpu() for n, s in scorers.items()}
    # the fusion fitted on every training window's out-of-fold scores (train/calibrate.py) when
    # there is one; else the held-out clips' (a handful per machine ID)
    fusion = oof_fusion or Fusion.fit(cfg.fusion, parts, cfg.fusion_transform, ids_ho)
    held_scores = fusion.combine(parts, ids_ho).numpy()
    # The pooled threshold serves windows whose machine ID is unknown (a mic, an MQTT feed
    # without machine_id): those are scored against the pooled banks, so calibrate it that way.
    if any(n in ("knn", "mahalanobis") for n in scorers):
        with torch.inference_mode():
            unknown = [None] * len(ids_ho)
            pooled_parts = {n: s.score(f_ho.to(dev), unknown).double().cpu()
                            for n, s in scorers.items()}
        pooled_scores = fusion.combine(pooled_parts).numpy()  # unknown IDs: pooled statistics
    else:
        pooled_scores = held_scores
    threshold = calibrate_threshold(pooled_scores, cfg.threshold_method, cfg.threshold_quantile)
    threshold["per_id"] = per_id_thresholds(held_scores, ids_ho, cfg)

    tensors = {"standardizer.mean": std.mean, "standardizer.std": std.std}
    spec = encoder.spec()
    if tuned is not None:
        encoder_tensors = tuned_encoder_tensors(encoder)
        tensors.update(encoder_tensors)
        spec = {**spec, "fine_tuned": True, "tuned_sha256": tensors_digest(encoder_tensors)}
    for n, s in scorers.items():
        tensors.update({f"scorer.{n}.{k}": v for k, v in s.state_tensors().items()})
    cal_entry = None
    if calibration is not None:
        cal_entry, cal_tensors = calibration.to_manifest()
        tensors.update({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                        for k, v in cal_tensors.items()})
    n_params = sum(p.numel() for s in scorers.values() if hasattr(s, "model")
                   for p in s.model.parameters())
    training = training_entry(cfg, root, embedded, len(ho), history, tuned, n_params,
                              embed_s=embed_s, fit_s=fit_s, device=dev)
    manifest = manifest_entries(cfg, spec, scorers, fusion, std, threshold, held_scores,
                                cal_entry, training)
    # Round trip before it replaces anything: what we wrote must load.
    path = save_artifact(out, manifest, tensors, verify=lambda p: Detector.load(p, device="cpu"))
    log.info("model_saved", path=str(path), threshold=round(threshold["value"], 6),
             epochs=len(history))
    return {"model": str(path), "threshold": threshold["value"], "epochs": len(history),
            "calibration": None if calibration is None else {
                "scores": calibration.pooled.n_scores, "folds": calibration.folds,
                "method": calibration.pooled.method, "exceedances": calibration.pooled.n_exceed,
                "per_id_tails": len(calibration.per_id)},
            "history": [e.__dict__ for e in history], "n_windows": int(embedded.embeddings.shape[0]),
            "embed_seconds": embed_s, "fit_seconds": fit_s, "parameters": int(n_params),
            "fine_tune": None if tuned is None else {
                "epochs": len(tuned.history), "best_epoch": tuned.best_epoch,
                "val_loss_before": tuned.val_loss_before, "val_loss_after": tuned.val_loss_after}}
