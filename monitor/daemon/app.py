"""`harken monitor`: wires sources, ring buffers, the inference worker, alarms, evidence,
publishers, metrics and systemd notification together. Each concern it wires is its own unit:
sinks and sources by kind (build.py), thresholds and rules (source_alarms.py), the scored-window
route and event outputs (route.py), source states and stats (stats.py).

Init order (`init()`): publisher -> metrics -> event outputs -> models, alarms and worker ->
evidence -> route -> sources -> stats. Start order: publisher -> metrics server -> event worker
-> inference worker -> verdict listeners -> sources -> READY=1. Stop order is its exact reverse:
STOPPING=1 -> sources -> verdict listeners (a verdict sent during shutdown is refused, never
half applied) -> drain the queue through the worker -> episodes -> event worker -> final stats
-> metrics server -> publisher (`stopped`, flush). Every stage is a thread; the main thread only supervises
(stats, watchdog, source states) and waits on one shutdown event.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from monitor.daemon.alarm import AlarmStateMachine
from monitor.daemon.build import build_publisher, build_source
from monitor.daemon.config import DaemonConfig, SourceConfig, resolve_state_dir
from monitor.daemon.event_worker import EventWorker
from monitor.daemon.evidence import EvidenceStore
from monitor.daemon.exposure import Exposure
from monitor.daemon.inference import InferenceWorker, ScoredWindow, WindowQueue
from monitor.daemon.metrics import DaemonMetrics
from monitor.daemon.notify import SystemdNotifier
from monitor.daemon.ringbuffer import RingBuffer
from monitor.daemon.route import EventOutput, ScoredRoute
from monitor.daemon.sensor import SensorFaultMonitor
from monitor.daemon.source_alarms import SourceAlarms
from monitor.daemon.stats import StatsReporter
from monitor.daemon.types import AlarmEvent, AudioBlock, Publisher, ScoringModel, Source, Window
from monitor.logs import get_logger


class Daemon:
    def __init__(self, config: DaemonConfig, *, publisher: Publisher | None = None,
                 detectors: Mapping[str, ScoringModel] | None = None,
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
        self.detectors: dict[str, ScoringModel] = {}
        self.sources: dict[str, Source] = {}
        self.rings: dict[str, RingBuffer] = {}
        self.alarms: dict[str, AlarmStateMachine] = {}
        self.sensor_faults: dict[str, SensorFaultMonitor] = {}
        self.queue = WindowQueue(config.queue_max_windows)
        self.worker: InferenceWorker | None = None
        self.event_output: EventOutput | None = None
        self.event_worker: EventWorker | None = None
        self.route: ScoredRoute | None = None  # scored windows -> scores, alarms, evidence
        self.reporter: StatsReporter | None = None  # source states, stats, metrics
        self.metrics: DaemonMetrics | None = None
        self.evidence: EvidenceStore | None = None
        self.events: deque[AlarmEvent] = deque(maxlen=1000)  # recent ones, for tests; bounded
        self.exposure = Exposure(self.state_dir)  # audio seconds scored, kept across restarts
        self._stopped = False
        # source -> the worker's detector key for its windows (issue 16: a source with a
        # normal reference overlay gets its own, monitor/daemon/reference_watch.py)
        self.model_keys: dict[str, str] = {s.id: s.model for s in config.sources}
        self.references = None
        self.learning = None  # enrolment from the live stream (monitor/daemon/learning.py)
        self.source_alarms: SourceAlarms | None = None  # thresholds and rules per source
        self.episodes = None  # each open alarm's windows, for its episode clip
        self.web_sink = None
        self.web = None
        self.mqtt_verdicts = None

    # ------------------------------------------------------------------ init

    def init(self) -> None:
        """Build every part, in dependency order; nothing runs yet."""
        self.init_publisher()
        self.init_metrics()
        self.init_events()
        self.init_models()
        self.init_evidence()
        self.init_route()
        self.init_sources()
        self.init_stats()

    def init_publisher(self) -> None:
        if self._given_publisher is not None:
            self.publisher = self._given_publisher
            return
        self.publisher, self.web_sink = build_publisher(self.config, self.state_dir)

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
        self.source_alarms = SourceAlarms(self.config, self.detectors, self.alarms, self.exposure,
                                          self.log)
        overrides = self.source_alarms.build()
        if self.config.sensor_faults:
            for s in self.config.sources:
                self.sensor_faults[s.id] = SensorFaultMonitor(self.node, s.id)
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

    def init_evidence(self) -> None:
        if self.config.evidence.enabled:
            ev = self.config.evidence
            self.evidence = EvidenceStore(self.state_dir / "evidence", max_count=ev.max_count,
                                          max_bytes=ev.max_bytes)
            from monitor.daemon.episode import EpisodeRecorder

            self.episodes = EpisodeRecorder(self.evidence, self.event_worker, self.shutdown)

    def _source_armed(self, sid: str, det, key: str) -> None:
        """An enrolled source: its alarm from the enrolled detector, then its overlay on it."""
        self.source_alarms.armed(sid, det, self.worker.threshold_overrides)
        self.references.rebase(sid, key)

    def _reference_changed(self, sid: str, overlay) -> None:
        """On the inference worker: the threshold follows the judged windows."""
        self.source_alarms.recalibrate(sid, overlay, self.worker, self.references.models[sid])

    def init_sources(self) -> None:
        for s in self.config.sources:
            self.rings[s.id] = RingBuffer(s.id, window_s=s.window_s, hop_s=s.hop_s,
                                          machine_id=s.machine_id)
            if self._given_sources is not None:
                self.sources[s.id] = self._given_sources[s.id]
            else:
                self.sources[s.id] = build_source(self.config, s, self.state_dir)

    def init_metrics(self) -> None:
        self.metrics = DaemonMetrics()
        for s in self.config.sources:
            self.metrics.alarm.labels(s.id).set(0)

    def init_events(self) -> None:
        """Alarm events go out on their own worker, with their evidence (event_worker.py)."""
        assert self.publisher is not None and self.metrics is not None
        self.event_output = EventOutput(self.publisher, self.metrics, self.events, self.log)
        self.event_worker = EventWorker(self.event_output.emit)

    def init_route(self) -> None:
        assert self.publisher is not None and self.metrics is not None
        assert self.worker is not None and self.event_worker is not None
        self.route = ScoredRoute(publisher=self.publisher, metrics=self.metrics,
                                 alarms=self.alarms, event_worker=self.event_worker,
                                 evidence=self.evidence, episodes=self.episodes,
                                 learning=self.learning, sensor_faults=self.sensor_faults,
                                 exposure=self.exposure,
                                 hop_s={sid: s.hop_s for sid, s in self.source_configs.items()},
                                 detectors=self.worker.detectors, stop=self.shutdown, log=self.log)

    def init_stats(self) -> None:
        assert self.publisher is not None and self.metrics is not None
        assert self.worker is not None and self.event_worker is not None and self.route is not None
        self.reporter = StatsReporter(
            source_configs=self.source_configs, sources=self.sources, rings=self.rings,
            stall_after_s=self.config.stall_after_s, publisher=self.publisher,
            metrics=self.metrics, queue=self.queue, worker=self.worker,
            event_worker=self.event_worker, route=self.route, alarms=self.alarms,
            sensor_faults=self.sensor_faults, learning=self.learning, exposure=self.exposure,
            log=self.log)

    # ------------------------------------------------------------------ start / run / stop

    def start(self) -> None:
        self.init()
        assert self.publisher is not None and self.worker is not None and self.metrics is not None
        assert self.event_worker is not None and self.reporter is not None
        self.publisher.start()
        if self.config.metrics.enabled:
            self.metrics.serve(self.config.metrics.host, self.config.metrics.port)
            self.log.info("metrics_serving", host=self.config.metrics.host,
                          port=self.config.metrics.port)
        self.event_worker.start()
        self.worker.start()
        self.start_verdicts()
        self.start_sources()
        self.reporter.started_mono = time.monotonic()
        self.notifier.ready()
        self.log.info("daemon_ready", node=self.node, sources=list(self.sources),
                      models=list(self.detectors))

    def start_sources(self) -> None:
        """Each source into its ring (or straight into the queue); on a failure the ones
        already started, the workers and the publisher are stopped again."""
        assert self.publisher is not None and self.worker is not None
        assert self.event_worker is not None and self.reporter is not None
        started: list[Source] = []
        try:
            for sid, source in self.sources.items():
                source.start(self._block_sink(sid), self._window_sink(sid))
                started.append(source)
                self.reporter.set_source_state(sid, "learning" if self.learning.is_learning(sid)
                                               else "running")
        except BaseException:
            for source in reversed(started):
                source.stop()
            self.worker.stop_when_drained()
            self.worker.join(timeout=30)
            self.event_worker.stop_when_drained()
            self.publisher.stop()
            raise

    def start_verdicts(self) -> None:
        """The operator's page and the MQTT verdict topics, when configured, with one handler
        for both (the reference store locks its own files)."""
        from monitor.daemon import verdict_service as verdicts

        mqtt_verdicts = self.config.mqtt is not None and self.config.mqtt.verdicts
        if self.web_sink is None and not mqtt_verdicts:
            return
        on_verdict = verdicts.verdict_handler(self.config, self.state_dir, self.worker,
                                              self.detectors)
        if self.web_sink is not None:
            self.web = verdicts.web_listener(self.config, self.state_dir, self.web_sink, on_verdict)
            self.web.start()
        if mqtt_verdicts:
            self.mqtt_verdicts = verdicts.mqtt_listener(self.config, self.events, on_verdict)
            self.mqtt_verdicts.start()

    def run(self) -> int:
        """Start, supervise until asked to stop or every source has ended, stop. Returns 0."""
        self.start()
        assert self.reporter is not None
        stats_every = self.config.stats_interval_s
        watchdog_every = self.notifier.watchdog_interval_s
        tick = min(x for x in (0.25, watchdog_every) if x is not None)
        next_stats = time.monotonic() + stats_every
        next_watchdog = time.monotonic()
        while not self.shutdown.wait(tick):
            now = time.monotonic()
            self.reporter.update_source_states()
            self.references.poll()
            if watchdog_every is not None and now >= next_watchdog:
                if self.alive():
                    self.notifier.watchdog()
                next_watchdog = now + watchdog_every
            if now >= next_stats:
                self.reporter.publish_stats()
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
        if self.mqtt_verdicts is not None:
            self.mqtt_verdicts.stop()
        if self.web is not None:
            self.web.stop()
        if self.worker is not None and self.worker.ident is not None:
            self.worker.stop_when_drained()  # queued windows are still scored and published
            self.worker.join()
        if self.episodes is not None:
            self.episodes.flush_all()  # on this thread now: the worker has stopped
        if self.event_worker is not None:
            self.event_worker.stop_when_drained()  # then their events (and evidence) go out
        if self.reporter is not None:
            self.reporter.update_source_states(final=True)
            self.reporter.publish_stats()
        if self.metrics is not None:
            self.metrics.stop()
        if self.publisher is not None:
            self.publisher.stop()
        self.log.info("daemon_stopped", scored=self.worker.scored if self.worker else 0,
                      dropped=self.queue.dropped)

    # ------------------------------------------------------------------ health and stats

    def alive(self) -> bool:
        """Feed the watchdog only while inference runs and some source still delivers audio."""
        assert self.worker is not None and self.reporter is not None
        now = time.monotonic()
        stale_after = max(30.0, 2 * (self.notifier.watchdog_interval_s or 0.0))
        if not self.worker.is_alive() or now - self.worker.heartbeat_mono_s > stale_after:
            return False
        live = [sid for sid, src in self.sources.items() if not src.finished]
        if not live:
            return True
        return any(self.reporter.idle_watched_folder(sid)
                   or self.reporter.audio_age_s(sid, now) <= self.config.watchdog_dead_s
                   for sid in live)

    def stats(self) -> dict:
        assert self.reporter is not None
        return self.reporter.stats()

    @property
    def scored_by_source(self) -> dict[str, int]:
        return self.route.scored_by_source if self.route is not None else {}

    @property
    def nonfinite_by_source(self) -> dict[str, int]:
        return self.route.nonfinite_by_source if self.route is not None else {}

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
        """The worker's callback: it is built before the learning sources the route needs."""
        assert self.route is not None
        self.route.on_scored(sw)
