"""A durable, bounded outbox for the MQTT messages that must not be lost.

Alarm events and alarm-state changes are written to `<state_dir>/outbox.sqlite` (WAL journal,
`synchronous=FULL`: each commit is fsynced) before they are handed to the MQTT client, and a row
is deleted only once the broker has acknowledged it (QoS 1 PUBACK). Rows left by a crashed or
killed daemon are sent again on the next start: delivery is at-least-once and consumers
de-duplicate on the event's stable `id` and `seq`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from monitor.errors import UsageError

KINDS = ("event", "state")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    created_s REAL NOT NULL
)
"""


@dataclass(frozen=True)
class OutboxRow:
    id: int
    kind: str  # "event" | "state"
    topic: str
    payload: bytes
    retain: bool
    created_s: float  # wall-clock time the row was written


class Outbox:
    """Thread-safe; one SQLite connection shared under a lock (writes are a few ms each)."""

    def __init__(self, path: str | Path, *, max_rows: int):
        if max_rows < 1:
            raise UsageError(f"outbox_max_events must be >= 1 (got {max_rows})")
        self.path = Path(path)
        self.max_rows = max_rows
        self.dropped = {"event": 0, "state": 0}  # rows evicted by the bound since start
        self._lock = threading.Lock()
        self._db, self._count = open_durable_table(self.path, _SCHEMA, "outbox", "the MQTT outbox")

    def add(self, kind: str, topic: str, payload: bytes, *, retain: bool) -> tuple[int, list[int]]:
        """Store one message; returns (its row id, ids of rows it superseded or evicted).

        A new alarm state replaces any older pending state on the same topic (only the latest
        retained value matters). When the outbox is full, the oldest state rows go first, then
        the oldest events.
        """
        if kind not in KINDS:
            raise ValueError(f"outbox kind must be one of {KINDS} (got {kind!r})")
        removed: list[int] = []
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if kind == "state":
                old = [r[0] for r in self._db.execute(
                    "SELECT id FROM outbox WHERE kind = 'state' AND topic = ?", (topic,))]
                if old:
                    self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in old])
                    self._count -= len(old)
                    removed += old
            while self._count >= self.max_rows:
                row = self._db.execute(
                    "SELECT id, kind FROM outbox ORDER BY kind = 'event', id LIMIT 1").fetchone()
                self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
                self._count -= 1
                self.dropped[row[1]] += 1
                removed.append(row[0])
            cur = self._db.execute(
                "INSERT INTO outbox (kind, topic, payload, retain, created_s) VALUES (?, ?, ?, ?, ?)",
                (kind, topic, sqlite3.Binary(payload), int(retain), time.time()))
            self._count += 1
            return int(cur.lastrowid), removed

    def remove(self, row_id: int) -> bool:
        """Delete an acknowledged row; False when it was already gone (a duplicate ack)."""
        with self._lock, self._db:
            cur = self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
            self._count -= cur.rowcount
            return cur.rowcount > 0

    def pending(self, limit: int | None = None) -> list[OutboxRow]:
        """Rows not yet acknowledged, oldest first."""
        sql = "SELECT id, kind, topic, payload, retain, created_s FROM outbox ORDER BY id"
        with self._lock:
            rows = self._db.execute(sql + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), bool(r[4]), r[5]) for r in rows]

    def has_pending(self, topic: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM outbox WHERE topic = ? LIMIT 1",
                                    (topic,)).fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_durable_table(path: Path, schema: str, table: str, what: str
                       ) -> tuple[sqlite3.Connection, int]:
    """An SQLite database whose every commit is fsynced (WAL, synchronous=FULL), shared across
    threads under the caller's lock; returns it and the number of rows already in `table`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                             timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(schema)
        return db, db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except (sqlite3.Error, OSError) as exc:
        raise UsageError(f"{path}: cannot open {what} ({exc})") from None


class PubackTracker:
    """Which outbox rows paho holds in this process (it re-sends those itself), matched to their
    PUBACKs by mid. An ack can arrive before publish() has returned its mid to us, so an unknown
    ack waits briefly (QoS 0 mids land there too and expire)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mid_rows: dict[int, int] = {}
        self._early_acks: dict[int, float] = {}
        self._held: set[int] = set()

    def handed(self, mid: int, row_id: int) -> bool:
        """paho took `row_id` as `mid`; True when its ack has already come."""
        with self._lock:
            self._held.add(row_id)
            if self._early_acks.pop(mid, None) is None:
                self._mid_rows[mid] = row_id
                return False
            return True

    def acked(self, mid: int) -> int | None:
        """The row a PUBACK is for, or None when publish() has not returned its mid yet."""
        now = time.monotonic()
        with self._lock:
            row_id = self._mid_rows.pop(mid, None)
            if row_id is None:
                self._early_acks[mid] = now
                if len(self._early_acks) > 256:
                    self._early_acks = {m: t for m, t in self._early_acks.items()
                                        if now - t < 5.0}
        return row_id

    def release(self, row_ids) -> None:
        """Rows acked, evicted or superseded: paho's copy no longer counts as held."""
        with self._lock:
            self._held.difference_update(row_ids)

    def holds(self, row_id: int) -> bool:
        with self._lock:
            return row_id in self._held

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
