"""The JSONL sink: one JSON object per line, each with a `kind` (score, alarm, event, status,
stats, source_state). The embedded default when no broker is configured; "-" is stdout."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from monitor.daemon.types import AlarmEvent, Score


class JsonlPublisher:
    def __init__(self, target: str | Path = "-", *, node: str = ""):
        self.target = str(target)
        self.node = node
        self._lock = threading.Lock()  # the inference worker and the main thread both write
        self._out = None
        self.lines = 0

    def start(self) -> None:
        if self.target == "-":
            self._out = sys.stdout
        else:
            path = Path(self.target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(path, "a", buffering=1)  # line-buffered: tail -f sees each line
        self._write({"kind": "status", "status": "online"})

    def publish_score(self, score: Score) -> None:
        self._write({"kind": "score", **score.to_json()})

    def publish_alarm_state(self, source: str, on: bool) -> None:
        self._write({"kind": "alarm", "source": source, "state": "ON" if on else "OFF"})

    def publish_event(self, event: AlarmEvent) -> None:
        self._write({"kind": "event", **event.to_json()})

    def publish_source_state(self, source: str, state: str) -> None:
        self._write({"kind": "source_state", "source": source, "state": state})

    def publish_stats(self, stats: dict) -> None:
        self._write({"kind": "stats", **stats})

    def stop(self) -> None:
        if self._out is None:
            return
        self._write({"kind": "status", "status": "stopped"})
        with self._lock:
            self._out.flush()
            if self._out is not sys.stdout:
                self._out.close()
            self._out = None

    def _write(self, obj: dict) -> None:
        obj.setdefault("ts", round(time.time(), 3))
        if self.node:
            obj.setdefault("node", self.node)
        line = json.dumps(obj, allow_nan=False, default=_plain) + "\n"
        with self._lock:
            if self._out is None:
                return
            self._out.write(line)
            self._out.flush()
            self.lines += 1


def _plain(value):
    """numpy scalars and paths, which json does not know."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
