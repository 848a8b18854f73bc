"""Scoring files window by window: `harken replay` and `harken evaluate` both go through here.

Windows of many files are batched together so the encoder sees full batches; a file that cannot
be read is skipped with a logged warning and counted, and the rest of the folder is scored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from monitor.audio import SAMPLE_RATE_HZ, load_audio, split_windows, window_starts
from monitor.detector import Detector
from monitor.errors import AudioError
from monitor.labels import find_audio, parse_clip
from monitor.logs import get_logger

SILENCE_PEAK = 1e-6


@dataclass(frozen=True)
class WindowScore:
    file: str
    machine_id: int | None
    label: str | None
    window_start_s: float
    score: float
    threshold: float
    anomaly: bool


@dataclass
class SkipCounter:
    unreadable: int = 0
    silent: int = 0

    @property
    def total(self) -> int:
        return self.unreadable + self.silent


def load_checked(path: Path, skips: SkipCounter, log) -> np.ndarray | None:
    """16 kHz mono audio, or None (logged and counted) when the file cannot be used."""
    try:
        mono = load_audio(path)
    except AudioError as exc:
        skips.unreadable += 1
        log.warning("file_skipped", file=str(path), reason=str(exc))
        return None
    if float(np.max(np.abs(mono))) < SILENCE_PEAK:
        skips.silent += 1
        log.warning("file_skipped", file=str(path), reason="silent (all samples ~0)")
        return None
    return mono


def iter_windows(files: Iterable[Path], hop_s: float | None, window_s: float,
                 skips: SkipCounter) -> Iterator[tuple[Path, float, np.ndarray]]:
    log = get_logger(stage="replay")
    for path in files:
        mono = load_checked(path, skips, log)
        if mono is None:
            continue
        starts = window_starts(len(mono), window_s, hop_s)
        for start, win in zip(starts, split_windows(mono, window_s, hop_s)):
            yield path, start / SAMPLE_RATE_HZ, win


def score_files(detector: Detector, files: list[Path], *, hop_s: float | None = None,
                batch_size: int = 16, skips: SkipCounter | None = None,
                progress: bool = False) -> Iterator[WindowScore]:
    """Score every window of every file, in file order, batching across files."""
    skips = skips if skips is not None else SkipCounter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="file", desc="scoring", leave=False)
    batch: list[tuple[Path, float, np.ndarray]] = []
    last_file = None

    def flush() -> Iterator[WindowScore]:
        infos = [parse_clip(p) for p, _, _ in batch]
        scores = detector.score_windows(np.stack([w for _, _, w in batch]),
                                        [i.machine_id for i in infos])
        for (p, t, _), info, s in zip(batch, infos, scores):
            yield WindowScore(str(p), info.machine_id, info.label, round(t, 3), float(s),
                              detector.threshold_for(info.machine_id),
                              bool(s > detector.threshold_for(info.machine_id)))
        batch.clear()

    for path, start_s, win in iter_windows(files, hop_s, detector.window_s, skips):
        if bar is not None and path != last_file:
            bar.update(1)
            last_file = path
        batch.append((path, start_s, win))
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()
    if bar is not None:
        bar.close()


def replay(detector: Detector, root: Path, out, *, hop_s: float | None = None,
           batch_size: int = 16, progress: bool = False) -> dict:
    """Write one JSON line per window to `out` (a text stream); return a summary."""
    files = find_audio(root)
    skips = SkipCounter()
    n = n_anom = 0
    for ws in score_files(detector, files, hop_s=hop_s, batch_size=batch_size, skips=skips,
                          progress=progress):
        row = asdict(ws)
        row.pop("label")
        out.write(json.dumps(row) + "\n")
        n += 1
        n_anom += ws.anomaly
    out.flush()
    return {"files": len(files), "windows": n, "anomalous_windows": n_anom,
            "skipped_unreadable": skips.unreadable, "skipped_silent": skips.silent}
