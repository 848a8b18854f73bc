"""Training configuration: defaults are the seed study's hyper-parameters; YAML may override."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from monitor.audio import WINDOW_S
from monitor.configload import ConfigError, from_mapping
from monitor.errors import UsageError
from monitor.yamlsafe import load_yaml_file, short_repr

THRESHOLD_METHODS = ("gamma", "quantile")
FUSION_METHODS = ("mean", "max")
FUSION_TRANSFORMS = ("log", "none")
KNN_METRICS = ("auto", "cosine", "euclidean")
EMBEDDING_CACHE = ("auto", "on", "off")

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
    extra: dict = field(default_factory=dict, compare=False, metadata={"yaml": False})

    def validate(self) -> TrainConfig:
        """self when every value is in range; else ConfigError naming every bad key at once."""
        problems = self.problems()
        if problems:
            raise ConfigError("training config", problems)
        return self

    def problems(self, path: str = "") -> list[str]:
        """Value checks the types cannot express, each naming its dotted path."""
        out: list[str] = []

        def check(ok: bool, key: str, msg: str) -> None:
            if not ok:
                out.append(f"{path + '.' if path else ''}{key}: {msg}")

        check(0.0 < self.val_fraction < 0.9, "val_fraction", f"must be in (0, 0.9), got {self.val_fraction}")
        for key, choices in (("threshold_method", THRESHOLD_METHODS), ("embedding_cache", EMBEDDING_CACHE),
                             ("fusion_transform", FUSION_TRANSFORMS), ("knn_metric", KNN_METRICS),
                             ("fusion", FUSION_METHODS)):
            value = getattr(self, key)
            check(value in choices, key, f"must be one of {', '.join(choices)}, got {short_repr(value)}")
        check(0.5 <= self.threshold_quantile < 1.0, "threshold_quantile",
              f"must be in [0.5, 1), got {self.threshold_quantile}")
        for key in ("batch_size", "max_epochs", "embed_batch_size", "knn_k"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("learning_rate", "fine_tune_lr"):
            check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        check(self.fine_tune_epochs is None or self.fine_tune_epochs >= 1, "fine_tune_epochs",
              f"must be >= 1, got {self.fine_tune_epochs}")
        check(self.fine_tune_batch_size >= 2, "fine_tune_batch_size",
              f"must be >= 2 (the decoder has BatchNorm), got {self.fine_tune_batch_size}")
        check(self.scorers is None or len(self.scorers) > 0, "scorers",
              "at least one scorer is needed (diag, mahalanobis, knn, recon)")
        check(self.hop_s is None or MIN_TRAIN_HOP_S <= self.hop_s <= WINDOW_S, "hop_s",
              f"must be between {MIN_TRAIN_HOP_S} and {WINDOW_S:g} seconds (or omitted: no overlap), "
              f"got {self.hop_s}")
        dims = self.decoder_dims
        check(dims is None or (2 <= len(dims) <= 16 and all(1 <= x <= 1_000_000 for x in dims)),
              "decoder_dims", f"expected 2-16 layer widths, integers in 1..1000000, "
                              f"got {short_repr(list(dims or ()))}")
        check(0 < self.lr_factor < 1, "lr_factor", f"must be in (0, 1), got {self.lr_factor}")
        for key in ("lr_patience", "early_stop_patience"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        check(self.early_stop_min_delta >= 0, "early_stop_min_delta",
              f"must be >= 0, got {self.early_stop_min_delta}")
        return out

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
    """Defaults, then the YAML file's keys, then CLI overrides; ConfigError lists every problem
    (unknown keys, wrong types, values out of range) at once, each with its dotted path."""
    section: dict = {}
    prefix = ""
    where = "training config"
    if path is not None:
        where = str(path)
        loaded = load_yaml_file(Path(path)) or {}  # bounded: size, depth, alias expansion
        if not isinstance(loaded, dict):
            raise UsageError(f"{path}: expected a mapping of training settings at the top level")
        if "train" in loaded:
            prefix, section = "train", loaded["train"]
        else:
            section = loaded
        if not isinstance(section, dict):
            raise UsageError(f"{path}: train: expected a mapping of training settings, got "
                             f"{short_repr(section)}")
    values = dict(section)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("scorers"), str):  # the CLI's --scorers knn,mahalanobis
        values["scorers"] = values["scorers"].split(",")
    problems: list[str] = []
    cfg = from_mapping(TrainConfig, values, prefix, problems)
    if cfg is not None:
        problems += cfg.problems(prefix)
    if problems or cfg is None:
        raise ConfigError(where, problems)
    return cfg
