"""How long each source has been listened to: the exposure that its false alarms are judged by.

A `normal` verdict says that the source raised a false alarm; how much that should move the
threshold depends on how long the source has been scored (one false alarm in an hour of audio
is news, one in three months is the budget). The daemon counts the audio seconds it scored per
source and keeps the total across restarts in `<state_dir>/exposure.json`, written atomically at
each stats interval and at stop (a crash loses at most one interval, which only makes the next
recalibration more cautious). The inference thread writes the counts; `save` reads a snapshot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILE_NAME = "exposure.json"
SECONDS_PER_DAY = 86_400.0


class Exposure:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / FILE_NAME
        self.before: dict[str, float] = self._read()  # scored seconds of earlier runs
        self.now: dict[str, float] = {}  # scored seconds of this run

    def _read(self) -> dict[str, float]:
        try:
            doc = json.loads(self.path.read_text())
            return {str(k): float(v) for k, v in doc.get("scored_s", {}).items()
                    if isinstance(v, (int, float)) and v >= 0}
        except (OSError, ValueError, AttributeError):
            return {}  # missing or unreadable: count from zero (the cautious side)

    def add(self, source: str, seconds: float) -> None:
        self.now[source] = self.now.get(source, 0.0) + float(seconds)

    def scored_s(self, source: str) -> float:
        return self.before.get(source, 0.0) + self.now.get(source, 0.0)

    def days(self, source: str) -> float:
        return self.scored_s(source) / SECONDS_PER_DAY

    def save(self) -> None:
        sources = set(self.before) | set(dict(self.now))
        doc = {"scored_s": {s: round(self.scored_s(s), 3) for s in sorted(sources)}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
