"""Normalisation and fusion of scorer outputs: `Standardizer` z-scores embeddings, `Fusion`
z-scores each scorer's output (per machine ID where fitted) and combines them into one score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Standardizer:
    """Per-dimension z-scoring fitted on the normal training embeddings."""

    mean: torch.Tensor  # (dim,)
    std: torch.Tensor  # (dim,)

    @classmethod
    def fit(cls, z: torch.Tensor) -> Standardizer:
        return cls(z.mean(dim=0), z.std(dim=0).clamp_min(1e-4))

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z.device)) / self.std.to(z.device)


@dataclass(frozen=True)
class Fusion:
    """z-normalise each scorer on held-out normal scores, then combine (mean or max).

    With a single scorer the raw score is kept, so a reconstruction MSE stays readable.
    """

    method: str  # "mean" | "max"
    stats: dict[str, tuple[float, float]]  # scorer -> (mean, std) of held-out normal scores
    # "log": z-normalise log scores. Distances are skewed to the right; in log units their
    # normal spread is near-Gaussian, so one member's rare huge value cannot swamp the others.
    transform: str = "none"
    # machine ID ("00") -> that ID's own statistics, so fused scores of different machines are
    # on one scale; IDs with too few held-out scores use the pooled `stats`.
    per_id: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    MIN_PER_ID = 5  # held-out normal scores an ID needs for its own statistics

    def _t(self, s: torch.Tensor) -> torch.Tensor:
        return torch.log(s.clamp_min(1e-12)) if self.transform == "log" else s

    @classmethod
    def fit(cls, method: str, parts: dict[str, torch.Tensor], transform: str = "none",
            machine_ids: Sequence[int | None] | None = None) -> Fusion:
        """Fusion statistics from normal scores that the scorers did not train on; with
        machine_ids, also per ID where an ID has MIN_PER_ID scores or more."""
        t = cls(method, {}, transform)

        def stats_of(sel) -> dict[str, tuple[float, float]]:
            out = {}
            for n, v in parts.items():
                tv = t._t(v.double()[sel])
                out[n] = (float(tv.mean()), float(tv.std().clamp_min(1e-12)) if len(tv) > 1 else 1.0)
            return out

        n_all = len(next(iter(parts.values())))
        per_id = {}
        if machine_ids is not None and len(parts) > 1:
            for mid in sorted({m for m in machine_ids if m is not None}):
                sel = torch.tensor([m == mid for m in machine_ids])
                if int(sel.sum()) >= cls.MIN_PER_ID:
                    per_id[f"{mid:02d}"] = stats_of(sel)
        return cls(method, stats_of(torch.ones(n_all, dtype=torch.bool)), transform, per_id)

    def combine(self, scores: dict[str, torch.Tensor],
                machine_ids: Sequence[int | None] | None = None) -> torch.Tensor:
        if len(scores) == 1:
            return next(iter(scores.values()))
        first = next(iter(scores.values()))
        ids = list(machine_ids) if machine_ids is not None else [None] * first.shape[0]
        keys = [f"{m:02d}" if m is not None and f"{m:02d}" in self.per_id else None for m in ids]
        z = []
        for n, s in scores.items():
            mean = torch.tensor([self.per_id[k][n][0] if k else self.stats[n][0] for k in keys],
                                dtype=s.dtype, device=s.device)
            std = torch.tensor([self.per_id[k][n][1] if k else self.stats[n][1] for k in keys],
                               dtype=s.dtype, device=s.device)
            z.append((self._t(s) - mean) / std)
        stacked = torch.stack(z)  # (scorers, batch)
        return stacked.mean(dim=0) if self.method == "mean" else stacked.max(dim=0).values

    def to_json(self) -> dict:
        out = {"method": self.method, "transform": self.transform,
               "stats": {k: list(v) for k, v in self.stats.items()}}
        if self.per_id:
            out["per_id"] = {i: {k: list(v) for k, v in st.items()} for i, st in self.per_id.items()}
        return out

    @classmethod
    def from_json(cls, d: dict) -> Fusion:
        def parse(st: dict) -> dict[str, tuple[float, float]]:
            return {k: (float(v[0]), float(v[1])) for k, v in st.items()}

        return cls(d["method"], parse(d["stats"]), d.get("transform", "none"),
                   {i: parse(st) for i, st in d.get("per_id", {}).items()})
