"""Source states and the daemon's stats: each source's state (running, learning, stalled,
ended, stopped) published when it changes, the stats document with its metrics, and the
exposure counts saved with each stats interval.

Runs on the supervising (main) thread. It writes only the source states; every counter it
reports has its own writer elsewhere (the inference thread, the event worker, the queue, the
sources) and is read here as a snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from monitor.daemon.alarm import AlarmStateMachine
from monitor.daemon.config import SourceConfig
from monitor.daemon.event_worker import EventWorker
from monitor.daemon.exposure import Exposure
from monitor.daemon.inference import InferenceWorker, WindowQueue, percentile
from monitor.daemon.metrics import DaemonMetrics
from monitor.daemon.ratelimit import RateLimitedWarning
from monitor.daemon.ringbuffer import RingBuffer
from monitor.daemon.route import ScoredRoute
from monitor.daemon.sensor import SensorFaultMonitor
from monitor.daemon.types import Publisher, Source

if TYPE_CHECKING:  # torch only where the daemon builds it
    from monitor.daemon.learning import LearningSources


class StatsReporter:
    def __init__(self, *, source_configs: Mapping[str, SourceConfig],
                 sources: Mapping[str, Source], rings: Mapping[str, RingBuffer],
                 stall_after_s: float, publisher: Publisher, metrics: DaemonMetrics,
                 queue: WindowQueue, worker: InferenceWorker, event_worker: EventWorker,
                 route: ScoredRoute, alarms: Mapping[str, AlarmStateMachine],
                 sensor_faults: Mapping[str, SensorFaultMonitor],
                 learning: LearningSources | None, exposure: Exposure, log):
        self.source_configs = source_configs
        self.sources = sources
        self.rings = rings
        self.stall_after_s = stall_after_s
        self.publisher = publisher
        self.metrics = metrics
        self.queue = queue
        self.worker = worker
        self.event_worker = event_worker
        self.route = route
        self.alarms = alarms
        self.sensor_faults = sensor_faults
        self.learning = learning
        self.exposure = exposure
        self.log = log
        self._warn = RateLimitedWarning(log, every_s=60.0)
        self.source_states: dict[str, str] = {}
        self.started_mono = time.monotonic()  # the daemon resets it once its sources run

    # ------------------------------------------------------------------ source states

    def idle_watched_folder(self, sid: str) -> bool:
        """A watched folder that is there but has no new file is waiting, not dead (a recorder
        idle over a break or a night must not get the service restarted)."""
        cfg = self.source_configs[sid]
        return (cfg.kind == "folder" and cfg.watch
                and self.sources[sid].status().get("state") != "stalled")

    def audio_age_s(self, sid: str, now: float) -> float:
        last = self.sources[sid].status().get("last_audio_mono_s")
        ring_last = self.rings[sid].last_audio_mono_s
        stamps = [t for t in (last, ring_last) if t is not None]
        return now - (max(stamps) if stamps else self.started_mono)

    def update_source_states(self, final: bool = False) -> None:
        now = time.monotonic()
        for sid, src in self.sources.items():
            own = src.status().get("state", "running")
            cfg = self.source_configs[sid]
            if own == "ended" or src.finished:
                state = "ended"
            elif final:
                state = "stopped"
            elif (self.audio_age_s(sid, now) > max(3 * cfg.hop_s, self.stall_after_s)
                  and not (cfg.kind == "folder" and cfg.watch)):  # idle watched folder: waiting
                state = "stalled"
            else:
                state = "running" if own in ("running", "starting") else own
            if state == "running" and self.learning is not None and self.learning.is_learning(sid):
                state = "learning"  # turns "running" when the source arms (source_armed)
            self.set_source_state(sid, state)
            self.metrics.source_stalled.labels(sid).set(1 if state == "stalled" else 0)

    def set_source_state(self, sid: str, state: str) -> None:
        if self.source_states.get(sid) != state:
            self.source_states[sid] = state
            self.publisher.publish_source_state(sid, state)
            self.log.info("source_state", source=sid, state=state)

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict:
        now = time.monotonic()
        own = {sid: src.status() for sid, src in self.sources.items()}
        overruns = {sid: int(st.get("overruns", 0)) for sid, st in own.items()}
        scored = dict(self.route.scored_by_source)  # snapshots of the inference thread's counts
        nonfinite = dict(self.route.nonfinite_by_source)
        per_source = {}
        for sid in self.sources:
            faults = self.sensor_faults.get(sid)
            per_source[sid] = {"state": self.source_states.get(sid),
                               "last_audio_age_s": round(self.audio_age_s(sid, now), 3),
                               "alarm": self.alarms[sid].on,
                               "scored": scored.get(sid, 0),
                               # windows dropped by the inference queue plus what the
                               # source itself had to drop (an MQTT inbox flood)
                               "dropped": self.queue.dropped_by_source.get(sid, 0)
                               + int(own[sid].get("dropped", 0)),
                               "input_dropped": int(own[sid].get("dropped", 0)),
                               "overruns": overruns[sid],
                               "nonfinite": nonfinite.get(sid, 0),
                               # bad files (folder) or rejected payloads (mqtt)
                               "skipped": int(own[sid].get("skipped", 0))
                               + sum(own[sid].get("rejected", {}).values()),
                               "sensor_faults": dict(faults.episodes) if faults else {},
                               "sensor_faults_active": sorted(faults.active) if faults else []}
        pub = self.publisher_status()
        jsonl = {k: pub.pop(k) for k in ("jsonl_lines", "jsonl_write_failed") if k in pub}
        return {"windows_produced": self.queue.produced, "windows_scored": self.worker.scored,
                "windows_dropped": self.queue.dropped, "windows_failed": self.worker.failed,
                "windows_publish_failed": self.worker.publish_failed,
                "events_pending": self.event_worker.pending,
                "evidence_dropped": self.event_worker.evidence_dropped,
                "evidence_failed": self.event_worker.evidence_failed,
                "windows_nonfinite": sum(nonfinite.values()),
                "sensor_faults": sum(sum(f.episodes.values()) for f in self.sensor_faults.values()),
                "outbox_pending": pub.get("outbox_pending"),
                "scores_dropped_offline": pub.get("scores_dropped"),
                "mqtt": pub or None,
                "jsonl_write_failed": jsonl.get("jsonl_write_failed"),
                "overruns": sum(overruns.values()), "queue_depth": len(self.queue),
                "inference_ms_p50": percentile(self.worker.batch_ms, 50),
                "inference_ms_p95": percentile(self.worker.batch_ms, 95),
                "latency_ms_p50": percentile(self.worker.latency_ms, 50),
                "latency_ms_p95": percentile(self.worker.latency_ms, 95),
                "uptime_s": round(now - self.started_mono, 1), "sources": per_source}

    def publisher_status(self) -> dict:
        """The MQTT publisher's counters (outbox_pending, scores_dropped...); {} for JSONL only."""
        return dict(self.publisher.status())

    def publish_stats(self) -> None:
        stats = self.stats()
        m = self.metrics
        m.queue_depth.set(stats["queue_depth"])
        m.dropped(self.queue.dropped_by_source)
        if stats["outbox_pending"] is not None:
            m.outbox_pending.set(stats["outbox_pending"])
            m.mqtt_connected.set(1 if stats["mqtt"].get("connected") else 0)
            m.scores_dropped_offline.set(stats["scores_dropped_offline"] or 0)
        for sid, s in stats["sources"].items():
            m.audio_age.labels(sid).set(s["last_audio_age_s"])
            m.overruns.labels(sid).set(s["overruns"])
            m.skipped.labels(sid).set(s["skipped"])
        self.publisher.publish_stats(stats)
        try:
            self.exposure.save()
        except OSError as exc:  # the count is a caution, not a reason to stop scoring
            self._warn("exposure_not_saved", "exposure", error=str(exc))
