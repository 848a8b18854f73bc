"""The page's event list on disk, so that a restarted daemon shows the alarms it had
(`<state_dir>/web_events.jsonl`).

Append-only: one line per change of an event row (`{"row": {...}}`) or of its verdict
(`{"verdict": {"id": ..., "verdict": ...}}`); reading replays the lines in order, so the last
line about an event wins. Past COMPACT_AFTER_LINES lines the file is rewritten with one line per
event kept (a temporary sibling, fsynced, renamed), so it stays bounded however long it runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from monitor.logs import get_logger

COMPACT_AFTER_LINES = 10_000


class WebEventLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lines = 0
        self._log = get_logger(stage="web")

    def load(self, keep: int) -> tuple[dict[str, dict], dict[str, str]]:
        """(alarm id -> row in start order, alarm id -> verdict), the newest `keep` events."""
        rows: dict[str, dict] = {}
        verdicts: dict[str, str] = {}
        self.lines = 0
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return rows, verdicts
        for n, line in enumerate(text.splitlines(), 1):
            self.lines += 1
            try:
                rec = json.loads(line)
                if "row" in rec:
                    rows[str(rec["row"]["id"])] = dict(rec["row"])
                elif "verdict" in rec:
                    v = rec["verdict"]
                    if v.get("verdict") is None:
                        verdicts.pop(str(v["id"]), None)
                    else:
                        verdicts[str(v["id"])] = str(v["verdict"])
            except (ValueError, KeyError, TypeError, AttributeError):
                # a line cut by a crash or a full disk: the rest is still good
                self._log.warning("web_events_line_skipped", file=str(self.path), line=n)
        while len(rows) > keep:
            verdicts.pop(rows.pop(next(iter(rows)))["id"], None)
        for row in rows.values():  # a new run starts with every alarm off
            row["open"] = False
        return rows, verdicts

    def append_row(self, row: dict, rows: dict[str, dict], verdicts: dict[str, str]) -> None:
        self._append({"row": row}, rows, verdicts)

    def append_verdict(self, alarm_id: str, verdict: str | None, rows: dict[str, dict],
                       verdicts: dict[str, str]) -> None:
        self._append({"verdict": {"id": alarm_id, "verdict": verdict}}, rows, verdicts)

    def _append(self, rec: dict, rows: dict[str, dict], verdicts: dict[str, str]) -> None:
        """Called under the sink's lock; rows and verdicts are what compaction keeps."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.lines += 1
            if self.lines > COMPACT_AFTER_LINES:
                self.compact(rows, verdicts)
        except OSError as exc:  # a full disk loses the page's history, never an alarm
            self._log.warning("web_events_write_failed", file=str(self.path),
                              error=exc.strerror or str(exc))

    def compact(self, rows: dict[str, dict], verdicts: dict[str, str]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            for alarm_id, row in rows.items():
                f.write(json.dumps({"row": row}) + "\n")
                if alarm_id in verdicts:
                    f.write(json.dumps({"verdict": {"id": alarm_id,
                                                    "verdict": verdicts[alarm_id]}}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.lines = len(rows) + sum(1 for a in rows if a in verdicts)
