"""Scoring files window by window: `harken replay` and `harken evaluate` both go through here.

Windows of many files are batched together so the encoder sees full batches; a file that cannot
be read is skipped with a logged warning and counted, and the rest of the folder is scored.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from monitor.audio import SAMPLE_RATE_HZ, iter_windows as iter_clip_windows, load_audio
from monitor.detector import Detector
from monitor.errors import AudioError, UsageError
from monitor.labels import AUDIO_SUFFIXES, find_audio, parse_clip
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
        # One window at a time: a long file at a small hop never exists as all its windows.
        for start, win in iter_clip_windows(mono, window_s, hop_s):
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


def check_output_path(out: str | Path, inputs: Iterable[Path], *, model: str | Path | None = None,
                      what: str = "output") -> None:
    """Refuse an output file that would overwrite a recording being read (or the model), or
    that would itself be taken for a recording: one line, before anything is written."""
    out = Path(out)
    if out.suffix.lower() in AUDIO_SUFFIXES:
        raise UsageError(f"{out}: the {what} is JSON lines, not audio; give it a .jsonl name "
                         f"(a {out.suffix} name would be read as a recording)")
    if out.exists():
        for p in inputs:
            try:
                if os.path.samefile(out, p):
                    raise UsageError(f"{out}: is one of the recordings being read; write the "
                                     f"{what} somewhere else")
            except OSError:
                continue
    if model is not None:
        root = Path(model).absolute()
        if root.is_file():
            root = root.parent
        if _is_within(out.absolute(), root):
            raise UsageError(f"{out}: is inside the model directory {model}; write the {what} "
                             "somewhere else")


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def replay(detector: Detector, root: Path, out, *, hop_s: float | None = None,
           batch_size: int = 16, progress: bool = False, files: list[Path] | None = None) -> dict:
    """Write one JSON line per window to `out` (a text stream); return a summary.

    A window whose score is not a finite number (NaN, infinity) is written with `"score":
    null` and counted, never as `NaN`, which is not JSON."""
    files = files if files is not None else find_audio(root)
    skips = SkipCounter()
    log = get_logger(stage="replay")
    n = n_anom = n_nonfinite = 0
    for ws in score_files(detector, files, hop_s=hop_s, batch_size=batch_size, skips=skips,
                          progress=progress):
        row = asdict(ws)
        row.pop("label")
        if not math.isfinite(ws.score):
            n_nonfinite += 1
            row["score"], row["anomaly"] = None, False
            if n_nonfinite in (1, 10, 100, 1000) or n_nonfinite % 10000 == 0:
                log.warning("score_not_finite", file=ws.file, window_start_s=ws.window_start_s,
                            count=n_nonfinite)
        out.write(json.dumps(row, allow_nan=False) + "\n")
        n += 1
        n_anom += bool(row["anomaly"])
    out.flush()
    return {"files": len(files), "windows": n, "anomalous_windows": n_anom,
            "nonfinite_windows": n_nonfinite,
            "skipped_unreadable": skips.unreadable, "skipped_silent": skips.silent}
