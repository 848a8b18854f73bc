"""Training configuration: defaults are the seed study's hyper-parameters; YAML may override."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from monitor.audio import WINDOW_S
from monitor.errors import UsageError
from monitor.yamlsafe import load_yaml_file, short_repr

THRESHOLD_METHODS = ("gamma", "quantile")
FUSION_METHODS = ("mean", "max")
FUSION_TRANSFORMS = ("log", "none")
KNN_METRICS = ("auto", "cosine", "euclidean")

# Scorers when none are asked for, by encoder (measured; README "Choosing a model"): the
# weight-free default fuses three density models on its statistics; pretrained embeddings get
# a per-ID Gaussian; the seed's log-mel image keeps its autoencoder.
DEFAULT_SCORERS = {"stats": ("diag", "diag@shape", "mahalanobis"), "mel": ("recon",),
                   "conv": ("recon",)}
PRETRAINED_DEFAULT_SCORERS = ("mahalanobis",)


def default_scorers(encoder: str) -> tuple[str, ...]:
    return DEFAULT_SCORERS.get(encoder, PRETRAINED_DEFAULT_SCORERS)


# Every window of every clip is held as audio while it is embedded: a smaller hop on long clips
# multiplies memory (a 10-minute clip at 0.01 s would be 38 GB).
MIN_TRAIN_HOP_S = 0.1


@dataclass(frozen=True)
class TrainConfig:
    encoder: str = "stats"  # weight-free default (monitor/encoders/stats.py)
    decoder: str = "mlp"
    scorers: tuple[str, ...] | None = None  # None: default_scorers(encoder)
    weights: str | None = None  # encoder weights file, for pretrained encoders
    embedding: str | None = None  # encoder-specific embedding choice (efficientat: pooled384, hidden512, both)
    decoder_dims: tuple[int, ...] | None = None  # default: the seed's widths for this encoder
    learning_rate: float = 1e-3
    batch_size: int = 32
    max_epochs: int = 500
    lr_patience: int = 10
    lr_factor: float = 0.5
    early_stop_patience: int = 20
    early_stop_min_delta: float = 1e-5
    val_fraction: float = 0.1
    threshold_method: str = "gamma"  # gamma: DCASE-style gamma fit; quantile: empirical
    threshold_quantile: float = 0.9
    knn_k: int = 10  # mean distance to the k nearest: steadier than the single nearest
    knn_metric: str = "auto"  # auto: euclidean on the stats encoder, cosine on embeddings
    fusion: str = "mean"
    fusion_transform: str = "log"  # z-normalise log scores (see monitor.scorers.Fusion)
    hop_s: float | None = None  # windows of clips longer than 10 s; default no overlap
    embed_batch_size: int = 16
    embedding_cache: str = "auto"  # auto: on for pretrained encoders, off for the cheap mel image
    seed: int = 0
    fine_tune: bool = False  # train the encoder with the cnn decoder, end to end on waves
    # score every window out of fold and store the tail the daemon's false-alarm budget needs
    # (train/calibrate.py); costs one extra fit per fold (5 decoder trainings for recon models)
    calibrate: bool = True
    fine_tune_lr: float = 1e-5  # the encoder's learning rate; the decoder keeps learning_rate
    fine_tune_epochs: int | None = None  # default max_epochs; early stopping as for the decoder
    fine_tune_batch_size: int = 8  # windows per step: backprop through the encoder needs memory
    extra: dict = field(default_factory=dict, compare=False)

    def validate(self) -> TrainConfig:
        def bad(key, msg):
            raise UsageError(f"{key}: {msg}")

        if not 0.0 < self.val_fraction < 0.9:
            bad("val_fraction", f"must be in (0, 0.9), got {self.val_fraction}")
        if self.threshold_method not in THRESHOLD_METHODS:
            bad("threshold_method", f"must be one of {THRESHOLD_METHODS}, got {self.threshold_method!r}")
        if not 0.5 <= self.threshold_quantile < 1.0:
            bad("threshold_quantile", f"must be in [0.5, 1), got {self.threshold_quantile}")
        if self.embedding_cache not in ("auto", "on", "off"):
            bad("embedding_cache", f"must be auto, on or off, got {self.embedding_cache!r}")
        if self.fusion_transform not in FUSION_TRANSFORMS:
            bad("fusion_transform", f"must be one of {FUSION_TRANSFORMS}, got {self.fusion_transform!r}")
        if self.knn_metric not in KNN_METRICS:
            bad("knn_metric", f"must be one of {KNN_METRICS}, got {self.knn_metric!r}")
        if self.fusion not in FUSION_METHODS:
            bad("fusion", f"must be one of {FUSION_METHODS}, got {self.fusion!r}")
        for key in ("batch_size", "max_epochs", "embed_batch_size", "knn_k"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            bad("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.fine_tune_lr <= 0:
            bad("fine_tune_lr", f"must be > 0, got {self.fine_tune_lr}")
        if self.fine_tune_epochs is not None and self.fine_tune_epochs < 1:
            bad("fine_tune_epochs", f"must be >= 1, got {self.fine_tune_epochs}")
        if self.fine_tune_batch_size < 2:
            bad("fine_tune_batch_size", f"must be >= 2 (the decoder has BatchNorm), got {self.fine_tune_batch_size}")
        if self.scorers is not None and not self.scorers:
            bad("scorers", "at least one scorer is needed (diag, mahalanobis, knn, recon)")
        if self.hop_s is not None and not MIN_TRAIN_HOP_S <= self.hop_s <= WINDOW_S:
            bad("hop_s", f"must be between {MIN_TRAIN_HOP_S} and {WINDOW_S:g} seconds (or "
                         f"omitted: no overlap), got {self.hop_s}")
        if not 0 < self.lr_factor < 1:
            bad("lr_factor", f"must be in (0, 1), got {self.lr_factor}")
        for key in ("lr_patience", "early_stop_patience"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.early_stop_min_delta < 0:
            bad("early_stop_min_delta", f"must be >= 0, got {self.early_stop_min_delta}")
        return self

    @property
    def scorer_names(self) -> tuple[str, ...]:
        if self.scorers:
            return tuple(self.scorers)
        # Fine-tuning trains through the reconstruction of the log-mel image: recon is its only scorer.
        return ("recon",) if self.fine_tune else default_scorers(self.encoder)

    @property
    def knn_metric_for_encoder(self) -> str:
        if self.knn_metric != "auto":
            return self.knn_metric
        return "euclidean" if self.encoder == "stats" else "cosine"

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}


def load_train_config(path: str | Path | None, **overrides) -> TrainConfig:
    """Defaults, then the YAML file's keys (unknown keys rejected), then CLI overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        loaded = load_yaml_file(p) or {}  # bounded: size, depth, alias expansion
        if not isinstance(loaded, dict):
            raise UsageError(f"{p}: expected a mapping of training settings at the top level")
        section = loaded.get("train", loaded)
        if not isinstance(section, dict):
            raise UsageError(f"{p}: train: expected a mapping of training settings, got "
                             f"{short_repr(section)}")
        known = {f.name for f in fields(TrainConfig)} - {"extra"}
        for key, value in section.items():
            if key not in known:
                raise UsageError(f"{p}: train.{short_repr(key, 60) if not isinstance(key, str) else key[:60]}: "
                                 f"unknown key; known keys: {', '.join(sorted(known))}")
            values[key] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("scorers", "decoder_dims"):
        if key in values and values[key] is not None:
            v = values[key]
            if not isinstance(v, (str, list, tuple)):
                raise UsageError(f"{key}: expected a list, got {short_repr(v)}")
            values[key] = tuple(v.split(",")) if isinstance(v, str) else tuple(v)
    if "decoder_dims" in values and values["decoder_dims"] is not None:
        dims = values["decoder_dims"]
        if not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 1_000_000
                   for x in dims) or not 2 <= len(dims) <= 16:
            raise UsageError(f"decoder_dims: expected 2-16 layer widths, integers in "
                             f"1..1000000, got {short_repr(list(dims))}")
        values["decoder_dims"] = tuple(int(x) for x in dims)
    if values.get("scorers") is not None and not all(isinstance(x, str) for x in values["scorers"]):
        raise UsageError(f"scorers: expected scorer names, got {short_repr(values['scorers'])}")
    try:
        cfg = replace(TrainConfig(), **values)
    except TypeError as exc:
        raise UsageError(f"training config: {exc}") from None
    _check_types(cfg)
    return cfg.validate()


