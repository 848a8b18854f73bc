"""The daemon's side of enrolment (`learn_for:`, monitor/enrolment.py).

A learning source's windows are queued under their own detector key, `<model>#learn:<source>`:
a `LearningDetector` that scores them with the model as it is and keeps each window's raw
embedding, so learning costs no second pass through the encoder. The daemon hands every scored
window of a learning source to `collect` (on the inference thread, in capture order) instead
of its alarms. When the source has heard `learn_for` of audio (one window per hop), its
scorers are fitted, saved in the state directory and installed as `<model>#enrolled:<source>`,
and the source is armed (`source_armed`): its windows from then on are scored by the enrolled
detector and alarm as usual. Windows of the last learning batch that came after the one that
completed the enrolment are scored again, from their embeddings, by the enrolled detector, so
nothing after arming is judged by the old model and nothing after arming is learnt.
An already enrolled source (a restart) arms at start.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable

import torch

from monitor.daemon.config import SourceConfig, duration_s, windows_needed
from monitor.daemon.inference import ScoredWindow
from monitor.enrolment import EnrolmentStore, fit_enrolment
from monitor.logs import get_logger
from monitor.scorers import Features


class LearningDetector:
    """The model's detector, scoring as usual and keeping the raw embeddings of each batch for
    `LearningSources.collect` (popped in the same order on the same thread)."""

    def __init__(self, base):
        self.base = base
        self.pending: deque[torch.Tensor] = deque()

    def __getattr__(self, name):
        return getattr(self.base, name)

    def score_windows(self, windows, machine_ids=None):
        raw = self.base.features(windows)
        out = self.base.score_features(raw, machine_ids)["score"].double().cpu().numpy()
        self.pending.extend(raw.vector.float().cpu())  # after scoring: a failed batch adds none
        return out


class LearningSources:
    def __init__(self, state_dir, sources: list[SourceConfig], worker, model_keys: dict[str, str],
                 on_armed: Callable[[str, object, str], None]):
        """on_armed(source, enrolled detector, its key): the daemon sets the source's threshold,
        alarm rule and reference base; called on the inference thread (or before it starts)."""
        self.worker = worker
        self.model_keys = model_keys
        self.on_armed = on_armed
        self.state_dir = state_dir
        self.configs = {s.id: s for s in sources if s.learn_for is not None}
        self.learning: set[str] = set()
        # kept after arming: windows already queued under the learn key still come through it
        self.learners: dict[str, LearningDetector] = {}
        self.collected: dict[str, list[tuple[torch.Tensor, int | None]]] = {}
        self._log = get_logger(stage="learning")

    def start(self) -> None:
        """Before the worker starts: enrolled sources arm, the others begin learning."""
        for sid, cfg in self.configs.items():
            saved = EnrolmentStore(self.state_dir, sid).load()
            if saved is not None:
                embeddings, ids, meta = saved
                self._arm(sid, embeddings, ids, restored=True)
                continue
            learner = LearningDetector(self.worker.detectors[cfg.model])
            key = f"{cfg.model}#learn:{sid}"
            self.worker.detectors[key] = learner
            self.model_keys[sid] = key
            self.learning.add(sid)
            self.learners[sid] = learner
            self.collected[sid] = []
            self._log.info("source_learning", source=sid, learn_for_s=duration_s(cfg.learn_for),
                           windows_needed=self.needed(sid))

    def is_learning(self, sid: str) -> bool:
        return sid in self.learning

    def owns(self, sw: ScoredWindow) -> bool:
        """Was this window queued under a learn key (while its source learnt)?"""
        learner = self.learners.get(sw.window.source)
        return learner is not None and self.worker.detectors.get(sw.model_key) is learner

    def needed(self, sid: str) -> int:
        cfg = self.configs[sid]
        return windows_needed(duration_s(cfg.learn_for), cfg.hop_s)

    def progress(self, sid: str) -> tuple[int, int] | None:
        """(windows collected, windows needed) while learning, None once armed."""
        got = self.collected.get(sid)
        return None if got is None or sid not in self.learning else (len(got), self.needed(sid))

    def collect(self, sw: ScoredWindow) -> ScoredWindow | None:
        """For a window queued under a learn key: None while the source learns (no alarm);
        once armed, the window scored by the enrolled detector (a late window of the batch
        that completed the enrolment)."""
        sid = sw.window.source
        learner = self.learners[sid]
        embedding = learner.pending.popleft() if learner.pending else None
        if sid not in self.learning:  # armed while this batch was scored
            return self._rescored(sw, embedding)
        if embedding is None:  # cannot happen: score_windows queued one per window
            self._log.error("learning_window_lost", source=sid, file=sw.window.label)
            return None
        if not math.isfinite(sw.score) or not bool(torch.isfinite(embedding).all()):
            return None  # counted by the daemon as non-finite; never part of the reference
        got = self.collected[sid]
        got.append((embedding, sw.window.machine_id))
        if len(got) >= self.needed(sid):
            embeddings = torch.stack([e for e, _ in got])
            ids = [m for _, m in got]
            self.learning.discard(sid)
            self.collected.pop(sid)
            cfg = self.configs[sid]
            EnrolmentStore(self.state_dir, sid).save(embeddings, ids, {
                "model": cfg.model, "learn_for_s": duration_s(cfg.learn_for), "hop_s": cfg.hop_s,
                "embedding_dim": int(embeddings.shape[1]),
                "last_window_end_s": round(sw.window.end_time_s, 3)})
            self._arm(sid, embeddings, ids, restored=False)
        return None

    def _arm(self, sid: str, embeddings: torch.Tensor, ids, *, restored: bool) -> None:
        from monitor.errors import UsageError

        cfg = self.configs[sid]
        base = self.worker.detectors[cfg.model]
        dim = int(base.standardizer.mean.shape[0])
        if embeddings.shape[1] != dim:
            raise UsageError(f"{EnrolmentStore(self.state_dir, sid).root}: enrolled with "
                             f"{embeddings.shape[1]}-dim embeddings, the model {cfg.model} gives "
                             f"{dim}; was the model replaced? remove the directory to learn again")
        enrolled = fit_enrolment(base, embeddings, ids, hop_s=cfg.hop_s)
        key = f"{cfg.model}#enrolled:{sid}"
        self.worker.detectors[key] = enrolled
        self.model_keys[sid] = key
        self.on_armed(sid, enrolled, key)
        self._log.info("source_armed", source=sid, windows=int(embeddings.shape[0]),
                       restored=restored, tail=enrolled.calibration.pooled.to_json()["method"])

    def _rescored(self, sw: ScoredWindow, embedding: torch.Tensor | None) -> ScoredWindow | None:
        key = self.model_keys[sw.window.source]
        det = self.worker.detectors[key]
        if embedding is None:
            return None
        w = sw.window
        score = det.score_features(Features(embedding[None].to(det.device)), [w.machine_id])
        return dataclasses.replace(sw, model_key=key, score=float(score["score"][0]),
                                   threshold=float(self.worker._threshold(w, det)))
