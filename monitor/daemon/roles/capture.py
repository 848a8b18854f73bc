"""`role: capture`: the sources of a cheap edge box, each complete window published as one
window message (monitor/daemon/windowwire.py) at QoS 1 on `<prefix>/<node>/<source>/window`
through a durable outbox (window_outbox.py). Nothing is scored here.

What needs the audio or the list of sources is done here too, as the single box does it, through
a second client, an MqttPublisher with its own durable outbox (it owns `<prefix>/<node>/status`):
source states, sensor-fault events (`sensor_faults: true`, monitor/daemon/sensor.py) on
`<prefix>/<node>/<source>/event`, Home Assistant discovery (`mqtt.discovery`), and evidence
clips of the alarm stage's alarm starts (capture_evidence.py).

Threads: the sources (as in the single-box daemon) cut windows into one bounded queue; one
sender thread writes them to the outbox and hands at most IN_CLIENT_MAX of them at a time to
paho; paho's thread removes a row on its PUBACK. Sensor-fault events and evidence clips go out
on one event worker (monitor/daemon/event_worker.py). The main thread supervises.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import deque
from pathlib import Path

from monitor.daemon import windowwire
from monitor.daemon.config import DaemonConfig, SourceConfig, resolve_mqtt_password, resolve_state_dir
from monitor.daemon.event_worker import EventWorker
from monitor.daemon.evidence import EvidenceStore
from monitor.daemon.mqtt_publisher import MqttPublisher
from monitor.daemon.notify import SystemdNotifier
from monitor.daemon.outbox import PubackTracker
from monitor.daemon.ratelimit import RateLimitedWarning
from monitor.daemon.ringbuffer import RingBuffer
from monitor.daemon.roles.capture_evidence import CaptureEvidence, RecentWindows
from monitor.daemon.roles.session import RoleConnection
from monitor.daemon.sensor import SensorFaultMonitor
from monitor.daemon.roles.window_outbox import WindowOutbox
from monitor.daemon.types import AlarmEvent, AudioBlock, Source, Window
from monitor.logs import get_logger

IN_CLIENT_MAX = 64  # windows handed to paho at once: the rest wait on disk, not in memory
QUEUE_MAX_WINDOWS = 256  # windows cut but not yet on disk
SEQ_BLOCK = 1000  # sequence numbers reserved on disk at a time


class SeqCounter:
    """Per-source window numbers that never repeat across restarts: blocks of SEQ_BLOCK are
    reserved in `<state>/capture_seq.json` (atomically replaced), so a restart skips ahead to
    the next block (a gap the alarm stage waits out) instead of re-using numbers."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._reserved: dict[str, int] = json.loads(path.read_text())
        except FileNotFoundError:
            self._reserved = {}
        self._next = dict(self._reserved)
        self._lock = threading.Lock()

    def take(self, source: str) -> int:
        with self._lock:
            seq = self._next.get(source, 0)
            self._next[source] = seq + 1
            if seq >= self._reserved.get(source, 0):
                self._reserved[source] = seq + SEQ_BLOCK
                tmp = self.path.with_suffix(".tmp")
                with open(tmp, "w") as f:
                    json.dump(self._reserved, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            return seq


def build_source(cfg: DaemonConfig, s: SourceConfig, state_dir: Path) -> Source:
    """The same source classes as the single-box daemon."""
    if s.kind == "folder":
        from monitor.daemon.folder import FolderSource

        return FolderSource(s, played_path=state_dir / "folders" / f"{s.id}.played.jsonl")
    if s.kind == "mic":
        from monitor.daemon.mic import MicSource

        return MicSource(s)
    from monitor.daemon.mqtt import MqttAudioSource

    assert cfg.mqtt is not None
    return MqttAudioSource(s, cfg.mqtt, node=cfg.node, password=resolve_mqtt_password(cfg.mqtt),
                           stall_after_s=cfg.stall_after_s)


class CaptureRole:
    def __init__(self, cfg: DaemonConfig, *, notifier: SystemdNotifier | None = None):
        self.cfg = cfg
        self.log = get_logger(stage="capture", node=cfg.node)
        self._warn = RateLimitedWarning(self.log, every_s=60.0)
        self.shutdown = threading.Event()
        self.notifier = notifier or SystemdNotifier()
        self.state_dir = resolve_state_dir(cfg)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.source_configs = {s.id: s for s in cfg.sources}
        base_id = cfg.mqtt.client_id or f"harken-capture-{cfg.node}"
        self.conn = RoleConnection(cfg, client_id=base_id, persistent=False,
                                   on_connected=self._on_connected, stage="capture",
                                   announce=False)
        self.prefix, self.node = self.conn.prefix, self.conn.node
        self.conn.client.on_publish = self._on_publish
        self.conn.client.on_message = self._on_message
        # Events, states and discovery as the single box publishes them, durable as there.
        self.publisher = MqttPublisher(dataclasses.replace(cfg.mqtt, client_id=f"{base_id}-pub"),
                                       node=cfg.node, source_ids=list(self.source_configs),
                                       state_dir=self.state_dir,
                                       password=resolve_mqtt_password(cfg.mqtt),
                                       drain_timeout_s=cfg.distributed.drain_timeout_s)
        self.event_worker = EventWorker(self._emit)
        self.sensor_faults = ({sid: SensorFaultMonitor(self.node, sid) for sid in self.source_configs}
                              if cfg.sensor_faults else {})
        self.recent: RecentWindows | None = None
        self.evidence: CaptureEvidence | None = None
        if cfg.evidence.enabled:
            self.recent = RecentWindows(self.source_configs)
            store = EvidenceStore(self.state_dir / "evidence", max_count=cfg.evidence.max_count,
                                  max_bytes=cfg.evidence.max_bytes)
            self.evidence = CaptureEvidence(store, self.recent, self.event_worker,
                                            self._publish_evidence, self.log)
        self.outbox = WindowOutbox(self.state_dir / "window_outbox.sqlite",
                                   max_rows=cfg.distributed.window_outbox_max)
        self.seq = SeqCounter(self.state_dir / "capture_seq.json")
        self.rings = {s.id: RingBuffer(s.id, window_s=s.window_s, hop_s=s.hop_s,
                                       machine_id=s.machine_id) for s in cfg.sources}
        self.sources: dict[str, Source] = {}
        self._queue: deque[Window] = deque()
        self._cond = threading.Condition()
        self.queue_dropped = 0
        self._acks = PubackTracker()
        self._cursor = 0  # highest row id handed to paho on this connection
        self._reset_cursor = threading.Event()
        self.published = 0
        self.acked = 0
        self._sender = threading.Thread(target=self._send_loop, name="harken-capture-sender",
                                        daemon=True)

    # ------------------------------------------------------------------ run

    def request_stop(self) -> None:
        self.shutdown.set()

    def run(self) -> int:
        self.publisher.start()
        self.event_worker.start()
        self.conn.start()
        self._sender.start()
        for s in self.cfg.sources:
            self.sources[s.id] = source = build_source(self.cfg, s, self.state_dir)
            source.start(self._block_sink(s.id), self._window_sink(s))
            self._publish_state(s.id, "running")
        self.notifier.ready()
        self.log.info("capture_ready", sources=list(self.sources), outbox_pending=len(self.outbox))
        ended: set[str] = set()
        while not self.shutdown.wait(0.25):
            for sid, src in self.sources.items():
                if src.finished and sid not in ended:
                    ended.add(sid)
                    self._publish_state(sid, "ended")
            if len(ended) == len(self.sources):
                self.log.info("sources_ended")
                break
        return self.stop()

    def stop(self) -> int:
        self.notifier.stopping()
        for src in reversed(list(self.sources.values())):
            src.stop()
        deadline = time.monotonic() + self.cfg.distributed.drain_timeout_s
        while (self._queue or len(self.outbox)) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.shutdown.set()
        with self._cond:
            self._cond.notify_all()
        self._sender.join(timeout=10)
        pending = len(self.outbox)
        if pending:
            self.log.warning("window_outbox_not_drained", outbox_pending=pending)
        self.conn.stop()
        self.outbox.close()
        self.event_worker.stop_when_drained()  # the last clips and faults, then their publisher
        for sid, src in self.sources.items():
            if not src.finished:
                self.publisher.publish_source_state(sid, "stopped")
        self.publisher.stop()
        self.log.info("capture_stopped", published=self.published, acked=self.acked,
                      outbox_pending=pending, outbox_dropped=self.outbox.dropped,
                      queue_dropped=self.queue_dropped)
        return 0

    # ------------------------------------------------------------------ data path

    def _block_sink(self, sid: str):
        ring = self.rings[sid]

        def on_block(block: AudioBlock) -> None:
            for window in ring.push(block):
                self._enqueue(window, wait=False)
        return on_block

    def _window_sink(self, s: SourceConfig):
        wait = s.kind == "folder" and s.speed == "max"  # not live: wait rather than drop

        def on_window(window: Window) -> None:
            self._enqueue(window, wait=wait)
        return on_window

    def _enqueue(self, window: Window, *, wait: bool) -> None:
        faults = self.sensor_faults.get(window.source)
        if faults is not None:
            for event in faults.update(window):  # a few vector operations; events are rare
                self.event_worker.submit(event, stop=self.shutdown)
        if self.recent is not None:
            self.recent.keep(window)
        with self._cond:
            while wait and len(self._queue) >= QUEUE_MAX_WINDOWS and not self.shutdown.is_set():
                self._cond.wait(0.2)
            if len(self._queue) >= QUEUE_MAX_WINDOWS:
                old = self._queue.popleft()
                self.queue_dropped += 1
                self._warn("window_dropped", old.source, source=old.source,
                           dropped_total=self.queue_dropped)
            self._queue.append(window)
            self._cond.notify_all()

    def _to_message(self, w: Window) -> tuple[str, bytes, list[tuple[str, str]]]:
        s = self.source_configs[w.source]
        wire = windowwire.WireWindow(source=w.source, model=Path(s.model).name,
                                     seq=self.seq.take(w.source), start_time_s=w.start_time_s,
                                     samples=w.samples, machine_id=w.machine_id, hop_s=s.hop_s,
                                     label=w.label, alarm=s.alarm or self.cfg.alarm)
        payload, props = windowwire.encode(wire)
        return f"{self.prefix}/{self.node}/{w.source}/window", payload, props

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    if self.shutdown.is_set():
                        return
                    self._cond.wait(0.2)  # woken by a new window, an ack or a connect
                batch = list(self._queue)
                self._queue.clear()
                self._cond.notify_all()
            if batch:
                evicted = self.outbox.add_many([self._to_message(w) for w in batch])
                if evicted:
                    self._acks.release(evicted)
                    self._warn("window_outbox_full", "full", dropped_total=self.outbox.dropped,
                               outbox_max=self.outbox.max_rows)
            self._hand_rows()

    def _can_hand(self) -> bool:
        return self.conn.connected.is_set() and len(self._acks) < IN_CLIENT_MAX

    def _hand_rows(self) -> None:
        if self._reset_cursor.is_set():
            self._reset_cursor.clear()
            self._cursor = 0
        while self._can_hand():
            room = IN_CLIENT_MAX - len(self._acks)
            rows = self.outbox.pending_after(self._cursor, room)
            if not rows:
                return
            for row in rows:
                self._cursor = row.id
                if self._acks.holds(row.id):
                    continue
                self._hand(row)

    def _hand(self, row) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = row.props
        info = self.conn.client.publish(row.topic, row.payload, qos=1, properties=props)
        if info.rc != 0 and info.mid == 0:
            return  # not queued by paho; the row stays on disk for the next connection
        self.published += 1
        if self._acks.handed(info.mid, row.id):
            self._row_acked(row.id)

    def _row_acked(self, row_id: int) -> None:
        self._acks.release((row_id,))
        if self.outbox.remove(row_id):
            self.acked += 1
        with self._cond:
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        row_id = self._acks.acked(mid)
        if row_id is None:
            return
        if reason_code.is_failure:
            self.log.warning("mqtt_publish_rejected", mid=mid, reason=str(reason_code))
        self._row_acked(row_id)

    def _on_connected(self, client) -> None:
        # Rows paho already holds are re-sent by paho itself; the rest are handed from the start.
        self._reset_cursor.set()
        if self.evidence is not None:
            client.subscribe(f"{self.prefix}/{self.node}/+/event", qos=1)
        with self._cond:
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        source = msg.topic.split("/")[-2]
        if self.evidence is not None and source in self.source_configs:
            self.evidence.on_event(source, msg.payload)

    # ------------------------------------------------------------------ reports

    def _publish_state(self, sid: str, state: str) -> None:
        self.publisher.publish_source_state(sid, state)  # re-sent by it on every connect

    def _emit(self, event: AlarmEvent) -> None:
        """On the event worker: a sensor-fault event, published and logged as the single box
        does (monitor/daemon/route.py's EventOutput)."""
        self.publisher.publish_event(event)
        state = event.detail["state"]
        self.log.warning("sensor_fault_started" if state == "start" else "sensor_fault_ended",
                         source=event.source, kind=event.detail["kind"], fault_id=event.id,
                         value=event.detail.get("value"), limit=event.detail.get("limit"))

    def _publish_evidence(self, source: str, reference: dict) -> None:
        self.publisher.publish_evidence(source, reference)
