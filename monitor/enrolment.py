"""Enrolment from the live stream (`learn_for:` on a source): the model's scorers fitted on the
windows a source heard while learning, without retraining the encoder.

The encoder and its standardisation stay the artifact's; each scorer that keeps a normal
reference is fitted again, with its own settings (k, metric, view), on the enrolled windows:
a k-NN bank, a Gaussian (`mahalanobis`, `diag`). `recon` needs a trained decoder and is
refused (`enrolment_problem`, at config check). The fusion statistics and the calibrated tail
come from out-of-fold scores of the enrolled windows (contiguous folds: neighbouring windows
overlap), through `Fusion.fit` and `ScoreTail.fit` as in training, so the source's threshold
is taken from its false-alarm budget by the daemon's usual code (monitor/daemon/thresholds.py).

What was learnt is kept in `<state_dir>/enrolment/<source>/` (`enrolment.json` and
`embeddings.safetensors`: raw embeddings (windows, dim), machine_ids (windows,) -1 unknown),
each file replaced atomically; a restart fits the same scorers from it again and does not
learn again. The artifact is never touched.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from monitor.calibration import MIN_SCORES, Calibration, ScoreTail
from monitor.errors import UsageError
from monitor.manifest import Manifest
from monitor.reference import _fsync_replace
from monitor.scorers import Features, Fusion, KnnScorer, MahalanobisScorer, scorer_kind

FOLDS = 5
MIN_WINDOWS = MIN_SCORES  # the out-of-fold scores must be enough for a calibrated tail
FITTABLE = ("knn", "mahalanobis", "diag")


def enrolment_problem(manifest: Manifest) -> str | None:
    """Why this model's scorers cannot be fitted on the live stream, or None."""
    names = [str(s.get("name")) for s in manifest.scorers]
    bad = [n for n in names if scorer_kind(n) not in FITTABLE]
    if not bad:
        return None
    return (f"the model's scorer {bad[0]} needs a trained decoder and cannot be fitted on the "
            f"live stream; learn_for takes models whose scorers are {', '.join(FITTABLE)} "
            "(train one with `scorers: [knn]`, for example)")


def _refit(scorer, z: torch.Tensor, machine_ids: Sequence[int | None]):
    """A scorer of the same kind and settings fitted on standardised embeddings z."""
    base = getattr(scorer, "base", scorer)  # an exported model's exemplars are replaced too
    if isinstance(base, KnnScorer):
        out = KnnScorer.fit(z, machine_ids, k=base.k, metric=base.metric, view=base.view)
    elif isinstance(base, MahalanobisScorer):
        out = type(base).fit(z, machine_ids, view=base.view, group_scale=base.group_scale)
    else:
        raise UsageError(f"scorer {base.name}: cannot be fitted on the live stream")
    out.name = base.name
    return out


def _fit_all(detector, z: torch.Tensor, machine_ids: Sequence[int | None]) -> dict:
    return {name: _refit(s, z, machine_ids) for name, s in detector.scorers.items()}


def fit_enrolment(detector, embeddings: torch.Tensor, machine_ids: Sequence[int | None], *,
                  hop_s: float):
    """A shallow copy of `detector` (sharing the encoder) whose scorers, fusion and calibration
    come from these raw embeddings (windows, dim)."""
    n = int(embeddings.shape[0])
    if n < MIN_WINDOWS:
        raise UsageError(f"enrolment needs at least {MIN_WINDOWS} windows, got {n}")
    ids = list(machine_ids)
    with torch.inference_mode():
        z = detector.standardizer(embeddings.to(detector.device).float())
        folds = min(FOLDS, n)
        bounds = np.linspace(0, n, folds + 1).astype(int)
        oof: dict[str, torch.Tensor] = {name: torch.empty(n, dtype=torch.float64)
                                        for name in detector.scorers}
        for a, b in zip(bounds[:-1], bounds[1:]):
            rest = [i for i in range(n) if not a <= i < b]
            fitted = _fit_all(detector, z[rest], [ids[i] for i in rest])
            held = Features(z[a:b], None, None)
            for name, s in fitted.items():
                oof[name][a:b] = s.score(held, ids[a:b]).double().cpu()
        if len(oof) > 1:
            fusion = Fusion.fit(detector.fusion.method, oof, detector.fusion.transform,
                                machine_ids=ids)
        else:
            fusion = detector.fusion  # one scorer: its raw score, as in training
        fused = fusion.combine(oof, ids).double().numpy()
        scorers = _fit_all(detector, z, ids)
    tail = ScoreTail.fit(fused)
    out = copy.copy(detector)
    out.scorers = scorers
    out.fusion = fusion
    out.calibration = Calibration(tail, {}, folds, float(hop_s))
    out.threshold = float(np.max(fused))  # used only where no budget applies
    out.thresholds_per_id = {}
    out.manifest = detector.manifest.with_updates(enrolment={"windows": n, "hop_s": float(hop_s)})
    return out


class EnrolmentStore:
    def __init__(self, state_dir: str | Path, source: str):
        self.root = Path(state_dir) / "enrolment" / source
        self.source = source

    @property
    def meta_path(self) -> Path:
        return self.root / "enrolment.json"

    def load(self) -> tuple[torch.Tensor, list[int | None], dict] | None:
        """(raw embeddings, machine ids, meta), None when the source has not been enrolled."""
        try:
            meta = json.loads(self.meta_path.read_text())
            tensors = load_file(str(self.root / meta["file"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{self.root}: unreadable enrolment ({str(exc)[:200]}); remove the "
                             "directory to learn again") from None
        ids = [None if int(i) < 0 else int(i) for i in tensors["machine_ids"].tolist()]
        return tensors["embeddings"].float(), ids, meta

    def save(self, embeddings: torch.Tensor, machine_ids: Sequence[int | None], meta: dict) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        ids = torch.tensor([-1 if m is None else int(m) for m in machine_ids], dtype=torch.int64)
        tmp = self.root / ".embeddings.safetensors.tmp"
        save_file({"embeddings": embeddings.float().cpu().contiguous(), "machine_ids": ids},
                  str(tmp))
        _fsync_replace(tmp, self.root / "embeddings.safetensors")
        meta = {**meta, "source": self.source, "file": "embeddings.safetensors",
                "windows": int(embeddings.shape[0]), "armed_time_s": round(time.time(), 3)}
        tmp = self.root / ".enrolment.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        _fsync_replace(tmp, self.meta_path)
        return meta

