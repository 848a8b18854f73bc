"""Replay mode: WAV files from a folder, in name order, at full speed or in real time,
optionally waiting for new files (a recorder dropping clips into a directory).

Each file is its own stream: it is cut with `monitor.audio.split_windows` exactly as
`harken replay` cuts it (short files zero-padded to one window), and its windows go straight
to inference, so a folder source and `harken replay` give the same scores for the same files.
Timestamps follow the audio: files are laid end to end from the moment the source started
(in real time, never earlier than the moment a file is played).

Bad files (truncated, lying headers, not audio, empty, vanished) are skipped, counted by reason
and warned about at a limited rate; the source goes on. A watched folder that disappears (an
unmounted share) makes the source `stalled`: it is looked for again with a back-off and
playing resumes where it left off once it is back.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from monitor.audio import SAMPLE_RATE_HZ, iter_windows, load_audio
from monitor.daemon.config import SourceConfig
from monitor.daemon.ratelimit import RateLimitedWarning
from monitor.daemon.types import BlockSink, Window, WindowSink
from monitor.errors import AudioError
from monitor.labels import AUDIO_SUFFIXES, parse_clip
from monitor.logs import get_logger
from monitor.replay import SILENCE_PEAK, SkipCounter

MAX_FILE_S = 3600.0  # longer files are skipped (counted): each is read whole into memory
MISSING_BACKOFF_MAX_S = 30.0  # a vanished watched folder is looked for at most this far apart


def _header_seconds(path: Path) -> float | None:
    """Duration the file's header claims, or None when it has no readable header (the full
    read then reports why)."""
    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate if info.samplerate > 0 else None
    except (RuntimeError, ValueError, OSError, TypeError):  # LibsndfileError is a RuntimeError
        return None


class FolderSource:
    def __init__(self, config: SourceConfig, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 wait: Callable[[float], bool] | None = None, keep_silent: bool = False,
                 played_path: Path | None = None):
        """`clock`/`wait` are injectable so tests can check real-time pacing without sleeping:
        wait(seconds) returns True when the source was stopped meanwhile. `keep_silent` plays
        all-zero files too (the daemon's sensor-fault check wants to see them).
        `played_path` (watch mode): where the files already played are remembered across
        restarts, so a restart does not score a whole drop directory again."""
        self.id = config.id
        self.config = config
        self.root = Path(config.path or ".")
        self._clock = clock
        self._wall = wall
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._thread: threading.Thread | None = None
        self._finished = False
        self._done: set[Path] = set()
        self._sizes: dict[Path, int] = {}
        self._timeline_s: float | None = None
        self._files_end_s: float | None = None  # end of the last file played (watch mode)
        self.keep_silent = keep_silent
        self.skips = SkipCounter()
        self.skipped_by_reason: dict[str, int] = {}
        self.missing = False  # a watched folder that is not there (stalled)
        self.missing_episodes = 0
        self._missing_polls = 0
        self._warn = RateLimitedWarning(get_logger(stage="source", source=self.id), every_s=60.0)
        self.files = 0
        self.windows = 0
        self.waits_s: list[float] = []  # pacing waits, for tests and benchmarks
        self.last_audio_mono_s: float | None = None
        self.error: str | None = None
        self.played = PlayedFiles(played_path, self.root) if played_path and config.watch else None

    # ------------------------------------------------------------------ Source protocol

    def start(self, on_block: BlockSink, on_window: WindowSink) -> None:
        self._on_window = on_window
        self._thread = threading.Thread(target=self._run, name=f"harken-folder-{self.id}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def finished(self) -> bool:
        return self._finished

    def status(self) -> dict:
        state = "ended" if self._finished else "stalled" if self.missing else "running"
        return {"state": state, "kind": "folder", "files": self.files, "windows": self.windows,
                "skipped": self.skips.total, "skipped_by_reason": dict(self.skipped_by_reason),
                "missing_episodes": self.missing_episodes,
                "last_audio_mono_s": self.last_audio_mono_s}

    # ------------------------------------------------------------------ work

    def _run(self) -> None:
        import structlog

        structlog.contextvars.bind_contextvars(stage="source", source=self.id)
        log = get_logger()
        log.info("source_started", kind="folder", path=str(self.root), speed=self.config.speed,
                 watch=self.config.watch)
        if self.played is not None:
            self.played.load(log)
        try:
            while not self._stop.is_set():
                if self.config.watch and not self._root_present(log):
                    if self._wait(self._missing_delay_s()):
                        break
                    continue
                for path in self._ready_files():
                    if self._stop.is_set():
                        break
                    if self.played is not None and self.played.seen(path):
                        self._done.add(path)  # played before a restart: not again
                        self._sizes.pop(path, None)
                        self.skipped_by_reason["played_before"] = (
                            self.skipped_by_reason.get("played_before", 0) + 1)
                        continue
                    completed = self._play(path, log)
                    self._done.add(path)
                    self._sizes.pop(path, None)
                    if self.played is not None and completed:
                        self.played.add(path, log)
                if not self.config.watch or self._stop.is_set():
                    break
                if self._wait(self.config.poll_s):
                    break
        except Exception as exc:  # noqa: BLE001 - reported as a dead source, daemon decides
            self.error = str(exc)
            log.exception("source_failed", error=str(exc))
        self._finished = not self.config.watch or self.error is not None
        log.info("source_ended" if self._finished else "source_stopped", files=self.files,
                 windows=self.windows)

    def _root_present(self, log) -> bool:
        """Whether the watched folder is there; logs each change once (not every poll)."""
        present = self.root.is_dir()
        if not present and not self.missing:
            self.missing = True
            self.missing_episodes += 1
            self._missing_polls = 0
            log.warning("folder_missing", path=str(self.root),
                        hint="retrying with back-off; playing resumes when it is back")
        elif present and self.missing:
            self.missing = False
            log.info("folder_back", path=str(self.root))
        return present

    def _missing_delay_s(self) -> float:
        """poll_s, doubling per failed look up to MISSING_BACKOFF_MAX_S (or poll_s if larger)."""
        self._missing_polls += 1
        cap = max(self.config.poll_s, MISSING_BACKOFF_MAX_S)
        return min(self.config.poll_s * 2 ** min(self._missing_polls - 1, 16), cap)

    def _ready_files(self) -> list[Path]:
        """New files in name order; when watching, only those whose size held across two
        polls (a recorder may still be writing the newest one)."""
        try:
            listed = sorted(p for p in self.root.rglob("*")
                            if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        except OSError:  # the folder vanished while it was listed: the next poll sees it
            return []
        found = [p for p in listed if p not in self._done]
        if not self.config.watch:
            return found
        # A recorder rotates old files away: forget them, or this set grows for ever.
        self._done.intersection_update(listed)
        if self.played is not None:
            self.played.retain(listed, get_logger(stage="source", source=self.id))
        ready = []
        for p in found:
            try:
                size = p.stat().st_size
            except OSError:  # removed between listing and stat
                self._sizes.pop(p, None)
                continue
            if size > 0 and self._sizes.get(p) == size:
                ready.append(p)
            self._sizes[p] = size
        return ready

    def _skip(self, path: Path, reason: str, detail: str) -> None:
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
        self._warn("file_skipped", reason, file=str(path), reason=reason, detail=detail,
                   skipped=self.skipped_by_reason[reason])

    def _load(self, path: Path) -> np.ndarray | None:
        """16 kHz mono audio, or None (counted, warned at a limited rate) for a bad file."""
        seconds = _header_seconds(path)
        if seconds is not None and seconds > MAX_FILE_S:
            # A whole file is read into memory: a day-long recording (or a lying header)
            # dropped into the folder must not take the daemon's memory with it.
            self.skips.unreadable += 1
            self._skip(path, "too_long", f"{path}: {seconds:.0f} s of audio is more than "
                       f"{MAX_FILE_S:.0f} s; split it into shorter files")
            return None
        try:
            mono = load_audio(path)
        except AudioError as exc:
            self.skips.unreadable += 1
            self._skip(path, "unreadable", str(exc))
            return None
        except MemoryError:  # a header claiming gigabytes of samples
            self.skips.unreadable += 1
            self._skip(path, "too_large", f"{path}: too large to read")
            return None
        if not self.keep_silent and float(np.max(np.abs(mono))) < SILENCE_PEAK:
            self.skips.silent += 1
            self._skip(path, "silent", f"{path}: silent (all samples ~0)")
            return None
        return mono

    def _play(self, path: Path, log) -> bool:
        """Hand the file's windows on; True when it was dealt with completely (played, or
        skipped as unusable), False when a stop interrupted it."""
        mono = self._load(path)
        self.files += 1
        if mono is None:
            return True
        cfg = self.config
        win = int(round(cfg.window_s * SAMPLE_RATE_HZ))
        now = self._wall()
        if self._timeline_s is None:
            self._timeline_s = now
        file_t0 = self._timeline_s if cfg.speed == "max" else max(self._timeline_s, now)
        duration_s = max(len(mono), win) / SAMPLE_RATE_HZ
        if cfg.watch:
            # A recorder's file was captured just before it was last written: stamp it then,
            # not end to end after the previous file (that drifts by every pause between files).
            try:
                recorded = path.stat().st_mtime - len(mono) / SAMPLE_RATE_HZ
                file_t0 = recorded if self._files_end_s is None else max(recorded, self._files_end_s)
            except OSError:
                pass
        self._timeline_s = self._files_end_s = file_t0 + duration_s
        machine_id = cfg.machine_id if cfg.machine_id is not None else parse_clip(path).machine_id
        play_mono = self._clock()
        # One window at a time (views into the file): a long file at a small hop never
        # exists as all its windows at once.
        for start, view in iter_windows(mono, cfg.window_s, cfg.hop_s):
            if cfg.speed == "realtime":
                # A window is ready when its last sample would have been captured.
                due = play_mono + (start + win) / SAMPLE_RATE_HZ / cfg.time_scale
                delay = due - self._clock()
                if delay > 0:
                    self.waits_s.append(delay)
                    if self._wait(delay):
                        return False
            if self._stop.is_set():
                return False
            samples = np.array(view, dtype=np.float32)  # its own copy: the file is released
            self.last_audio_mono_s = self._clock()
            self.windows += 1
            self._on_window(Window(source=self.id, samples=samples,
                                   start_time_s=file_t0 + start / SAMPLE_RATE_HZ,
                                   duration_s=cfg.window_s, ready_mono_s=self.last_audio_mono_s,
                                   label=str(path), machine_id=machine_id))
        return True


class PlayedFiles:
    """The files a watched folder has played, remembered in the state directory.

    An append-only journal of JSON lines (path relative to the folder, size, mtime in ns), one
    per file, fsynced: a crash loses at most the file being played. A file replaced under the
    same name (other size or mtime) is new and played. On load the journal is compacted to the
    files still in the folder (atomic replace), so it stays as large as the folder, not as its
    history. Writing trouble (a full disk) is warned about once; playing goes on.
    """

    def __init__(self, path: Path, root: Path):
        self.path = Path(path)
        self.root = root
        self._known: dict[str, tuple[int, int]] = {}
        self._journal_lines = 0
        self._failed = False

    def _key(self, p: Path) -> tuple[str, tuple[int, int]] | None:
        try:
            st = p.stat()
            rel = str(p.relative_to(self.root))
        except (OSError, ValueError):
            return None
        return rel, (st.st_size, st.st_mtime_ns)

    def load(self, log) -> None:
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("played_list_unreadable", path=str(self.path), error=str(exc))
            return
        self._journal_lines = len(lines)
        for line in lines:
            try:
                rec = json.loads(line)
                self._known[str(rec["p"])] = (int(rec["s"]), int(rec["m"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash
        present = {rel: sig for rel, sig in self._known.items() if (self.root / rel).exists()}
        if len(present) < len(self._known):
            self._known = present
            self._rewrite(log)
        log.info("played_list_loaded", path=str(self.path), files=len(self._known))

    def seen(self, p: Path) -> bool:
        key = self._key(p)
        return key is not None and self._known.get(key[0]) == key[1]

    def add(self, p: Path, log) -> None:
        key = self._key(p)
        if key is None:
            return
        self._known[key[0]] = key[1]
        if self._failed:
            return
        line = json.dumps({"p": key[0], "s": key[1][0], "m": key[1][1]}) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._journal_lines += 1
        except OSError as exc:
            self._failed = True
            log.warning("played_list_write_failed", path=str(self.path), error=str(exc),
                        hint="after a restart, files played since may be played again")

    def retain(self, listed: list[Path], log) -> None:
        """Forget files no longer in the folder; compact the journal once it is mostly history."""
        if len(self._known) > len(listed) or self._journal_lines > 2 * len(self._known) + 100:
            names = {str(p.relative_to(self.root)) for p in listed}
            self._known = {rel: sig for rel, sig in self._known.items() if rel in names}
            if self._journal_lines > 2 * len(self._known) + 100 and not self._failed:
                self._rewrite(log)

    def _rewrite(self, log) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                for rel, (size, mtime) in self._known.items():
                    f.write(json.dumps({"p": rel, "s": size, "m": mtime}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._journal_lines = len(self._known)
        except OSError as exc:
            self._failed = True  # warned once; the list in memory still serves this run
            log.warning("played_list_write_failed", path=str(self.path), error=str(exc),
                        hint="after a restart, files played since may be played again")
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
