"""The capture box's durable outbox of windows: each complete window is written to
`<state_dir>/window_outbox.sqlite` before it is handed to the MQTT client and deleted only on
the broker's PUBACK, so a broker outage (or a restart of the capture box) loses no audio up to
`distributed.window_outbox_max` windows; beyond, the oldest go first and are counted.

Its own file rather than rows in outbox.sqlite: windows are large (a 10 s window is 640 kB)
and carry MQTT 5 user properties, and a burst of them must never evict an alarm event.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from monitor.daemon.outbox import open_durable_table

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    props TEXT NOT NULL,
    created_s REAL NOT NULL
)
"""


@dataclass(frozen=True)
class WindowRow:
    id: int
    topic: str
    payload: bytes
    props: list[tuple[str, str]]


class WindowOutbox:
    """Thread-safe; one connection under a lock. `dropped` has one writer (the sender)."""

    def __init__(self, path: str | Path, *, max_rows: int):
        self.path = Path(path)
        self.max_rows = max_rows
        self.dropped = 0
        self._lock = threading.Lock()
        self._db, self._count = open_durable_table(self.path, _SCHEMA, "windows",
                                                   "the window outbox")

    def add_many(self, rows: list[tuple[str, bytes, list[tuple[str, str]]]]) -> list[int]:
        """Store windows in one transaction (one fsync); returns the ids of rows evicted to
        make room (oldest first)."""
        evicted: list[int] = []
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                excess = self._count + len(rows) - self.max_rows
                if excess > 0:
                    evicted = [r[0] for r in self._db.execute(
                        "SELECT id FROM windows ORDER BY id LIMIT ?", (excess,))]
                    self._db.executemany("DELETE FROM windows WHERE id = ?",
                                         [(i,) for i in evicted])
                    self._count -= len(evicted)
                    self.dropped += len(evicted)
                self._db.executemany(
                    "INSERT INTO windows (topic, payload, props, created_s) VALUES (?, ?, ?, ?)",
                    [(t, sqlite3.Binary(p), json.dumps(pr), now) for t, p, pr in rows])
                self._count += len(rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return evicted

    def remove(self, row_id: int) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM windows WHERE id = ?", (row_id,))
            self._count -= cur.rowcount
            return cur.rowcount > 0

    def pending_after(self, after_id: int, limit: int) -> list[WindowRow]:
        """Rows with id > after_id, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload, props FROM windows WHERE id > ? "
                                    "ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [WindowRow(r[0], r[1], bytes(r[2]), [tuple(x) for x in json.loads(r[3])])
                for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        with self._lock:
            self._db.close()
