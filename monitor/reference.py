"""A source's normal-reference overlay: windows a person judged normal (a `normal` verdict on
an alarm), kept in the state directory next to, never inside, the model artifact.

Layout under `<state_dir>/reference/<source>/`:
- `current.json`: the version in force, its tensor file and the verdicts it holds (listed,
  each undoable);
- `vNNNNNN.safetensors`: `embeddings` (windows, dim) raw encoder embeddings and
  `machine_ids` (windows,) int64, -1 where unknown.
Every change writes a new version (tensor file first, then `current.json`, each atomically),
so a reader sees either the old overlay or the new one, never half of one. The overlay is
bounded (`max_windows`): a verdict that would pass the bound is refused, not made room for,
since dropping an old verdict would silently bring its false alarm back.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from monitor.errors import UsageError

MAX_WINDOWS_DEFAULT = 500
VERSIONS_KEPT = 20  # older tensor files are removed; current.json lists only the live entries


@dataclass(frozen=True)
class OverlayEntry:
    verdict_id: str
    event_id: str
    windows: int
    recorded_time_s: float
    note: str | None = None

    def to_json(self) -> dict:
        out = {"verdict_id": self.verdict_id, "event_id": self.event_id, "windows": self.windows,
               "recorded_time_s": round(self.recorded_time_s, 3)}
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class Overlay:
    """One version of a source's overlay; version 0 is the empty one."""

    version: int = 0
    entries: tuple[OverlayEntry, ...] = ()
    embeddings: torch.Tensor | None = None  # (windows, dim) float32, rows in entry order
    machine_ids: tuple[int | None, ...] = field(default=())

    @property
    def windows(self) -> int:
        return 0 if self.embeddings is None else int(self.embeddings.shape[0])


class ReferenceStore:
    def __init__(self, state_dir: str | Path, source: str, *,
                 max_windows: int = MAX_WINDOWS_DEFAULT):
        self.root = Path(state_dir) / "reference" / source
        self.source = source
        self.max_windows = max_windows

    @property
    def current_path(self) -> Path:
        return self.root / "current.json"

    def version(self) -> int:
        """The version in force (0: none); cheap, for polling."""
        try:
            return int(json.loads(self.current_path.read_text())["version"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{self.current_path}: unreadable reference overlay ({exc})") from None

    def load(self) -> Overlay:
        try:
            meta = json.loads(self.current_path.read_text())
        except FileNotFoundError:
            return Overlay()
        except (OSError, ValueError) as exc:
            raise UsageError(f"{self.current_path}: unreadable reference overlay ({exc})") from None
        entries = tuple(OverlayEntry(**e) for e in meta["entries"])
        if not entries:
            return Overlay(version=int(meta["version"]))
        tensors = load_file(str(self.root / meta["file"]))
        ids = tuple(None if int(i) < 0 else int(i) for i in tensors["machine_ids"].tolist())
        return Overlay(int(meta["version"]), entries, tensors["embeddings"].float(), ids)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (the daemon and `harken verdict` may both write)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add(self, event_id: str, verdict_id: str, embeddings: torch.Tensor,
            machine_ids: list[int | None], note: str | None = None) -> Overlay:
        """A new version with these windows added; refused when the event is already in it
        or the bound would be passed."""
        if embeddings.ndim != 2 or embeddings.shape[0] != len(machine_ids) or not len(machine_ids):
            raise ValueError(f"embeddings {tuple(embeddings.shape)} for {len(machine_ids)} windows")
        with self._locked():
            old = self.load()
            if any(e.event_id == event_id for e in old.entries):
                raise UsageError(f"event {event_id} is already in the normal reference of "
                                 f"{self.source} (verdict {self._entry(old, event_id).verdict_id})")
            if old.windows + embeddings.shape[0] > self.max_windows:
                raise UsageError(f"the normal reference of {self.source} holds {old.windows} "
                                 f"windows, the bound is {self.max_windows}: undo some verdicts "
                                 "or export the model and retrain")
            if old.embeddings is not None and old.embeddings.shape[1] != embeddings.shape[1]:
                raise UsageError(f"{self.root}: the overlay holds {old.embeddings.shape[1]}-dim "
                                 f"embeddings, this model gives {embeddings.shape[1]}; was the "
                                 "source's model replaced? remove the overlay directory")
            emb = embeddings.float().cpu()
            all_emb = emb if old.embeddings is None else torch.cat([old.embeddings, emb])
            entry = OverlayEntry(verdict_id, event_id, int(emb.shape[0]), time.time(), note)
            return self._write(old.version + 1, (*old.entries, entry), all_emb,
                               (*old.machine_ids, *machine_ids))

    def undo(self, verdict_id: str | None = None) -> OverlayEntry:
        """Remove one verdict's windows (the newest when verdict_id is None)."""
        with self._locked():
            old = self.load()
            if not old.entries:
                raise UsageError(f"the normal reference of {self.source} is empty: nothing to undo")
            pick = len(old.entries) - 1 if verdict_id is None else next(
                (i for i, e in enumerate(old.entries) if e.verdict_id == verdict_id), None)
            if pick is None:
                known = ", ".join(e.verdict_id for e in old.entries[-5:])
                raise UsageError(f"no verdict {verdict_id} in the normal reference of "
                                 f"{self.source} (latest: {known})")
            start = sum(e.windows for e in old.entries[:pick])
            stop = start + old.entries[pick].windows
            assert old.embeddings is not None
            keep = torch.cat([old.embeddings[:start], old.embeddings[stop:]])
            ids = (*old.machine_ids[:start], *old.machine_ids[stop:])
            entries = old.entries[:pick] + old.entries[pick + 1:]
            self._write(old.version + 1, entries, keep, ids)
            return old.entries[pick]

    def _entry(self, overlay: Overlay, event_id: str) -> OverlayEntry:
        return next(e for e in overlay.entries if e.event_id == event_id)

    def _write(self, version: int, entries, embeddings: torch.Tensor, machine_ids) -> Overlay:
        name = f"v{version:06d}.safetensors"
        if entries:
            ids = torch.tensor([-1 if m is None else int(m) for m in machine_ids], dtype=torch.int64)
            tmp = self.root / f".{name}.tmp"
            save_file({"embeddings": embeddings.contiguous(), "machine_ids": ids}, str(tmp))
            _fsync_replace(tmp, self.root / name)
        meta = {"version": version, "file": name if entries else None, "source": self.source,
                "entries": [e.to_json() for e in entries]}
        tmp = self.root / ".current.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        _fsync_replace(tmp, self.current_path)
        for old in sorted(self.root.glob("v*.safetensors"))[:-VERSIONS_KEPT]:
            old.unlink(missing_ok=True)
        if not entries:
            return Overlay(version)
        return Overlay(version, tuple(entries), embeddings, tuple(machine_ids))


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
