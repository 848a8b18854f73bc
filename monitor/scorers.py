"""Scorers: features of a batch (standardised embedding, feature map) -> anomaly scores (batch,),
higher = stranger.

- `recon`: reconstruction error of an autoencoder trained on normal embeddings (the seed's method).
- `knn`: mean distance to the k nearest normal training embeddings of the same machine ID.
- `mahalanobis`: distance to the machine ID's normal mean under a Ledoit-Wolf shrunk covariance.
- `diag`: the same with a diagonal covariance: robust with few clips per ID and many dimensions.
The distance scorers may look at one named `view` of the embedding (a slice the encoder
declares, e.g. the `stats` encoder's `level` and `shape` views).
Each scorer saves its state as named tensors plus a JSON config; nothing is pickled.
The four scorers stay in one module (about 440 lines): they share the per-ID bank base and the
`SCORERS` registry that loads them; normalisation and fusion live in monitor/fusion.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from monitor.decoders import DECODERS, CnnDecoder, default_mlp_dims, default_unet_dims
from monitor.errors import ArtifactError, UsageError
from monitor.fusion import Fusion, Standardizer  # noqa: F401 (re-exported: monitor.scorers.Fusion)

POOLED = "all"  # bank used for windows whose machine ID is unknown or was not in training


class Scorer(Protocol):
    name: str

    def score(self, f: "Features", machine_ids: Sequence[int | None]) -> torch.Tensor: ...

    def config(self) -> dict: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Features:
    """What scorers see for one batch."""

    vector: torch.Tensor  # (batch, dim) standardised clip embedding
    map: torch.Tensor | None = None  # (batch, C, f, t) encoder feature map, pooled (decoders.pool_map)
    image: torch.Tensor | None = None  # (batch, 128, 64) log-mel image, the cnn decoder's target

    def select(self, idx) -> Features:
        return Features(self.vector[idx], None if self.map is None else self.map[idx],
                        None if self.image is None else self.image[idx])

    def to(self, device) -> Features:
        return Features(*(None if t is None else t.to(device) for t in (self.vector, self.map, self.image)))


class ReconScorer:
    """Reconstruction error of an autoencoder trained on normal data.

    Vector decoders (mlp, unet) reconstruct the standardised embedding. The cnn decoder
    reconstructs the per-band standardised log-mel image from the per-channel standardised
    feature map; its squared error per time-frequency cell is the evidence map.
    """

    name = "recon"

    def __init__(self, model: nn.Module, decoder: str, dims: Sequence[int] | None = None,
                 map_shape: Sequence[int] | None = None, stats: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.decoder = decoder
        self.dims = list(dims) if dims else None
        self.map_shape = list(map_shape) if map_shape else None
        self.stats = stats or {}

    @property
    def needs_map(self) -> bool:
        return self.decoder == "cnn"

    @classmethod
    def build(cls, decoder: str, input_dim: int, dims: Sequence[int] | None = None,
              map_shape: Sequence[int] | None = None) -> ReconScorer:
        if decoder not in DECODERS:
            raise UsageError(f"unknown decoder {decoder!r}; available: {', '.join(DECODERS)}")
        if decoder == "cnn":
            if not map_shape:
                raise UsageError("the cnn decoder needs an encoder with a feature map")
            c, f, t = map_shape
            return cls(CnnDecoder(c, (f, t)), decoder, map_shape=map_shape)
        default = default_unet_dims if decoder == "unet" else default_mlp_dims
        dims = list(dims) if dims else default(input_dim)
        if dims[0] != input_dim:
            raise UsageError(f"decoder widths {dims} do not start at the embedding width {input_dim}")
        return cls(DECODERS[decoder](dims), decoder, dims)

    def fit_stats(self, f: Features) -> None:
        """Per-channel map and per-band image statistics (cnn decoder only)."""
        if not self.needs_map:
            return
        self.stats = {
            "map_mean": f.map.mean(dim=(0, 2, 3)), "map_std": f.map.std(dim=(0, 2, 3)).clamp_min(1e-4),
            "image_mean": f.image.mean(dim=(0, 2)), "image_std": f.image.std(dim=(0, 2)).clamp_min(1e-4),
        }

    def prepare(self, f: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder input, reconstruction target) for a batch."""
        if not self.needs_map:
            return f.vector, f.vector
        st = {k: v.to(f.map.device) for k, v in self.stats.items()}
        x = (f.map - st["map_mean"][:, None, None]) / st["map_std"][:, None, None]
        y = (f.image - st["image_mean"][:, None]) / st["image_std"][:, None]
        return x, y

    def errors(self, f: Features) -> torch.Tensor:
        """Squared error per reconstructed value: (batch, dim) or (batch, 128, 64)."""
        x, y = self.prepare(f)
        return (self.model(x) - y) ** 2

    def score(self, f: Features, machine_ids):
        # (batch, ...) -> (batch,) mean squared reconstruction error
        return self.errors(f).flatten(1).mean(dim=1)

    def config(self) -> dict:
        cfg: dict = {"name": self.name, "decoder": self.decoder}
        if self.dims:
            cfg["dims"] = self.dims
        if self.map_shape:
            cfg["map_shape"] = self.map_shape
        return cfg

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"ae.{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"stats.{k}": v for k, v in self.stats.items()})
        return out

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> ReconScorer:
        dims = config.get("dims")
        scorer = cls.build(config["decoder"], dims[0] if dims else 0, dims, config.get("map_shape"))
        state = {k[3:]: v for k, v in tensors.items() if k.startswith("ae.")}
        try:
            scorer.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ArtifactError(f"recon decoder weights do not match its config: {_short(exc)}") from None
        scorer.stats = {k[6:]: v for k, v in tensors.items() if k.startswith("stats.")}
        scorer.model.eval()
        return scorer


