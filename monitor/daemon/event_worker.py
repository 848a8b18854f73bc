"""Alarm outputs on their own thread: events are published in order, and an alarm start first
gets its evidence (a second encoder pass, a PNG, a WAV, a directory scan for retention), which
would otherwise hold up the inference thread while windows pile up in its queue.

Bounded twice: at most `max_pending_evidence` starts wait for evidence (beyond that a start is
published without evidence files, counted in `evidence_dropped` and warned about at a limited
rate), and the FIFO of outputs holds at most `max_items` (a full one makes the submitting
thread wait: alarm events are never dropped, only delayed).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from monitor.daemon.ratelimit import RateLimitedWarning
from monitor.daemon.types import AlarmEvent
from monitor.logs import get_logger


@dataclass(frozen=True)
class EventJob:
    event: AlarmEvent | None  # None: side work only (an alarm's episode clip), nothing emitted
    evidence: Callable[[AlarmEvent], AlarmEvent] | None = None  # returns the event with files


class EventWorker(threading.Thread):
    def __init__(self, emit: Callable[[AlarmEvent], None], *, max_items: int = 1000,
                 max_pending_evidence: int = 4):
        super().__init__(name="harken-events", daemon=True)
        self._emit = emit
        self.max_items = max_items
        self._jobs: queue.Queue[EventJob | None] = queue.Queue(maxsize=max_items)
        self.max_pending_evidence = max_pending_evidence
        self._log = get_logger(stage="events")
        self._warn = RateLimitedWarning(self._log, every_s=60.0)
        # pending evidence = submitted (submitting thread) - done (this thread): one writer each
        self.evidence_submitted = 0
        self.evidence_done = 0
        self.evidence_dropped = 0  # written by the submitting thread
        self.evidence_failed = 0
        self.emitted = 0
        self.emit_failed = 0

    @property
    def pending(self) -> int:
        """Outputs queued, not yet published."""
        return self._jobs.qsize()

    @property
    def pending_evidence(self) -> int:
        return self.evidence_submitted - self.evidence_done

    def submit(self, event: AlarmEvent, evidence: Callable[[AlarmEvent], AlarmEvent] | None = None,
               *, stop: threading.Event | None = None) -> None:
        """Queue an event (in order); `evidence` is run first on this worker when there is room."""
        if evidence is not None:
            if self.pending_evidence >= self.max_pending_evidence:
                self.evidence_dropped += 1
                self._warn("evidence_dropped", "backlog", alarm_id=event.id, source=event.source,
                           dropped=self.evidence_dropped,
                           hint="alarms start faster than their evidence is saved")
                evidence = None
            else:
                self.evidence_submitted += 1
        job = EventJob(event, evidence)
        self._put(job, lambda: self._run_job(job), stop)

    def _put(self, job: EventJob, run_here: Callable[[], None],
             stop: threading.Event | None) -> None:
        while True:
            try:
                self._jobs.put(job, timeout=0.5)
                return
            except queue.Full:
                if stop is not None and stop.is_set() and not self.is_alive():
                    run_here()  # the worker is gone: do it here rather than lose it
                    return

    def submit_file(self, write: Callable[[], None], *, what: str, alarm_id: str,
                    stop: threading.Event | None = None) -> None:
        """Queue slow file work that publishes nothing (in order with the events)."""

        def run(_event):
            try:
                write()
            except Exception as exc:  # noqa: BLE001 - best effort, like the evidence
                self.evidence_failed += 1
                self._log.exception("evidence_failed", what=what, alarm_id=alarm_id,
                                    error=str(exc)[:300])
        self._put(EventJob(None, run), lambda: run(None), stop)

    def stop_when_drained(self, timeout_s: float = 30.0) -> None:
        if not self.is_alive():
            return
        self._jobs.put(None)
        self.join(timeout=timeout_s)
        if self.is_alive():
            self._log.warning("event_worker_stuck", pending=self._jobs.qsize())

    def run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._run_job(job)

    def _run_job(self, job: EventJob) -> None:
        event = job.event
        if event is None:
            job.evidence(None)
            return
        if job.evidence is not None:
            try:
                event = job.evidence(event)
            except Exception as exc:  # noqa: BLE001 - evidence is best effort; the event is not
                self.evidence_failed += 1
                self._log.exception("evidence_failed", source=event.source, alarm_id=event.id,
                                    error=str(exc)[:300])
            finally:
                self.evidence_done += 1
        try:
            self._emit(event)
            self.emitted += 1
        except Exception as exc:  # noqa: BLE001 - one event's publishing must not stop the rest
            self.emit_failed += 1
            self._log.exception("event_publish_failed", source=event.source, alarm_id=event.id,
                                error=str(exc)[:300])
