"""Alarm evidence: the triggering window as a WAV clip and a PNG (log-mel, plus the model's
reconstruction-error map where it has one), with count and byte retention."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import soundfile as sf

from monitor.audio import SAMPLE_RATE_HZ
from monitor.logs import get_logger
from monitor.plots import save_evidence_png


class EvidenceStore:
    def __init__(self, root: str | Path, *, max_count: int = 200, max_bytes: int = 500_000_000):
        self.root = Path(root)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.removed = 0
        self._log = get_logger(stage="evidence")

    def save(self, alarm_id: str, window: np.ndarray, *, log_mel: np.ndarray,
             error_map: np.ndarray | None, title: str = "") -> tuple[str, str]:
        """Write `<alarm_id>.wav` and `<alarm_id>.png`; returns their paths."""
        self.root.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", alarm_id)
        clip = self.root / f"{stem}.wav"
        sf.write(clip, np.clip(window, -1.0, 1.0), SAMPLE_RATE_HZ, subtype="PCM_16")
        image = save_evidence_png(self.root / f"{stem}.png", log_mel, error_map=error_map,
                                  title=title)
        self.enforce_retention()
        return str(clip), str(image)

    def enforce_retention(self) -> None:
        """Remove the oldest evidence sets until both limits hold."""
        sets: dict[str, list[Path]] = {}
        for p in self.root.glob("*"):
            if p.suffix in (".wav", ".png") and p.is_file():
                sets.setdefault(p.stem, []).append(p)
        ordered = sorted(sets.items(), key=lambda kv: (min(p.stat().st_mtime_ns for p in kv[1]), kv[0]))
        total = sum(p.stat().st_size for files in sets.values() for p in files)
        while ordered and (len(ordered) > self.max_count or total > self.max_bytes):
            stem, files = ordered.pop(0)
            for p in files:
                total -= p.stat().st_size
                p.unlink(missing_ok=True)
            self.removed += 1
            self._log.info("evidence_removed", stem=stem, reason="retention")
