"""The scored-window route: what becomes of each window the inference worker scored, and of each
alarm event that follows from it.

`ScoredRoute.on_scored` runs on the inference thread, in capture order per source: learning
sources collect their windows, sensor faults are checked, a non-finite score is counted and kept
away from the alarms, a finite one is published as a `Score`, counted (scored windows, exposure)
and given to the source's alarm state machine; its events go to the event worker (an alarm start
with its evidence job) and the open alarm's windows to its episode clip. `EventOutput.emit` runs
on the event worker and publishes each event with what follows from it (alarm state, metrics,
the log line). Each counter here has one writing thread; the stats reader takes snapshots.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

from monitor.daemon.alarm import AlarmStateMachine
from monitor.daemon.event_worker import EventWorker
from monitor.daemon.exposure import Exposure
from monitor.daemon.inference import ScoredWindow
from monitor.daemon.metrics import DaemonMetrics
from monitor.daemon.ratelimit import RateLimitedWarning
from monitor.daemon.sensor import SensorFaultMonitor
from monitor.daemon.types import AlarmEvent, Publisher, Score, ScoringModel

if TYPE_CHECKING:  # torch, soundfile and plotting only where the daemon builds them
    from monitor.daemon.episode import EpisodeRecorder
    from monitor.daemon.evidence import EvidenceStore
    from monitor.daemon.learning import LearningSources


class EventOutput:
    """On the event worker: publish one event and what follows from it, in the order the
    events happened."""

    def __init__(self, publisher: Publisher, metrics: DaemonMetrics, events: deque[AlarmEvent],
                 log):
        self.publisher = publisher
        self.metrics = metrics
        self.events = events  # recent ones (the daemon's, for tests and MQTT verdicts); bounded
        self.log = log

    def emit(self, event: AlarmEvent) -> None:
        m = self.metrics
        self.events.append(event)
        self.publisher.publish_event(event)
        if event.type == "sensor_fault":
            kind, state = event.detail["kind"], event.detail["state"]
            if state == "start":
                m.sensor_faults.labels(event.source, kind).inc()
            self.log.warning("sensor_fault_started" if state == "start" else "sensor_fault_ended",
                             source=event.source, kind=kind, fault_id=event.id,
                             value=event.detail.get("value"), limit=event.detail.get("limit"))
        elif event.type == "start":
            self.publisher.publish_alarm_state(event.source, True)
            m.alarm.labels(event.source).set(1)
            m.alarms.labels(event.source).inc()
            self.log.warning("alarm_started", source=event.source, alarm_id=event.id,
                             score=round(event.peak_score, 6), threshold=event.threshold,
                             file=event.detail.get("file"), clip=event.clip)
        elif event.type == "end":
            self.publisher.publish_alarm_state(event.source, False)
            m.alarm.labels(event.source).set(0)
            self.log.warning("alarm_ended", source=event.source, alarm_id=event.id,
                             peak_score=round(event.peak_score, 6))


class ScoredRoute:
    """Called by the inference worker only: it is the one writer of `scored_by_source`,
    `nonfinite_by_source` and the exposure counts."""

    def __init__(self, *, publisher: Publisher, metrics: DaemonMetrics,
                 alarms: Mapping[str, AlarmStateMachine], event_worker: EventWorker,
                 evidence: EvidenceStore | None, episodes: EpisodeRecorder | None,
                 learning: LearningSources | None,
                 sensor_faults: Mapping[str, SensorFaultMonitor], exposure: Exposure,
                 hop_s: Mapping[str, float], detectors: Mapping[str, ScoringModel],
                 stop: threading.Event, log):
        self.publisher = publisher
        self.metrics = metrics
        self.alarms = alarms  # the daemon's dict: an armed source's new machine is seen here
        self.event_worker = event_worker
        self.evidence = evidence
        self.episodes = episodes
        self.learning = learning
        self.sensor_faults = sensor_faults
        self.exposure = exposure
        self.hop_s = hop_s  # source -> seconds of new audio per window (the exposure it adds)
        self.detectors = detectors  # the worker's, by model key (with references, enrolments)
        self.stop = stop
        self.log = log
        self._warn = RateLimitedWarning(log, every_s=60.0)
        self.scored_by_source: dict[str, int] = {}
        self.nonfinite_by_source: dict[str, int] = {}

    def on_scored(self, sw: ScoredWindow) -> None:
        """On the inference thread, in capture order per source."""
        learning = False
        if self.learning is not None and self.learning.owns(sw):
            armed = self.learning.collect(sw)  # None: still learning, or not a usable window
            learning, sw = armed is None, armed or sw
        w = sw.window
        faults = self.sensor_faults.get(w.source)
        if faults is not None:
            for event in faults.update(w):
                self._publish_sensor_fault(event)
        if not math.isfinite(sw.score):
            # Not JSON, not comparable with a threshold: counted and kept away from the alarms.
            self.nonfinite_by_source[w.source] = self.nonfinite_by_source.get(w.source, 0) + 1
            self._warn("score_not_finite", w.source, source=w.source, score=str(sw.score),
                       file=w.label, count=self.nonfinite_by_source[w.source])
            return
        score = Score(source=w.source, model=sw.model_name, score=sw.score, threshold=sw.threshold,
                      window_start_s=w.start_time_s, window_end_s=w.end_time_s,
                      ready_mono_s=w.ready_mono_s, scored_time_s=sw.scored_time_s, label=w.label)
        self.scored_by_source[w.source] = self.scored_by_source.get(w.source, 0) + 1
        if not learning:
            self.exposure.add(w.source, self.hop_s[w.source])
        self.publisher.publish_score(score)
        m = self.metrics
        m.windows_scored.labels(w.source).inc()
        m.score.labels(w.source).set(sw.score)
        m.threshold.labels(w.source).set(sw.threshold)
        m.latency.observe(max(0.0, sw.scored_mono_s - w.ready_mono_s))
        if learning:
            return  # a learning source does not alarm
        events = self.alarms[w.source].update(score)
        for event in events:
            # Published in order on the event worker; a start gets its evidence there first,
            # so the slow part never holds up scoring.
            evidence = self._evidence_for(sw) if event.type == "start" and self.evidence else None
            self.event_worker.submit(event, evidence, stop=self.stop)
        if self.episodes is not None:
            self.episodes.observe(w, events, self.alarms[w.source].on)

    def _publish_sensor_fault(self, event: AlarmEvent) -> None:
        """Through the same path (and MQTT outbox) as alarm events."""
        self.event_worker.submit(event, stop=self.stop)

    def _evidence_for(self, sw: ScoredWindow):
        """The evidence job for an alarm start (run on the event worker). Its failure (a full
        disk, soundfile's LibsndfileError, a plotting error) is logged and counted there and
        the event goes out without the files."""
        det = self.detectors[sw.model_key]  # the source's own, with its reference
        store = self.evidence
        assert store is not None

        def save(event: AlarmEvent) -> AlarmEvent:
            log_mel = det.log_mel(sw.window.samples)
            error_map = det.error_map(sw.window.samples, sw.window.machine_id)
            clip, image = store.save(event.id, sw.window.samples, log_mel=log_mel,
                                     error_map=error_map,
                                     title=f"{event.id}: score {sw.score:.4g} > {sw.threshold:.4g}")
            return dataclasses.replace(event, clip=clip, image=image)
        return save
