"""A person's verdict on an alarm event: `normal` (false alarm) or `fault` (confirmed).

- `normal`: the alarm's windows (its episode clip `<alarm>.event.wav`, up to 12 windows; the
  evidence clip where there is none yet) join the source's normal reference overlay
  (monitor/reference.py), so the same sound no longer alarms (monitor/overlay.py).
- `fault`: the evidence clip is kept with its label in `<state_dir>/labelled/<source>/` under
  a DCASE name (`anomaly_id_00_<event>.wav`), a growing labelled test set that
  `harken evaluate --data <state_dir>/labelled/<source>` reads. Normal verdicts put their
  clip there too (`normal_id_...`), so the set has both classes.
Every verdict is appended to `<state_dir>/verdicts.jsonl`. A bad verdict (malformed, unknown
event, no evidence clip) raises UsageError and changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from monitor.audio import SAMPLE_RATE_HZ
from monitor.errors import UsageError
from monitor.logs import get_logger
from monitor.reference import MAX_WINDOWS_DEFAULT, ReferenceStore
from monitor.yamlsafe import short_repr

VERDICTS = ("normal", "fault")
MAX_NOTE_CHARS = 500
MAX_EVENT_ID_CHARS = 300


@dataclass(frozen=True)
class Verdict:
    event_id: str
    verdict: str  # normal | fault
    note: str | None = None

    @classmethod
    def from_json(cls, data: object) -> Verdict:
        """From a message (MQTT, the page): {"event_id": ..., "verdict": ..., "note": ...}."""
        if not isinstance(data, dict):
            raise UsageError(f"a verdict must be a JSON object, got {short_repr(data)}")
        unknown = sorted(set(data) - {"event_id", "verdict", "note"})
        if unknown:
            raise UsageError(f"verdict: unknown key {short_repr(unknown[0])} "
                             "(known: event_id, verdict, note)")
        return cls.checked(data.get("event_id"), data.get("verdict"), data.get("note"))

    @classmethod
    def checked(cls, event_id: object, verdict: object, note: object = None) -> Verdict:
        if not isinstance(event_id, str) or not event_id or len(event_id) > MAX_EVENT_ID_CHARS:
            raise UsageError(f"verdict.event_id: must be an alarm id, got {short_repr(event_id)}")
        if verdict not in VERDICTS:
            raise UsageError(f"verdict.verdict: must be normal or fault, got {short_repr(verdict)}")
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE_CHARS):
            raise UsageError(f"verdict.note: must be text of at most {MAX_NOTE_CHARS} "
                             f"characters, got {short_repr(note)}")
        return cls(event_id, str(verdict), note or None)


def event_source(event_id: str, node: str, source_ids: Sequence[str]) -> str:
    """The source of an alarm id `<node>-<source>-<ms>` (ids may themselves hold '-': the
    longest configured source id that fits wins)."""
    fits = [s for s in source_ids if event_id.startswith(f"{node}-{s}-")
            and event_id[len(node) + len(s) + 2:].isdigit()]
    if not fits:
        raise UsageError(f"unknown event {short_repr(event_id)}: not an alarm id of node "
                         f"{node} and sources {', '.join(source_ids)}")
    return max(fits, key=len)


def evidence_clip(state_dir: Path, event_id: str) -> Path:
    from monitor.daemon.evidence import evidence_stem

    clip = Path(state_dir) / "evidence" / f"{evidence_stem(event_id)}.wav"
    if not clip.is_file():
        raise UsageError(f"unknown event {short_repr(event_id)}: no evidence clip {clip} "
                         "(evidence off, removed by retention, or never alarmed)")
    return clip


def read_windows(clip: Path, window_s: float) -> np.ndarray:
    """(windows, samples) of the clip, cut at window_s (the evidence clip is one window, the
    episode clip the alarm's windows back to back)."""
    audio, rate = sf.read(str(clip), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE_HZ:
        raise UsageError(f"{clip}: {rate} Hz, evidence is written at {SAMPLE_RATE_HZ} Hz")
    mono = audio.mean(axis=1)
    n = int(round(window_s * SAMPLE_RATE_HZ))
    if len(mono) < n:
        mono = np.pad(mono, (0, n - len(mono)))
    count = len(mono) // n
    return mono[: count * n].reshape(count, n)


@dataclass(frozen=True)
class VerdictResult:
    verdict_id: str
    event_id: str
    source: str
    verdict: str
    reference_version: int | None  # the overlay version a normal verdict made
    labelled_clip: str

    def to_json(self) -> dict:
        return {"verdict_id": self.verdict_id, "event_id": self.event_id, "source": self.source,
                "verdict": self.verdict, "reference_version": self.reference_version,
                "labelled_clip": self.labelled_clip}


Embedder = Callable[[np.ndarray], "object"]  # (windows, samples) -> (windows, dim) raw embeddings


def record_verdict(state_dir: str | Path, *, node: str, source_ids: Sequence[str],
                   verdict: Verdict, window_s_of: Callable[[str], float],
                   machine_id_of: Callable[[str], int | None], embed: Callable[[str, np.ndarray], object],
                   max_windows: int = MAX_WINDOWS_DEFAULT) -> VerdictResult:
    """Apply one verdict to the state directory. `embed(source, windows)` gives the raw
    embeddings with that source's model (the daemon runs it on its inference worker)."""
    state = Path(state_dir)
    log = get_logger(stage="verdicts")
    source = event_source(verdict.event_id, node, source_ids)
    clip = evidence_clip(state, verdict.event_id)
    verdict_id = f"v-{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}"
    mid = machine_id_of(source)
    version = None
    if verdict.verdict == "normal":
        from monitor.daemon.evidence import EPISODE_SUFFIX

        episode = clip.with_name(clip.stem + EPISODE_SUFFIX)  # all of the alarm's windows
        windows = read_windows(episode if episode.is_file() else clip, window_s_of(source))
        import torch

        emb = torch.as_tensor(embed(source, windows)).float()
        store = ReferenceStore(state, source, max_windows=max_windows)
        overlay = store.add(verdict.event_id, verdict_id, emb, [mid] * len(windows), verdict.note)
        version = overlay.version
        log.info("reference_updated", source=source, version=version, windows=overlay.windows,
                 verdict_id=verdict_id, change="added", event_id=verdict.event_id)
    labelled = _keep_labelled(state, source, clip, verdict, mid)
    result = VerdictResult(verdict_id, verdict.event_id, source, verdict.verdict, version,
                           str(labelled))
    entry = {"ts": round(time.time(), 3), **result.to_json(), "note": verdict.note}
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "verdicts.jsonl", "a") as f:  # append-only history of every verdict
        f.write(json.dumps(entry) + "\n")
    log.info("verdict_recorded", source=source, event_id=verdict.event_id,
             verdict=verdict.verdict, verdict_id=verdict_id, reference_version=version)
    return result


def undo_verdict(state_dir: str | Path, source: str, verdict_id: str | None = None) -> dict:
    """Remove a normal verdict's windows from the source's reference (the newest by default)."""
    store = ReferenceStore(state_dir, source)
    entry = store.undo(verdict_id)
    version = store.version()
    get_logger(stage="verdicts").info("reference_updated", source=source, version=version,
                                      verdict_id=entry.verdict_id, change="undone",
                                      event_id=entry.event_id)
    with open(Path(state_dir) / "verdicts.jsonl", "a") as f:
        f.write(json.dumps({"ts": round(time.time(), 3), "undo": entry.verdict_id,
                            "event_id": entry.event_id, "source": source,
                            "reference_version": version}) + "\n")
    return {"undone": entry.verdict_id, "event_id": entry.event_id, "source": source,
            "reference_version": version}


def _keep_labelled(state: Path, source: str, clip: Path, verdict: Verdict,
                   machine_id: int | None) -> Path:
    label = "anomaly" if verdict.verdict == "fault" else "normal"
    folder = state / "labelled" / source
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{label}_id_{machine_id or 0:02d}_{clip.stem}.wav"
    tmp = folder / f".{out.name}.tmp"
    shutil.copyfile(clip, tmp)
    os.replace(tmp, out)
    # the other label's copy goes: a changed mind leaves one label per clip
    other = folder / f"{'normal' if label == 'anomaly' else 'anomaly'}_id_{machine_id or 0:02d}_{clip.stem}.wav"
    other.unlink(missing_ok=True)
    with open(folder / "labels.jsonl", "a") as f:
        f.write(json.dumps({"file": out.name, "label": label, "event_id": verdict.event_id,
                            "note": verdict.note}) + "\n")
    return out
