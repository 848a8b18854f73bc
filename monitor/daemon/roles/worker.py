"""`role: worker`: one member of the scoring pool. Joins the MQTT 5 shared subscription
`$share/<group>/<prefix>/+/+/window`, scores each window with the model it names
(`<distributed.models_dir>/<name>`, loaded once and cached), publishes the score with the
window's identity and alarm settings on `<prefix>/<node>/<source>/score` (QoS 1; its
`threshold` is the per-window threshold at the window's settings, else the worker's own
`alarm:`) and only once the broker has that score acknowledges the window (paho 2 manual acks). A worker killed mid-window leaves the
window unacknowledged in its persistent session; the broker hands it out again (README in
docs/scaling.md says to whom), and the alarm stage drops the duplicate score by (source, seq).

Threads: paho's loop only appends incoming windows to an inbox, bounded by the Receive Maximum
the worker announces (the broker never has more unacknowledged windows out to it); one scoring
thread takes what has arrived together, up to batch_max, and runs each model's share as one batch.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.daemon import windowwire
from monitor.daemon.config import AlarmConfig, DaemonConfig
from monitor.daemon.notify import SystemdNotifier
from monitor.daemon.ratelimit import RateLimitedWarning
from monitor.daemon.roles.session import RoleConnection
from monitor.daemon.types import Score
from monitor.errors import UsageError
from monitor.logs import get_logger

PUBACK_WAIT_S = 10.0  # a score the broker has not taken by then: the window is not acked


@dataclass(frozen=True)
class Delivery:
    """One window message as it arrived: what to ack, on which connection."""

    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    props: list


class WorkerRole:
    def __init__(self, cfg: DaemonConfig, *, notifier: SystemdNotifier | None = None):
        self.cfg = cfg
        d = cfg.distributed
        self.log = get_logger(stage="worker", node=cfg.node)
        self._warn = RateLimitedWarning(self.log, every_s=60.0)
        self.shutdown = threading.Event()
        self.notifier = notifier or SystemdNotifier()
        self.models_dir = Path(d.models_dir or ".")
        # systemd's template unit passes its instance (%i) in $HARKEN_INSTANCE
        instance = os.environ.get("HARKEN_INSTANCE") or d.instance
        if set("/+#\0") & set(instance):
            raise UsageError(f"HARKEN_INSTANCE: must not contain / + #, got {instance[:40]!r}")
        self.name = f"{cfg.node}-{instance}"
        self.conn = RoleConnection(cfg, client_id=cfg.mqtt.client_id or f"harken-worker-{self.name}",
                                   persistent=d.session_expiry_s > 0, manual_ack=True,
                                   receive_maximum=d.receive_maximum,
                                   on_connected=self._on_connected, stage="worker")
        self.prefix = self.conn.prefix
        self.share = f"$share/{d.group}/{self.prefix}/+/+/window"
        self.conn.client.on_message = self._on_message
        self._inbox: deque[Delivery] = deque()
        self._inbox_max = 4 * d.receive_maximum + cfg.batch_max
        self._cond = threading.Condition()
        self.detectors: dict[str, object] = {}
        self._model_errors: dict[str, str] = {}
        self._thresholds: dict[tuple, float] = {}
        self.scored = 0
        self.rejected = 0
        self.not_acked = 0
        self.inbox_overflow = 0
        self.batches = 0

    # ------------------------------------------------------------------ run

    def request_stop(self) -> None:
        self.shutdown.set()

    def run(self) -> int:
        if self.cfg.threads:
            import torch

            torch.set_num_threads(self.cfg.threads)
        self.conn.start()
        self.notifier.ready()
        self.log.info("worker_ready", share=self.share, models_dir=str(self.models_dir))
        while not self.shutdown.is_set():
            batch = self._take_batch()
            if batch:
                self._handle(batch)
        self.conn.stop()
        self.log.info("worker_stopped", scored=self.scored, rejected=self.rejected,
                      batches=self.batches, not_acked=self.not_acked)
        return 0

    def _on_connected(self, client) -> None:
        client.subscribe(self.share, qos=1)

    def _on_message(self, client, userdata, message) -> None:
        props = getattr(message.properties, "UserProperty", None) or []
        item = Delivery(self.conn.generation, message.mid, message.qos, message.topic,
                        bytes(message.payload), list(props))
        with self._cond:
            if len(self._inbox) >= self._inbox_max:
                # The broker sent more than our Receive Maximum (Mosquitto 2.0 may): kept all
                # the same, since a window dropped unacknowledged would hold an in-flight slot
                # of this session until the next reconnect and stall the worker.
                self.inbox_overflow += 1
                if self.inbox_overflow in (1, 10, 100, 1000):
                    self.log.warning("receive_maximum_exceeded", inbox=len(self._inbox),
                                     receive_maximum=self.cfg.distributed.receive_maximum)
            self._inbox.append(item)
            self._cond.notify()

    def _take_batch(self) -> list[Delivery]:
        with self._cond:
            if not self._inbox:
                self._cond.wait(0.2)
            out = []
            while self._inbox and len(out) < self.cfg.batch_max:
                out.append(self._inbox.popleft())
            return out

    # ------------------------------------------------------------------ scoring

    def _handle(self, batch: list[Delivery]) -> None:
        by_model: dict[str, list[tuple[Delivery, windowwire.WireWindow]]] = {}
        done: list[Delivery] = []  # handled without a score: acked at once
        for item in batch:
            try:
                wire = windowwire.decode(item.payload, item.props)
                self._check_topic(item.topic, wire.source)
            except windowwire.WireError as exc:
                self.rejected += 1
                self._warn("window_rejected", str(exc)[:40], topic=item.topic, error=str(exc))
                done.append(item)
                continue
            if self._detector(wire.model) is None:
                self.rejected += 1
                done.append(item)
                continue
            by_model.setdefault(wire.model, []).append((item, wire))
        infos = []
        for model, items in by_model.items():
            infos += self._score(model, items)
        scored_ok = True
        deadline = time.monotonic() + PUBACK_WAIT_S
        for info in infos:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                scored_ok = False
                continue
            scored_ok = scored_ok and info.is_published()
        acks = done + ([item for items in by_model.values() for item, _ in items] if scored_ok else [])
        if not scored_ok:
            self.not_acked += len(batch) - len(acks)
            self._warn("scores_not_acknowledged", "puback", windows=len(batch) - len(acks))
        for item in acks:
            if item.generation == self.conn.generation:  # else the broker sends it again anyway
                self.conn.client.ack(item.mid, item.qos)

    def _check_topic(self, topic: str, source: str) -> None:
        levels = topic.split("/")
        if len(levels) < 3 or levels[-1] != "window" or levels[-2] != source:
            raise windowwire.WireError(f"topic {topic[:80]!r} does not end in /{source[:40]}/window")

    def _detector(self, name: str):
        det = self.detectors.get(name)
        if det is not None:
            return det
        if name in self._model_errors:
            self._warn("model_unavailable", name, model=name, error=self._model_errors[name])
            return None
        from monitor.detector import Detector

        try:
            det = Detector.load(self.models_dir / name, device=self.cfg.device,
                                precision=self.cfg.precision)
        except (UsageError, OSError) as exc:
            self._model_errors[name] = str(exc)[:300]
            self.log.error("model_unavailable", model=name, error=self._model_errors[name])
            return None
        self.detectors[name] = det
        self.log.info("model_loaded", model=name, name=det.name)
        return det

    def _threshold(self, model: str, det, hop_s: float, machine_id: int | None,
                   alarm: AlarmConfig | None) -> float:
        """The per-window threshold the single-box daemon would publish (thresholds.py), at the
        window's carried alarm settings (else this worker's own)."""
        alarm = alarm or self.cfg.alarm
        key = (model, hop_s, machine_id, alarm)
        if key not in self._thresholds:
            from monitor.daemon.thresholds import resolve_for_detector

            try:
                self._thresholds[key] = resolve_for_detector(
                    det, alarm, hop_s=hop_s, machine_id=machine_id).window_threshold
            except UsageError:
                self._thresholds[key] = float(det.threshold_for(machine_id))
        return self._thresholds[key]

    def _score(self, model: str, items) -> list:
        det = self.detectors[model]
        samples = np.stack([w.samples for _, w in items])
        try:
            scores = det.score_windows(samples, [w.machine_id for _, w in items])
        except Exception as exc:  # noqa: BLE001 - one bad batch must not end the worker
            self.rejected += len(items)
            self.log.error("inference_failed", model=model, windows=len(items), error=str(exc)[:300])
            return []
        self.batches += 1
        now = time.time()
        infos = []
        for (item, w), s in zip(items, scores):
            hop_s = w.hop_s if w.hop_s is not None else w.duration_s
            value = float(s)
            score = Score(source=w.source, model=det.name, score=value,
                          threshold=self._threshold(model, det, hop_s, w.machine_id, w.alarm),
                          window_start_s=w.start_time_s, window_end_s=w.start_time_s + w.duration_s,
                          ready_mono_s=0.0, scored_time_s=now, label=w.label)
            payload = score.to_json()
            if not math.isfinite(value):
                payload["score"], payload["anomaly"] = None, False  # not JSON; the alarm stage skips it
            payload.update(seq=w.seq, hop_s=hop_s, machine_id=w.machine_id, model_key=model,
                           worker=self.name)
            if w.alarm is not None:  # the alarm stage judges the source by the same settings
                payload["alarm"] = windowwire.alarm_to_json(w.alarm)
            node = item.topic.split("/")[-3]
            infos.append(self.conn.client.publish(f"{self.prefix}/{node}/{w.source}/score",
                                                  json.dumps(payload), qos=1))
            self.scored += 1
        return infos
