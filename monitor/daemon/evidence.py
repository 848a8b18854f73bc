"""Alarm evidence: the triggering window as a WAV clip and a PNG (log-mel, plus the model's
reconstruction-error map where it has one), with count and byte retention."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import soundfile as sf

from monitor.audio import SAMPLE_RATE_HZ
from monitor.logs import get_logger
from monitor.plots import save_evidence_png


MAX_STEM_CHARS = 120  # file names stay far below NAME_MAX (255 bytes) whatever the alarm id
EPISODE_SUFFIX = ".event.wav"  # the alarm's windows, next to its clip and picture
EPISODE_MAX_WINDOWS = 12  # what a normal verdict adds at most: two minutes at a 10-s hop


def evidence_stem(alarm_id: str) -> str:
    """A safe file stem for an alarm id: [A-Za-z0-9_.-], no leading dot, bounded length (a
    long id keeps its start and gets a short hash, so different ids stay different)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", alarm_id).lstrip(".") or "alarm"
    if len(stem) > MAX_STEM_CHARS:
        digest = hashlib.sha256(alarm_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        stem = f"{stem[:MAX_STEM_CHARS - 13]}-{digest}"
    return stem


def wav_bytes(samples: np.ndarray) -> bytes:
    """16-bit WAV of the samples, encoded in memory: a full disk is then an OSError with errno."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), SAMPLE_RATE_HZ, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class EvidenceStore:
    def __init__(self, root: str | Path, *, max_count: int = 200, max_bytes: int = 500_000_000):
        self.root = Path(root)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.removed = 0
        self._log = get_logger(stage="evidence")

    def save(self, alarm_id: str, window: np.ndarray, *, log_mel: np.ndarray,
             error_map: np.ndarray | None, title: str = "") -> tuple[str, str]:
        """Write `<alarm_id>.wav` and `<alarm_id>.png`; returns their paths.

        Each file is written under a temporary name and renamed, so a reader never sees half a
        file. Evidence already saved for this alarm id is kept, not rewritten: the same id
        means the same audio (a restart re-scoring a recording must not replace it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        stem = evidence_stem(alarm_id)
        clip = self.root / f"{stem}.wav"
        image = self.root / f"{stem}.png"
        if clip.is_file() and image.is_file():
            self._log.info("evidence_exists", alarm_id=alarm_id, clip=str(clip))
            return str(clip), str(image)
        tmp_clip = self.root / f".{stem}.tmp.wav"
        tmp_image = self.root / f".{stem}.tmp.png"
        try:
            tmp_clip.write_bytes(wav_bytes(window))
            save_evidence_png(tmp_image, log_mel, error_map=error_map, title=title)
            os.replace(tmp_clip, clip)
            os.replace(tmp_image, image)
        finally:
            for tmp in (tmp_clip, tmp_image):
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
        self.enforce_retention()
        return str(clip), str(image)

    def save_episode(self, alarm_id: str, windows: list[np.ndarray]) -> str:
        """Write `<alarm_id>.event.wav`: the alarm's windows back to back (each one window
        long, so cutting the file at the window length gives them back), for a normal verdict
        on the whole episode (monitor/verdicts.py)."""
        self.root.mkdir(parents=True, exist_ok=True)
        stem = evidence_stem(alarm_id)
        out = self.root / f"{stem}{EPISODE_SUFFIX}"
        self._write_wav(out, self.root / f".{stem}.tmp.event.wav", np.concatenate(windows))
        return str(out)

    def save_clip(self, alarm_id: str, window: np.ndarray) -> str:
        """Write `<alarm_id>.wav` alone: where the audio is but the model is not (the capture
        box of a distributed deployment, monitor/daemon/roles/capture_evidence.py), so there is
        no picture. A clip already saved for this alarm id is kept, as in `save`."""
        self.root.mkdir(parents=True, exist_ok=True)
        stem = evidence_stem(alarm_id)
        clip = self.root / f"{stem}.wav"
        if clip.is_file():
            self._log.info("evidence_exists", alarm_id=alarm_id, clip=str(clip))
            return str(clip)
        self._write_wav(clip, self.root / f".{stem}.tmp.wav", window)
        return str(clip)

    def _write_wav(self, out: Path, tmp: Path, samples: np.ndarray) -> None:
        try:
            tmp.write_bytes(wav_bytes(samples))
            os.replace(tmp, out)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self.enforce_retention()

    def enforce_retention(self) -> None:
        """Remove the oldest evidence sets until both limits hold."""
        sets: dict[str, list[Path]] = {}
        for p in self.root.glob("*"):
            if p.suffix in (".wav", ".png") and not p.name.startswith(".") and p.is_file():
                stem = p.name[:-len(EPISODE_SUFFIX)] if p.name.endswith(EPISODE_SUFFIX) else p.stem
                sets.setdefault(stem, []).append(p)
        ordered = sorted(sets.items(), key=lambda kv: (min(p.stat().st_mtime_ns for p in kv[1]), kv[0]))
        total = sum(p.stat().st_size for files in sets.values() for p in files)
        while ordered and (len(ordered) > self.max_count or total > self.max_bytes):
            stem, files = ordered.pop(0)
            for p in files:
                total -= p.stat().st_size
                p.unlink(missing_ok=True)
            self.removed += 1
            self._log.info("evidence_removed", stem=stem, reason="retention")
