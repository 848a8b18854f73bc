"""`harken monitor`: wires sources, ring buffers, the inference worker, alarms, evidence,
publishers, metrics and systemd notification together.

Start order: publisher -> models and worker -> sources -> READY=1. Stop order is the reverse:
STOPPING=1 -> sources -> drain the queue through the worker -> final stats -> publisher
(`stopped`, flush). Every stage is a thread; the main thread only supervises (stats, watchdog,
source states) and waits on one shutdown event.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from monitor.daemon.alarm import AlarmStateMachine
from monitor.daemon.config import DaemonConfig, SourceConfig, resolve_mqtt_password, resolve_state_dir
from monitor.daemon.event_worker import EventWorker
from monitor.daemon.evidence import EvidenceStore
from monitor.daemon.exposure import Exposure
from monitor.daemon.fanout import FanoutPublisher
from monitor.daemon.inference import InferenceWorker, ScoredWindow, WindowQueue, percentile
from monitor.daemon.metrics import DaemonMetrics
from monitor.daemon.notify import SystemdNotifier
from monitor.daemon.ratelimit import RateLimitedWarning
from monitor.daemon.ringbuffer import RingBuffer
from monitor.daemon.sensor import SensorFaultMonitor
from monitor.daemon.types import AlarmEvent, AudioBlock, Publisher, Score, Source, Window
from monitor.logs import get_logger


class Daemon:
    def __init__(self, config: DaemonConfig, *, publisher: Publisher | None = None,
                 detectors: Mapping[str, object] | None = None,
                 sources: Mapping[str, Source] | None = None,
                 notifier: SystemdNotifier | None = None, state_dir: Path | None = None):
        """The keyword arguments replace real parts in tests and benchmarks (a fake slow
        detector, an in-memory publisher, a fake notify socket)."""
        self.config = config
        self.node = config.node
        self.log = get_logger(stage="daemon")
        self.shutdown = threading.Event()
        self.notifier = notifier or SystemdNotifier()
        self.state_dir = state_dir or resolve_state_dir(config)
        self.source_configs: dict[str, SourceConfig] = {s.id: s for s in config.sources}
        self._given_publisher = publisher
        self._given_detectors = detectors
        self._given_sources = sources
        self.publisher: Publisher | None = None
        self.detectors: dict[str, object] = {}
        self.sources: dict[str, Source] = {}
        self.rings: dict[str, RingBuffer] = {}
        self.alarms: dict[str, AlarmStateMachine] = {}
        self.sensor_faults: dict[str, SensorFaultMonitor] = {}
        self.nonfinite_by_source: dict[str, int] = {}
        self._warn = RateLimitedWarning(self.log, every_s=60.0)
        self.queue = WindowQueue(config.queue_max_windows)
        self.worker: InferenceWorker | None = None
        self.event_worker = EventWorker(self._emit_event)
        self.metrics: DaemonMetrics | None = None
        self.evidence: EvidenceStore | None = None
        self.events: deque[AlarmEvent] = deque(maxlen=1000)  # recent ones, for tests; bounded
        self.scored_by_source: dict[str, int] = {}
        self.exposure = Exposure(self.state_dir)  # audio seconds scored, kept across restarts
        self._source_states: dict[str, str] = {}
        self._started_mono = time.monotonic()
        self._stopped = False
        # source -> the worker's detector key for its windows (issue 16: a source with a
        # normal reference overlay gets its own, monitor/daemon/reference_watch.py)
        self.model_keys: dict[str, str] = {s.id: s.model for s in config.sources}
        self.references = None
        self.learning = None  # enrolment from the live stream (monitor/daemon/learning.py)
        self.no_verdict_alarms: dict = {}
        self.episodes = None  # each open alarm's windows, for its episode clip  # source -> its ResolvedAlarm without any verdict
        self.web_sink = None
        self.web = None
        self.mqtt_verdicts = None

    # ------------------------------------------------------------------ init

    def init_publisher(self) -> None:
        if self._given_publisher is not None:
            self.publisher = self._given_publisher
            return
        from monitor.daemon.jsonl import JsonlPublisher

        cfg = self.config
        sinks: list = []
        if cfg.mqtt is not None:
            from monitor.daemon.mqtt import MqttPublisher  # paho only when a broker is configured

            sinks.append(MqttPublisher(cfg.mqtt, node=self.node,
                                       source_ids=[s.id for s in cfg.sources],
                                       state_dir=self.state_dir,
                                       password=resolve_mqtt_password(cfg.mqtt)))
        if cfg.jsonl is not None or cfg.mqtt is None:
            sinks.append(JsonlPublisher(cfg.jsonl or "-", node=self.node))
        if cfg.web.enabled:  # issue 16: the operator's page is one more sink
            from monitor.daemon.web import WebSink

            self.web_sink = WebSink([s.id for s in cfg.sources],
                                    events_path=self.state_dir / "web_events.jsonl")
            sinks.append(self.web_sink)
        self.publisher = sinks[0] if len(sinks) == 1 else FanoutPublisher(sinks)

    def init_models(self) -> None:
        if self._given_detectors is not None:
            self.detectors = dict(self._given_detectors)
        else:
            import torch

            from monitor.detector import Detector

            if self.config.threads:
                torch.set_num_threads(self.config.threads)
            for path in dict.fromkeys(s.model for s in self.config.sources):
                self.detectors[path] = Detector.load(path, device=self.config.device,
                                                      precision=self.config.precision)
                self.log.info("model_loaded", model=path, name=self.detectors[path].name)
        overrides: dict = {}
        for s in self.config.sources:
            alarm = s.alarm or self.config.alarm
            resolved = self._resolve_alarm(s, alarm, s.machine_id)
            self.alarms[s.id] = self._alarm_machine(s, resolved)
            if resolved is not None:
                self.no_verdict_alarms[s.id] = resolved
            if self.config.sensor_faults:
                self.sensor_faults[s.id] = SensorFaultMonitor(self.node, s.id)
            if resolved is not None:
                overrides[s.id] = resolved.window_threshold
                overrides.update(self._per_id_thresholds(s, alarm))
            elif alarm.threshold is not None:
                overrides[s.id] = alarm.threshold
        self.worker = InferenceWorker(self.queue, self.detectors, on_scored=self._on_scored,
                                      batch_max=self.config.batch_max,
                                      threshold_overrides=overrides)
        from monitor.daemon.learning import LearningSources
        from monitor.daemon.reference_watch import ReferenceWatcher

        self.references = ReferenceWatcher(self.state_dir, {s.id: s.model for s in self.config.sources},
                                           self.worker, self.model_keys,
                                           on_changed=self._reference_changed)
        self.learning = LearningSources(self.state_dir, list(self.config.sources), self.worker,
                                        self.model_keys, on_armed=self._source_armed)
        self.references.held |= set(self.learning.configs)
        self.learning.start()
        self.references.poll()
        if self.config.evidence.enabled:
            ev = self.config.evidence
            self.evidence = EvidenceStore(self.state_dir / "evidence", max_count=ev.max_count,
                                          max_bytes=ev.max_bytes)
            from monitor.daemon.episode import EpisodeRecorder

            self.episodes = EpisodeRecorder(self.evidence, self.event_worker, self.shutdown)

    def _alarm_machine(self, s: SourceConfig, resolved) -> AlarmStateMachine:
        alarm = s.alarm or self.config.alarm
        return AlarmStateMachine(self.node, s.id, k=alarm.k, n=alarm.n, hold_s=alarm.hold_s,
                                 rule=resolved.build_rule() if resolved is not None else None)

    def _source_armed(self, sid: str, det, key: str) -> None:
        """An enrolled source (monitor/daemon/learning.py): its threshold and rule from the
        enrolled detector's tail, then its overlay on top of it. On the inference thread, or
        before it starts."""
        s = self.source_configs[sid]
        resolved = self._resolve_alarm(s, s.alarm or self.config.alarm, s.machine_id, det)
        overrides = self.worker.threshold_overrides
        for k in [k for k in overrides if isinstance(k, tuple) and k[0] == sid]:
            del overrides[k]  # per-ID tails of the artifact: not the enrolled model's
        overrides[sid] = resolved.window_threshold
        self.alarms[sid] = self._alarm_machine(s, resolved)
        self.no_verdict_alarms[sid] = resolved
        self.references.rebase(sid, key)

    def _reference_changed(self, sid: str, overlay) -> None:
        """On the inference worker: the threshold follows the judged windows
        (monitor/daemon/recalibration.py), logged as `threshold_updated`."""
        from monitor.daemon.recalibration import recalibrate

        no_verdict = self.no_verdict_alarms.get(sid)
        assert self.worker is not None and self.references is not None
        if no_verdict is None:
            return
        s = self.source_configs[sid]
        new = recalibrate(self.worker.detectors[self.references.models[sid]], overlay,
                          s.alarm or self.config.alarm, hop_s=s.hop_s, machine_id=s.machine_id,
                          no_verdict=no_verdict, exposure_days=self.exposure.days(sid))
        old = self.worker.threshold_overrides.get(sid)
        if old is None or new.window_threshold == old:
            return
        self.worker.threshold_overrides[sid] = new.window_threshold
        self.log.info("threshold_updated", source=sid, old=old, new=new.window_threshold,
                      expected_false_alarms_per_day=new.expected_per_day,
                      judged_windows=overlay.windows, reference_version=overlay.version,
                      exposure_days=round(self.exposure.days(sid), 4), why=new.tail)

    def _resolve_alarm(self, s: SourceConfig, alarm, machine_id: int | None, det=None):
        """The source's rule and threshold (monitor/daemon/thresholds.py), logged; None for a
        stand-in detector without a manifest (tests)."""
        from monitor.daemon.thresholds import resolve_for_detector

        det = det if det is not None else self.detectors.get(s.model)
        if det is None or not hasattr(det, "manifest"):
            return None
        resolved = resolve_for_detector(det, alarm, hop_s=s.hop_s, machine_id=machine_id)
        self.log.info("alarm_threshold", source=s.id, machine_id=machine_id, **resolved.to_json())
        return resolved

    def _per_id_thresholds(self, s: SourceConfig, alarm) -> dict:
        """(source, machine ID) -> window threshold, for a source without a configured
        machine_id whose windows carry IDs from their file names: each such window is scored
        against its ID's statistics, so it must be judged at that ID's calibrated tail, not at
        the pooled one. Keyed by the IDs the model was trained on; windows of other IDs are
        scored against the pooled statistics and use the source's (pooled) threshold."""
        det = self.detectors.get(s.model)
        if s.machine_id is not None or alarm.threshold is not None or \
                getattr(det, "calibration", None) is None:
            return {}
        trained = det.manifest.files_per_id
        ids = sorted(int(k) for k in trained if k.isdigit())
        return {(s.id, mid): self._resolve_alarm(s, alarm, mid).window_threshold for mid in ids}

    def init_sources(self) -> None:
        for s in self.config.sources:
            self.rings[s.id] = RingBuffer(s.id, window_s=s.window_s, hop_s=s.hop_s,
                                          machine_id=s.machine_id)
            if self._given_sources is not None:
                self.sources[s.id] = self._given_sources[s.id]
            else:
                self.sources[s.id] = self._build_source(s)

    def _build_source(self, s: SourceConfig) -> Source:
        if s.kind == "folder":
            from monitor.daemon.folder import FolderSource

            return FolderSource(s, keep_silent=self.config.sensor_faults,
                                played_path=self.state_dir / "folders" / f"{s.id}.played.jsonl")
        if s.kind == "mic":
            from monitor.daemon.mic import MicSource

            return MicSource(s)
        from monitor.daemon.mqtt import MqttAudioSource  # paho only when a source needs it

        assert self.config.mqtt is not None  # check-config guarantees it
        return MqttAudioSource(s, self.config.mqtt, node=self.node,
                               password=resolve_mqtt_password(self.config.mqtt),
                               stall_after_s=self.config.stall_after_s)

    def init_metrics(self) -> None:
        self.metrics = DaemonMetrics()
        for s in self.config.sources:
            self.metrics.alarm.labels(s.id).set(0)

    # ------------------------------------------------------------------ start / run / stop

    def start(self) -> None:
        self.init_publisher()
        self.init_metrics()
        self.init_models()
        self.init_sources()
        assert self.publisher is not None and self.worker is not None and self.metrics is not None
        self.publisher.start()
        if self.config.metrics.enabled:
            self.metrics.serve(self.config.metrics.host, self.config.metrics.port)
            self.log.info("metrics_serving", host=self.config.metrics.host,
                          port=self.config.metrics.port)
        self.event_worker.start()
        self.worker.start()
        mqtt_verdicts = self.config.mqtt is not None and self.config.mqtt.verdicts
        if self.web_sink is not None or mqtt_verdicts:
            from monitor.daemon.verdict_service import verdict_handler

            # one handler for the page and MQTT (the reference store locks its own files)
            on_verdict = verdict_handler(self.config, self.state_dir, self.worker, self.detectors)
            if self.web_sink is not None:
                self.start_web(on_verdict)
            if mqtt_verdicts:
                self.start_mqtt_verdicts(on_verdict)
        started: list[Source] = []
        try:
            for sid, source in self.sources.items():
                source.start(self._block_sink(sid), self._window_sink(sid))
                started.append(source)
                self._set_source_state(sid, "learning" if self.learning.is_learning(sid)
                                       else "running")
        except BaseException:
            for source in reversed(started):
                source.stop()
            self.worker.stop_when_drained()
            self.worker.join(timeout=30)
            self.event_worker.stop_when_drained()
            self.publisher.stop()
            raise
        self._started_mono = time.monotonic()
        self.notifier.ready()
        self.log.info("daemon_ready", node=self.node, sources=list(self.sources),
                      models=list(self.detectors))

    def start_web(self, on_verdict) -> None:
        from monitor.daemon.verdict_service import undo_handler
        from monitor.daemon.web import WebServer, read_token

        web = self.config.web
        self.web = WebServer(self.web_sink, host=web.host, port=web.port,
                             token=read_token(web.token_file), on_verdict=on_verdict,
                             on_undo=undo_handler(self.config, self.state_dir))
        self.web.start()

    def start_mqtt_verdicts(self, on_verdict) -> None:
        from monitor.daemon.mqtt_verdicts import MqttVerdictListener

        def latest_event(source: str) -> str | None:
            starts = [e.id for e in list(self.events) if e.source == source and e.type == "start"]
            return starts[-1] if starts else None

        assert self.config.mqtt is not None
        self.mqtt_verdicts = MqttVerdictListener(
            self.config.mqtt, node=self.node, source_ids=[s.id for s in self.config.sources],
            password=resolve_mqtt_password(self.config.mqtt), latest_event=latest_event,
            handle=on_verdict)
        self.mqtt_verdicts.start()

    def run(self) -> int:
        """Start, supervise until asked to stop or every source has ended, stop. Returns 0."""
        self.start()
        stats_every = self.config.stats_interval_s
        watchdog_every = self.notifier.watchdog_interval_s
        tick = min(x for x in (0.25, watchdog_every) if x is not None)
        next_stats = time.monotonic() + stats_every
        next_watchdog = time.monotonic()
        while not self.shutdown.wait(tick):
            now = time.monotonic()
            self._update_source_states()
            self.references.poll()
            if watchdog_every is not None and now >= next_watchdog:
                if self.alive():
                    self.notifier.watchdog()
                next_watchdog = now + watchdog_every
            if now >= next_stats:
                self.publish_stats()
                next_stats = now + stats_every
            if all(src.finished for src in self.sources.values()):
                self.log.info("sources_ended")
                break
        self.stop()
        return 0

    def request_stop(self) -> None:
        """From a signal handler: only set the event, the main loop does the rest."""
        self.shutdown.set()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.notifier.stopping()
        self.log.info("daemon_stopping")
        for sid, source in reversed(list(self.sources.items())):
            source.stop()
        if self.worker is not None and self.worker.ident is not None:
            self.worker.stop_when_drained()  # queued windows are still scored and published
            self.worker.join()
        if self.episodes is not None:
            self.episodes.flush_all()  # on this thread now: the worker has stopped
        self.event_worker.stop_when_drained()  # then their events (and evidence) go out
        if self.publisher is not None and self.metrics is not None and self.worker is not None:
            self._update_source_states(final=True)
            self.publish_stats()
        if self.web is not None:
            self.web.stop()
        if self.mqtt_verdicts is not None:
            self.mqtt_verdicts.stop()
        if self.publisher is not None:
            self.publisher.stop()
        self.log.info("daemon_stopped", scored=self.worker.scored if self.worker else 0,
                      dropped=self.queue.dropped)

    # ------------------------------------------------------------------ health

    def alive(self) -> bool:
        """Feed the watchdog only while inference runs and some source still delivers audio."""
        assert self.worker is not None
        now = time.monotonic()
        stale_after = max(30.0, 2 * (self.notifier.watchdog_interval_s or 0.0))
        if not self.worker.is_alive() or now - self.worker.heartbeat_mono_s > stale_after:
            return False
        live = [sid for sid, src in self.sources.items() if not src.finished]
        if not live:
            return True
        return any(self._idle_watched_folder(sid)
                   or self._audio_age_s(sid, now) <= self.config.watchdog_dead_s for sid in live)

    def _idle_watched_folder(self, sid: str) -> bool:
        """A watched folder that is there but has no new file is waiting, not dead (a recorder
        idle over a break or a night must not get the service restarted)."""
        cfg = self.source_configs[sid]
        return (cfg.kind == "folder" and cfg.watch
                and self.sources[sid].status().get("state") != "stalled")

    def _audio_age_s(self, sid: str, now: float) -> float:
        last = self.sources[sid].status().get("last_audio_mono_s")
        ring_last = self.rings[sid].last_audio_mono_s
        stamps = [t for t in (last, ring_last) if t is not None]
        return now - (max(stamps) if stamps else self._started_mono)

    def _update_source_states(self, final: bool = False) -> None:
        now = time.monotonic()
        for sid, src in self.sources.items():
            own = src.status().get("state", "running")
            cfg = self.source_configs[sid]
            if own == "ended" or src.finished:
                state = "ended"
            elif final:
                state = "stopped"
            elif (self._audio_age_s(sid, now) > max(3 * cfg.hop_s, self.config.stall_after_s)
                  and not (cfg.kind == "folder" and cfg.watch)):  # idle watched folder: waiting
                state = "stalled"
            else:
                state = "running" if own in ("running", "starting") else own
            if state == "running" and self.learning is not None and self.learning.is_learning(sid):
                state = "learning"  # turns "running" when the source arms (source_armed)
            self._set_source_state(sid, state)
            if self.metrics is not None:
                self.metrics.source_stalled.labels(sid).set(1 if state == "stalled" else 0)

    def _set_source_state(self, sid: str, state: str) -> None:
        if self._source_states.get(sid) != state:
            self._source_states[sid] = state
            assert self.publisher is not None
            self.publisher.publish_source_state(sid, state)
            self.log.info("source_state", source=sid, state=state)

    def stats(self) -> dict:
        assert self.worker is not None
        now = time.monotonic()
        own = {sid: src.status() for sid, src in self.sources.items()}
        overruns = {sid: int(st.get("overruns", 0)) for sid, st in own.items()}
        per_source = {}
        for sid in self.sources:
            faults = self.sensor_faults.get(sid)
            per_source[sid] = {"state": self._source_states.get(sid),
                               "last_audio_age_s": round(self._audio_age_s(sid, now), 3),
                               "alarm": self.alarms[sid].on,
                               "scored": self.scored_by_source.get(sid, 0),
                               # windows dropped by the inference queue plus what the
                               # source itself had to drop (an MQTT inbox flood)
                               "dropped": self.queue.dropped_by_source.get(sid, 0)
                               + int(own[sid].get("dropped", 0)),
                               "input_dropped": int(own[sid].get("dropped", 0)),
                               "overruns": overruns[sid],
                               "nonfinite": self.nonfinite_by_source.get(sid, 0),
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
                "windows_nonfinite": sum(self.nonfinite_by_source.values()),
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
                "uptime_s": round(now - self._started_mono, 1), "sources": per_source}

    def publisher_status(self) -> dict:
        """The MQTT publisher's counters (outbox_pending, scores_dropped...); {} for JSONL only."""
        assert self.publisher is not None
        return dict(self.publisher.status())

    def publish_stats(self) -> None:
        stats = self.stats()
        assert self.metrics is not None and self.publisher is not None
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

    # ------------------------------------------------------------------ data path

    def _block_sink(self, sid: str):
        ring = self.rings[sid]
        keys = self.model_keys

        def on_block(block: AudioBlock) -> None:
            for window in ring.push(block):
                self.queue.put_nowait(keys[sid], window)
        return on_block

    def _window_sink(self, sid: str):
        cfg = self.source_configs[sid]
        keys = self.model_keys
        if cfg.kind == "folder" and cfg.speed == "max":
            def on_window_replay(window: Window) -> None:  # not live: wait rather than drop
                self.queue.put_wait(keys[sid], window, self.shutdown)
            return on_window_replay

        def on_window(window: Window) -> None:
            self.queue.put_nowait(keys[sid], window)
        return on_window

    def _on_scored(self, sw: ScoredWindow) -> None:
        """On the inference thread, in capture order per source."""
        assert self.publisher is not None and self.metrics is not None
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
            self.exposure.add(w.source, self.source_configs[w.source].hop_s)
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
            self.event_worker.submit(event, evidence, stop=self.shutdown)
        if self.episodes is not None:
            self.episodes.observe(w, events, self.alarms[w.source].on)

    def _emit_event(self, event: AlarmEvent) -> None:
        """On the event worker: publish one event and what follows from it (alarm state,
        metrics, the log line), in the order the events happened."""
        assert self.publisher is not None and self.metrics is not None
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

    def _publish_sensor_fault(self, event: AlarmEvent) -> None:
        """Through the same path (and MQTT outbox) as alarm events."""
        self.event_worker.submit(event, stop=self.shutdown)

    def _evidence_for(self, sw: ScoredWindow):
        """The evidence job for an alarm start (run on the event worker). Its failure (a full
        disk, soundfile's LibsndfileError, a plotting error) is logged and counted there and
        the event goes out without the files."""
        assert self.worker is not None
        det = self.worker.detectors[sw.model_key]  # the source's own, with its reference
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