# --------------------------------------------------------------------------- distance scorers


def resolve_view(views: dict | None, name: str | None) -> list[int] | None:
    """[start, stop) of a named view of the encoder's embedding; None: the whole vector."""
    if name is None:
        return None
    if not views or name not in views:
        raise UsageError(f"this encoder has no embedding view {name!r}; "
                         f"available: {', '.join(views) if views else 'none'}")
    start, stop = (int(x) for x in views[name])
    return [start, stop]


class _PerIdScorer:
    """Shared bookkeeping: per machine ID state, pooled fallback for unknown IDs, and the view
    (slice of the embedding) the scorer looks at."""

    view: list[int] | None = None

    def _select(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.view is None else z[:, self.view[0]:self.view[1]]

    def _view_config(self) -> dict:
        return {} if self.view is None else {"view": list(self.view)}

    def _key(self, machine_id: int | None, keys) -> str:
        key = f"id_{machine_id:02d}" if machine_id is not None else POOLED
        return key if key in keys else POOLED

    def _groups(self, machine_ids: Sequence[int | None], keys) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, mid in enumerate(machine_ids):
            groups.setdefault(self._key(mid, keys), []).append(i)
        return groups


class KnnScorer(_PerIdScorer):
    name = "knn"

    def __init__(self, banks: dict[str, torch.Tensor], k: int = 1, metric: str = "cosine",
                 view: list[int] | None = None):
        self.view = list(view) if view is not None else None
        if metric not in ("cosine", "euclidean"):
            raise UsageError(f"knn metric must be cosine or euclidean, got {metric!r}")
        if k < 1:
            raise UsageError(f"knn k must be >= 1, got {k}")
        self.k = int(k)
        self.metric = metric
        self.banks = {key: self._prep(b) for key, b in banks.items()}
        if POOLED not in self.banks:
            self.banks[POOLED] = torch.cat(list(self.banks.values()))

    @classmethod
    def fit(cls, z: torch.Tensor, machine_ids: Sequence[int | None], k: int = 1,
            metric: str = "cosine", view: list[int] | None = None) -> KnnScorer:
        if view is not None:
            z = z[:, view[0]:view[1]]
        banks: dict[str, torch.Tensor] = {}
        for mid in sorted({m for m in machine_ids if m is not None}):
            idx = [i for i, m in enumerate(machine_ids) if m == mid]
            banks[f"id_{mid:02d}"] = z[idx]
        if not banks:
            banks[POOLED] = z
        return cls(banks, k, metric, view)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1) if self.metric == "cosine" else x

    def score(self, f: Features, machine_ids):
        z = self._select(f.vector)
        _check_ids(z, machine_ids)
        out = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
        for key, idx in self._groups(machine_ids, self.banks).items():
            bank = self.banks[key].to(z.device, z.dtype)
            q = self._prep(z[idx])
            # (queries, bank) distances; cosine distance = 1 - cos similarity
            d = 1.0 - q @ bank.T if self.metric == "cosine" else torch.cdist(q, bank)
            k = min(self.k, bank.shape[0])
            out[idx] = d.topk(k, dim=1, largest=False).values.mean(dim=1)
        return out

    def config(self) -> dict:
        keys = sorted(k for k in self.banks if k != POOLED)
        return {"name": self.name, "k": self.k, "metric": self.metric, "banks": keys or [POOLED],
                **self._view_config()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        keys = self.config()["banks"]
        return {f"bank.{k}": self.banks[k] for k in keys}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> KnnScorer:
        banks = {k: tensors[f"bank.{k}"] for k in config["banks"]}
        # Banks were normalised before saving when cosine; normalising again is a no-op.
        return cls(banks, config["k"], config["metric"], config.get("view"))


def ledoit_wolf_shrinkage(xc: torch.Tensor) -> tuple[float, float]:
    """(shrinkage, mu) of the Ledoit-Wolf estimator for centred rows xc (n, p).

    Computed from the n x n Gram matrix, so it costs O(n^2 p) even when p (8192 for the log-mel
    image) is far larger than n.
    """
    n, p = xc.shape
    g = xc @ xc.T  # (n, n)
    sq = torch.diagonal(g)
    mu = float(sq.sum() / (n * p))  # trace(S) / p
    s_fro2 = float((g**2).sum() / n**2)  # ||S||_F^2
    d2 = s_fro2 - 2 * mu * float(sq.sum() / n) + mu**2 * p  # ||S - mu I||_F^2
    # sum_k ||x_k x_k^T - S||_F^2 = sum_k |x_k|^4 - 2 sum_k x_k^T S x_k + n ||S||_F^2
    b_bar2 = float((sq**2).sum() - 2 * (g**2).sum() / n + n * s_fro2) / n**2
    shrink = 1.0 if d2 <= 0 else min(max(b_bar2 / d2, 0.0), 1.0)
    return shrink, mu


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk covariance of rows of x (n, p), in float64."""
    x = x.double()
    xc = x - x.mean(dim=0, keepdim=True)
    shrink, mu = ledoit_wolf_shrinkage(xc)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return shrink * mu * eye + (1 - shrink) * (xc.T @ xc / x.shape[0])


@dataclass(frozen=True)
class _Gaussian:
    """A normal class model; the precision is kept in low-rank form when dims exceed samples:
    Sigma = a I + V^T V / n  =>  d^T Sigma^-1 d = (|d|^2 - (V d)^T M^-1 (V d)) / a,
    with M = n a I + V V^T (Woodbury). Storing V (n, p) is as big as a k-NN bank, not p x p."""

    mean: torch.Tensor  # (p,)
    precision: torch.Tensor | None = None  # (p, p) when p <= n
    basis: torch.Tensor | None = None  # V: (n, p) sqrt(1 - shrink) * centred rows
    inner_inv: torch.Tensor | None = None  # M^-1: (n, n)
    ridge: float = 1.0  # a = shrink * mu
    # (p,) the group's own per-dimension spread; distances are taken in those units. Shrinking
    # towards the identity there is scale-free. None (older artifacts): no rescaling.
    scale: torch.Tensor | None = None
    diagonal: bool = False  # sum of squared scaled deviations; no correlations

    # Variance floor in standardised units: a dimension that hardly moves in training must not
    # turn a tiny deviation into a huge distance.
    VAR_FLOOR = 1e-3

    @classmethod
    def fit(cls, x: torch.Tensor, covariance: str = "full", group_scale: bool = False) -> _Gaussian:
        x = x.double()
        n, p = x.shape
        mean = x.mean(dim=0)
        xc = x - mean
        scale = None
        if group_scale or covariance == "diag":
            scale = (xc.pow(2).mean(dim=0) + cls.VAR_FLOOR).sqrt()
            xc = xc / scale
        if covariance == "diag":
            return cls(mean.float(), scale=scale.float(), diagonal=True)
        scale = None if scale is None else scale.float()
        shrink, mu = ledoit_wolf_shrinkage(xc)
        a = max(shrink * mu, 1e-8)
        if p <= n:
            cov = a * torch.eye(p, dtype=x.dtype) + (1 - shrink) * (xc.T @ xc / n)
            return cls(mean.float(), precision=torch.linalg.inv(cov).float(), ridge=a, scale=scale)
        v = xc * (1 - shrink) ** 0.5
        inner = n * a * torch.eye(n, dtype=x.dtype) + v @ v.T
        return cls(mean.float(), basis=v.float(), inner_inv=torch.linalg.inv(inner).float(), ridge=a,
                   scale=scale)

    def sq_distance(self, z: torch.Tensor) -> torch.Tensor:
        d = (z - self.mean.to(z)).double()
        if self.scale is not None:
            d = d / self.scale.to(d)
        if self.diagonal:
            return (d**2).sum(dim=1)
        if self.precision is not None:
            return ((d @ self.precision.to(d)) * d).sum(dim=1)
        vd = d @ self.basis.to(d).T  # (batch, n)
        return ((d**2).sum(dim=1) - ((vd @ self.inner_inv.to(d)) * vd).sum(dim=1)) / self.ridge

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        out = {f"mean.{key}": self.mean, f"ridge.{key}": torch.tensor([self.ridge])}
        if self.scale is not None:
            out[f"scale.{key}"] = self.scale
        if self.diagonal:
            pass
        elif self.precision is not None:
            out[f"precision.{key}"] = self.precision
        else:
            out[f"basis.{key}"] = self.basis
            out[f"inner_inv.{key}"] = self.inner_inv
        return out

    @classmethod
    def from_tensors(cls, key: str, t: dict[str, torch.Tensor], diagonal: bool = False) -> _Gaussian:
        g = cls(t[f"mean.{key}"], t.get(f"precision.{key}"), t.get(f"basis.{key}"),
                t.get(f"inner_inv.{key}"), float(t[f"ridge.{key}"][0]), t.get(f"scale.{key}"),
                diagonal)
        if diagonal and g.scale is None:
            raise ArtifactError(f"diagonal Gaussian {key!r} has no scale tensor")
        if not diagonal and g.precision is None and (g.basis is None or g.inner_inv is None):
            raise ArtifactError(f"Gaussian {key!r} has neither a precision nor a low-rank basis")
        return g


class MahalanobisScorer(_PerIdScorer):
    name = "mahalanobis"
    covariance = "full"

    def __init__(self, models: dict[str, _Gaussian], view: list[int] | None = None,
                 group_scale: bool = False):
        self.models = models
        self.view = list(view) if view is not None else None
        self.group_scale = group_scale

    @classmethod
    def fit(cls, z: torch.Tensor, machine_ids: Sequence[int | None], view: list[int] | None = None,
            group_scale: bool = True) -> MahalanobisScorer:
        """group_scale: measure each ID's distances in that ID's own per-dimension spread (the
        shrinkage target is then scale-free); off reproduces the scorer of harken <= 0.1."""
        if view is not None:
            z = z[:, view[0]:view[1]]
        groups = {POOLED: list(range(z.shape[0]))}
        for mid in sorted({m for m in machine_ids if m is not None}):
            groups[f"id_{mid:02d}"] = [i for i, m in enumerate(machine_ids) if m == mid]
        models = {key: _Gaussian.fit(z[idx], cls.covariance, group_scale)
                  for key, idx in groups.items() if len(idx) >= 2}
        if POOLED not in models:
            raise UsageError(f"{cls.name} needs at least 2 normal training windows")
        return cls(models, view, group_scale)

    def score(self, f: Features, machine_ids):
        z = self._select(f.vector)
        _check_ids(z, machine_ids)
        out = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
        for key, idx in self._groups(machine_ids, self.models).items():
            out[idx] = self.models[key].sq_distance(z[idx]).clamp_min(0.0).sqrt().to(z.dtype)
        return out

    def config(self) -> dict:
        return {"name": self.name, "groups": sorted(self.models), **self._view_config()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, g in self.models.items():
            out.update(g.tensors(key))
        return out

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> MahalanobisScorer:
        diagonal = cls.covariance == "diag"
        return cls({k: _Gaussian.from_tensors(k, tensors, diagonal) for k in config["groups"]},
                   config.get("view"))


class DiagScorer(MahalanobisScorer):
    """Per-ID Gaussian with a diagonal covariance: each dimension's deviation in units of that
    ID's own spread, squared and summed. No correlations to estimate, so it holds up with few
    clips per ID where a full covariance over hundreds of dimensions is mostly shrinkage."""

    name = "diag"
    covariance = "diag"


SCORERS = {"recon": ReconScorer, "knn": KnnScorer, "mahalanobis": MahalanobisScorer,
           "diag": DiagScorer}


def split_scorer_name(name: str) -> tuple[str, str | None]:
    """`kind@view` -> (kind, view): one scorer kind may run on several views of an embedding
    (`diag@shape` next to `diag`); a bare kind uses its default view."""
    kind, sep, view = name.partition("@")
    return kind, (view if sep else None)


def scorer_kind(name: str) -> str:
    return split_scorer_name(name)[0]


def load_scorer(config: dict, tensors: dict[str, torch.Tensor]) -> Scorer:
    """A scorer from its manifest entry and its own tensors (prefix already stripped)."""
    scorer = SCORERS[scorer_kind(config["name"])].from_state(config, tensors)
    scorer.name = config["name"]  # the instance name (`diag@shape`) keys tensors and fusion
    return scorer


def _check_ids(z: torch.Tensor, machine_ids: Sequence[int | None]) -> None:
    if len(machine_ids) != z.shape[0]:
        raise ValueError(f"{len(machine_ids)} machine IDs for a batch of {z.shape[0]}")


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(lines[:2])[:300]
