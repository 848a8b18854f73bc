"""The JSONL sink: one JSON object per line, each with a `kind` (score, alarm, event, status,
stats, source_state). The embedded default when no broker is configured; "-" is stdout."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from monitor.daemon.ratelimit import RateLimitedWarning
from monitor.daemon.types import AlarmEvent, Score
from monitor.errors import UsageError
from monitor.logs import get_logger


class JsonlPublisher:
    def __init__(self, target: str | Path = "-", *, node: str = ""):
        self.target = str(target)
        self.node = node
        self._lock = threading.Lock()  # the inference worker and the main thread both write
        self._out = None
        self.lines = 0
        self.write_failed = 0  # lines lost to a full disk (written under the lock)
        self._warn = RateLimitedWarning(get_logger(stage="jsonl"), every_s=60.0)

    def start(self) -> None:
        if self.target == "-":
            self._out = sys.stdout
        else:
            path = Path(self.target)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._out = open(path, "a", buffering=1)  # line-buffered: tail -f sees each line
            except OSError as exc:  # check-config tests this too; the file may change since
                raise UsageError(f"jsonl: {self.target}: cannot append to it "
                                 f"({exc.strerror or exc})") from None
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

    def status(self) -> dict:
        return {"jsonl_lines": self.lines, "jsonl_write_failed": self.write_failed}

    def stop(self) -> None:
        if self._out is None:
            return
        self._write({"kind": "status", "status": "stopped"})
        with self._lock:
            try:
                self._out.flush()
                if self._out is not sys.stdout:
                    self._out.close()
            except OSError as exc:
                self.write_failed += 1
                self._warn("jsonl_write_failed", "close", path=self.target,
                           error=exc.strerror or str(exc), failed=self.write_failed)
            self._out = None

    def _write(self, obj: dict) -> None:
        obj.setdefault("ts", round(time.time(), 3))
        if self.node:
            obj.setdefault("node", self.node)
        line = json.dumps(obj, allow_nan=False, default=_plain) + "\n"
        with self._lock:
            if self._out is None:
                return
            try:
                self._out.write(line)
                self._out.flush()
            except OSError as exc:
                # A full disk: count and warn now and then, keep going (MQTT, if configured,
                # still gets everything; lines resume once there is room again).
                self.write_failed += 1
                self._warn("jsonl_write_failed", "write", path=self.target,
                           error=exc.strerror or str(exc), failed=self.write_failed)
                return
            self.lines += 1


def _plain(value):
    """numpy scalars and paths, which json does not know."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)
