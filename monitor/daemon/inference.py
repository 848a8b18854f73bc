"""The inference worker: one thread owns the models and scores batches of ready windows.

Live producers (ring buffers fed by capture callbacks, MQTT feeds, folders paced in real time)
never block: they `put_nowait` into one bounded `WindowQueue`, which drops the OLDEST window when
full (a late
score for old audio is worth less than a prompt one for new audio), counts it and warns at a
limited rate. The worker takes up to `batch_max` windows at a time and runs those that share a
model as one batch through `Detector.score_windows`, the same path as `harken replay`. A folder
replayed at `speed: max` is not live: it waits for room (`put_wait`) and loses nothing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from monitor.daemon.types import ScoringModel, Window
from monitor.logs import get_logger


class WindowQueue:
    """Bounded FIFO of (model key, Window); a full queue drops its oldest entry."""

    def __init__(self, max_windows: int):
        self.max_windows = max_windows
        self._items: deque[tuple[str, Window]] = deque()
        self._cond = threading.Condition()
        self.produced = 0
        self.dropped = 0
        self.dropped_by_source: dict[str, int] = {}
        self._log = get_logger(stage="queue")
        self._next_warning = 1

    def put_nowait(self, model_key: str, window: Window) -> None:
        dropped: Window | None = None
        with self._cond:
            self.produced += 1
            if len(self._items) >= self.max_windows:
                dropped = self._items.popleft()[1]
                self.dropped += 1
                self.dropped_by_source[dropped.source] = self.dropped_by_source.get(dropped.source, 0) + 1
            self._items.append((model_key, window))
            self._cond.notify()
            n_dropped = self.dropped
        if dropped is not None and n_dropped >= self._next_warning:
            # The 1st, 10th, 100th... drop: a flood of warnings would cost more time than it saves.
            self._next_warning *= 10
            self._log.warning("window_dropped", source=dropped.source, dropped_total=n_dropped,
                              queue_max=self.max_windows,
                              hint="inference is slower than the audio arrives: fewer sources, "
                                   "a larger hop_s or a faster device")

    def put_wait(self, model_key: str, window: Window, stop: threading.Event) -> None:
        """For producers that can wait (a folder replayed as fast as possible): block while
        the queue is full instead of dropping, so every window is scored, as `harken replay`
        does. Once `stop` is set it behaves like put_nowait so shutdown never hangs."""
        with self._cond:
            while len(self._items) >= self.max_windows and not stop.is_set():
                self._cond.wait(0.2)
        self.put_nowait(model_key, window)

    def take_batch(self, batch_max: int, timeout_s: float) -> list[tuple[str, Window]]:
        """Up to batch_max windows, waiting at most timeout_s for the first one."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout_s)
            out = []
            while self._items and len(out) < batch_max:
                out.append(self._items.popleft())
            if out:
                self._cond.notify_all()  # room again for producers waiting in put_wait
            return out

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


@dataclass(frozen=True)
class ScoredWindow:
    window: Window
    model_key: str
    score: float
    threshold: float
    model_name: str
    scored_time_s: float
    scored_mono_s: float


class InferenceWorker(threading.Thread):
    """Scores windows from `queue` with `detectors[model_key]`; hands each result to `on_scored`
    (alarms, publishing) on this thread, in queue order."""

    def __init__(self, queue: WindowQueue, detectors: Mapping[str, ScoringModel], *,
                 on_scored: Callable[[ScoredWindow], None], batch_max: int = 32,
                 idle_wait_s: float = 0.2,
                 threshold_overrides: Mapping[str | tuple[str, int], float] | None = None):
        super().__init__(name="harken-inference", daemon=True)
        self.queue = queue
        self.detectors = dict(detectors)
        self.on_scored = on_scored
        self.batch_max = batch_max
        self.idle_wait_s = idle_wait_s
        # Keyed by source id, or by (source id, machine ID) where a source's windows carry
        # machine IDs of their own (folder files); the detector's own threshold otherwise.
        self.threshold_overrides = dict(threshold_overrides or {})
        self._stop_when_empty = threading.Event()
        self.heartbeat_mono_s = time.monotonic()
        self.scored = 0
        self.batches = 0
        self.failed = 0  # windows whose batch could not be scored
        self.publish_failed = 0  # scored windows whose alarm/publish step raised
        self.batch_ms: deque[float] = deque(maxlen=2000)  # per batch, for p50/p95
        self.latency_ms: deque[float] = deque(maxlen=2000)  # window complete -> scored
        self.error: BaseException | None = None
        self._calls: deque = deque()  # call_soon: model changes run here, between batches

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn on this thread before the next batch (it owns the models: a detector is
        swapped between batches, never under one)."""
        self._calls.append(fn)

    def stop_when_drained(self) -> None:
        self._stop_when_empty.set()

    def _threshold(self, win, det) -> float:
        by_id = self.threshold_overrides.get((win.source, win.machine_id))
        if by_id is not None:
            return by_id
        return self.threshold_overrides.get(win.source, det.threshold_for(win.machine_id))

    def run(self) -> None:
        log = get_logger(stage="inference")
        log.info("inference_started", models=len(self.detectors))
        while True:
            self.heartbeat_mono_s = time.monotonic()
            while self._calls:
                self._calls.popleft()()
            batch = self.queue.take_batch(self.batch_max, self.idle_wait_s)
            if not batch:
                if self._stop_when_empty.is_set():
                    break
                continue
            by_model: dict[str, list[Window]] = {}
            for key, win in batch:
                by_model.setdefault(key, []).append(win)
            for key, windows in by_model.items():
                self._score(key, windows, log)
        log.info("inference_stopped", scored=self.scored)

    def _score(self, key: str, windows: list[Window], log) -> None:
        det = self.detectors[key]
        t0 = time.monotonic()
        try:
            scores = det.score_windows(np.stack([w.samples for w in windows]),
                                       [w.machine_id for w in windows])
        except Exception as exc:  # noqa: BLE001 - a bad batch must not kill monitoring
            self.failed += len(windows)
            log.exception("inference_failed", model=key, windows=len(windows), error=str(exc))
            return
        done = time.monotonic()
        self.batch_ms.append((done - t0) * 1000.0)
        self.batches += 1
        now = time.time()
        for win, s in zip(windows, scores):
            self.latency_ms.append((done - win.ready_mono_s) * 1000.0)
            threshold = self._threshold(win, det)
            self.scored += 1
            try:
                self.on_scored(ScoredWindow(win, key, float(s), float(threshold), det.name, now,
                                            done))
            except Exception as exc:  # noqa: BLE001 - one window's publishing must not lose the rest
                self.publish_failed += 1
                log.exception("window_publish_failed", source=win.source, error=str(exc))
            self.heartbeat_mono_s = time.monotonic()


def percentile(values, q: float) -> float | None:
    vals = list(values)
    return round(float(np.percentile(vals, q)), 3) if vals else None
