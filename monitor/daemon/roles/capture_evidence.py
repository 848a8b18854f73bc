"""Evidence clips on the capture box (issue 17): the box with the audio keeps each source's
last few windows and, when the alarm stage announces an alarm `start` on
`<prefix>/<node>/<source>/event`, saves that alarm's window as `<evidence>/<alarm id>.wav`
with the single box's EvidenceStore (same names, same retention; no PNG: the model lives on
the workers). The single box puts the clip's path in the start event itself; here the event is
already out, so the path follows as one `evidence` message on `<prefix>/<node>/<source>/evidence`
(QoS 1, through the capture box's durable outbox):

    {"id": alarm id, "source": ..., "window_start": ..., "clip": path, "image": null}

Windows already gone from memory (an alarm raised later than RECENT_WINDOWS windows after its
window, or a capture box restarted since) are counted and logged, never saved.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterable

from monitor.daemon.event_worker import EventWorker
from monitor.daemon.evidence import EvidenceStore
from monitor.daemon.types import Window

RECENT_WINDOWS = 12  # per source: 2 minutes at a 10-s hop, what an alarm needs to decide
MATCH_S = 0.002  # event times are rounded to ms


class RecentWindows:
    """The last RECENT_WINDOWS windows of each source (each source's windows come from its one
    thread; a lookup from paho's thread takes a snapshot under the lock)."""

    def __init__(self, source_ids: Iterable[str], max_windows: int = RECENT_WINDOWS):
        self._windows = {sid: deque(maxlen=max_windows) for sid in source_ids}
        self._lock = threading.Lock()

    def keep(self, window: Window) -> None:
        with self._lock:
            self._windows[window.source].append(window)

    def find(self, source: str, start_time_s: float) -> Window | None:
        with self._lock:
            recent = list(self._windows.get(source, ()))
        return next((w for w in reversed(recent) if abs(w.start_time_s - start_time_s) <= MATCH_S),
                    None)


class CaptureEvidence:
    """Alarm starts of this node's sources -> a clip on disk (on the event worker, never on
    paho's thread) -> `publish(source, payload)` of its reference."""

    def __init__(self, store: EvidenceStore, recent: RecentWindows, worker: EventWorker,
                 publish: Callable[[str, dict], None], log):
        self.store = store
        self.recent = recent
        self.worker = worker
        self.publish = publish
        self.log = log
        self.saved = 0
        self.missing = 0  # written by paho's thread only

    def on_event(self, source: str, payload: bytes) -> None:
        """On paho's thread: one message of `<prefix>/<node>/<source>/event` (the source is
        the topic's: the payload's may be named otherwise by the alarm stage)."""
        try:
            event = json.loads(payload)
            if not isinstance(event, dict) or event.get("type") != "start":
                return
            alarm_id = str(event["id"])
            start_s = float(event.get("detail", {}).get("window_start", event["ts"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.log.warning("event_not_understood", error=str(exc)[:200])
            return
        window = self.recent.find(source, start_s)
        if window is None:
            self.missing += 1
            self.log.warning("evidence_window_gone", source=source, alarm_id=alarm_id,
                             window_start=start_s, missing=self.missing,
                             kept_windows=RECENT_WINDOWS)
            return

        def write() -> None:
            clip = self.store.save_clip(alarm_id, window.samples)
            self.saved += 1
            self.publish(source, {"id": alarm_id, "source": source,
                                  "window_start": round(window.start_time_s, 3), "clip": clip,
                                  "image": None})
            self.log.info("evidence_saved", source=source, alarm_id=alarm_id, clip=clip)
        if self.worker.pending >= self.worker.max_items:  # never block paho's network loop
            self.missing += 1
            self.log.warning("evidence_backlog", source=source, alarm_id=alarm_id,
                             missing=self.missing, pending=self.worker.pending)
            return
        self.worker.submit_file(write, what="clip", alarm_id=alarm_id)
