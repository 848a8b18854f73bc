"""A detector that also knows the windows a person judged normal (monitor/reference.py).

The network is not retrained and the artifact is not touched: each scorer that keeps a normal
reference gets the judged windows added to it.
- `knn`: the windows join its bank (the machine ID's bank and the pooled one), so a window
  near one of them has a small distance, exactly as if it had been in the training set.
- `mahalanobis`, `diag`: a Gaussian cannot take a handful of extra points without its
  training set; the score becomes the smaller of the distance to the normal mean and the
  distance to the nearest judged window, both in that Gaussian's own metric (its precision
  or per-dimension spread), so the judged sound and sounds close to it score as normal while
  every other sound scores as before.
- `recon` keeps only a trained network: it is left as it is, and a model fusing it still
  reports what it reconstructs badly.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch

from monitor.scorers import POOLED, Features, KnnScorer, MahalanobisScorer


class ExemplarGaussianScorer:
    """min(distance to the Gaussian's mean, distance to the nearest exemplar) per window."""

    def __init__(self, base: MahalanobisScorer, exemplars: torch.Tensor):
        self.base = base
        self.name = base.name
        self.exemplars = exemplars  # (n, view dim) standardised, view-selected

    def score(self, f: Features, machine_ids: Sequence[int | None]) -> torch.Tensor:
        own = self.base.score(f, machine_ids)
        z = self.base._select(f.vector)
        near = torch.empty_like(own)
        ex = self.exemplars.to(z.device, z.dtype)
        for key, idx in self.base._groups(machine_ids, self.base.models).items():
            g = self.base.models[key]
            centred = dataclasses.replace(g, mean=torch.zeros_like(g.mean))
            diff = z[idx][:, None, :] - ex[None, :, :]  # (queries, exemplars, dim)
            sq = centred.sq_distance(diff.reshape(-1, z.shape[1])).reshape(len(idx), -1)
            near[idx] = sq.clamp_min(0.0).min(dim=1).values.sqrt().to(own.dtype)
        return torch.minimum(own, near)

    def config(self) -> dict:
        # an exported artifact (`harken model export`) keeps its exemplars
        return {**self.base.config(), "exemplars": int(self.exemplars.shape[0])}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.base.state_tensors(), "exemplars": self.exemplars}


def _with_bank(base: KnnScorer, z: torch.Tensor, machine_ids: Sequence[int | None]) -> KnnScorer:
    z = base._select(z)
    banks = {k: v.clone() for k, v in base.banks.items()}
    for i, mid in enumerate(machine_ids):
        key = base._key(mid, banks)
        # a window of no known machine ID (a source without machine_id) was judged normal
        # for the source as a whole: every ID's bank takes it
        targets = [k for k in banks if k != POOLED] if mid is None else [key]
        for k in targets:
            if k != POOLED:
                banks[k] = torch.cat([banks[k], z[i:i + 1].to(banks[k])])
    ids = [k for k in banks if k != POOLED]
    if ids:  # as KnnScorer builds it from an artifact: the pooled bank is every ID's bank
        banks[POOLED] = torch.cat([banks[k] for k in ids])
    else:
        banks[POOLED] = torch.cat([banks[POOLED], z.to(banks[POOLED])])
    out = KnnScorer(banks, base.k, base.metric, base.view)
    out.name = base.name
    return out


def with_reference(detector, embeddings: torch.Tensor | None,
                   machine_ids: Sequence[int | None]):
    """A shallow copy of `detector` whose scorers include the judged windows' raw embeddings
    (windows, dim); the detector itself is returned when there are none."""
    if embeddings is None or embeddings.shape[0] == 0:
        return detector
    z = detector.standardizer(embeddings.to(detector.device).float())
    scorers = {}
    for name, s in detector.scorers.items():
        if isinstance(s, KnnScorer):
            scorers[name] = _with_bank(s, z, machine_ids)
        elif isinstance(s, MahalanobisScorer):
            scorers[name] = ExemplarGaussianScorer(s, s._select(z))
        else:
            scorers[name] = s
    out = copy.copy(detector)
    out.scorers = scorers
    return out


def reference_kinds(detector) -> list[str]:
    """The scorers of `detector` that a normal verdict changes (for messages)."""
    return [n for n, s in detector.scorers.items() if isinstance(s, (KnnScorer, MahalanobisScorer))]