# Fields that may be empty (None) and the type they take otherwise.
_OPTIONAL_TYPES = {"weights": str, "embedding": str, "fine_tune_epochs": int}


def _check_types(cfg: TrainConfig) -> None:
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        default = getattr(TrainConfig(), f.name)
        if f.name == "extra":
            continue
        if v is None:
            if default is not None:
                raise UsageError(f"{f.name}: must not be empty (default {short_repr(default)})")
            continue
        if default is None:
            want = _OPTIONAL_TYPES.get(f.name)
            if want is not None and (not isinstance(v, want) or isinstance(v, bool)):
                raise UsageError(f"{f.name}: expected {want.__name__}, got {type(v).__name__} "
                                 f"({short_repr(v)})")
            continue
        if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            continue
        if not isinstance(v, type(default)) or (isinstance(v, bool) and not isinstance(default, bool)):
            raise UsageError(f"{f.name}: expected {type(default).__name__}, got {type(v).__name__} "
                             f"({short_repr(v)})")
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):  # .nan passes every `<=` check
            raise UsageError(f"{f.name}: must be a finite number, got {v}")
    if cfg.hop_s is not None and (isinstance(cfg.hop_s, bool) or not isinstance(cfg.hop_s, (int, float))):
        raise UsageError(f"hop_s: expected a number of seconds, got {short_repr(cfg.hop_s)}")
