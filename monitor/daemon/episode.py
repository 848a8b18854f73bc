"""The windows of each open alarm (up to EPISODE_MAX_WINDOWS), written as the alarm's episode
clip (`<alarm>.event.wav`, monitor/daemon/evidence.py) on the event worker once the alarm ends
or the bound is reached, so that a `normal` verdict adds all of the alarm's windows to the
normal reference, not only the one that started it."""

from __future__ import annotations

import threading

import numpy as np

from monitor.daemon.evidence import EPISODE_MAX_WINDOWS, EvidenceStore
from monitor.daemon.types import AlarmEvent, Window


class EpisodeRecorder:
    """Called on the inference thread only (one writer); the file work goes to the event
    worker, after the alarm start's own evidence."""

    def __init__(self, store: EvidenceStore, event_worker, stop: threading.Event):
        self.store = store
        self.event_worker = event_worker
        self.stop = stop
        self._open: dict[str, tuple[str, list[np.ndarray]]] = {}  # source -> (alarm id, windows)

    def observe(self, window: Window, events: list[AlarmEvent], alarm_on: bool) -> None:
        """After the source's alarm machine took this window (and gave these events)."""
        sid = window.source
        start = next((e for e in events if e.type == "start"), None)
        if start is not None:
            self._flush(sid)  # a new episode: the old one is complete
            self._open[sid] = (start.id, [window.samples])
        elif sid in self._open and alarm_on:
            self._open[sid][1].append(window.samples)
        if sid in self._open and (not alarm_on or len(self._open[sid][1]) >= EPISODE_MAX_WINDOWS):
            self._flush(sid)

    def flush_all(self) -> None:
        """At shutdown: an alarm still open keeps what it has."""
        for sid in list(self._open):
            self._flush(sid)

    def _flush(self, sid: str) -> None:
        got = self._open.pop(sid, None)
        if got is None:
            return
        alarm_id, windows = got
        self.event_worker.submit_file(lambda: self.store.save_episode(alarm_id, windows),
                                      what="episode", alarm_id=alarm_id, stop=self.stop)
