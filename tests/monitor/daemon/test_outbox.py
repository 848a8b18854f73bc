"""The durable outbox: survives reopening (and SIGKILL), bounded, coalesces alarm states."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from monitor.daemon.outbox import Outbox
from monitor.errors import UsageError
from tests.helpers import REPO


def test_rows_survive_reopen_and_are_removed_once(tmp_path):
    box = Outbox(tmp_path / "outbox.sqlite", max_rows=10)
    a, _ = box.add("event", "h/n/s/event", b'{"id": "a"}', retain=False)
    b, _ = box.add("state", "h/n/s/alarm", b"ON", retain=True)
    box.close()
    box = Outbox(tmp_path / "outbox.sqlite", max_rows=10)
    rows = box.pending()
    assert [(r.id, r.kind, r.topic, r.payload, r.retain) for r in rows] == [
        (a, "event", "h/n/s/event", b'{"id": "a"}', False), (b, "state", "h/n/s/alarm", b"ON", True)]
    assert box.remove(a) is True
    assert box.remove(a) is False  # a duplicate ack
    assert len(box) == 1 and box.has_pending("h/n/s/alarm") and not box.has_pending("h/n/s/event")


def test_a_new_alarm_state_supersedes_the_pending_one(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_rows=10)
    on, _ = box.add("state", "h/n/s/alarm", b"ON", retain=True)
    other, _ = box.add("state", "h/n/t/alarm", b"ON", retain=True)
    off, removed = box.add("state", "h/n/s/alarm", b"OFF", retain=True)
    assert removed == [on]
    assert [(r.id, r.payload) for r in box.pending()] == [(other, b"ON"), (off, b"OFF")]


def test_bound_drops_states_before_events(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_rows=3)
    e1, _ = box.add("event", "t/e", b"1", retain=False)
    s1, _ = box.add("state", "t/a", b"ON", retain=True)
    e2, _ = box.add("event", "t/e", b"2", retain=False)
    e3, removed = box.add("event", "t/e", b"3", retain=False)
    assert removed == [s1]
    e4, removed = box.add("event", "t/e", b"4", retain=False)
    assert removed == [e1]
    assert [r.id for r in box.pending()] == [e2, e3, e4]
    assert box.dropped == {"event": 1, "state": 1} and len(box) == 3


def test_rows_written_before_sigkill_are_there_after(tmp_path):
    path = tmp_path / "o.sqlite"
    code = (
        "import os, sys, signal\n"
        "from monitor.daemon.outbox import Outbox\n"
        f"box = Outbox({str(path)!r}, max_rows=100)\n"
        "for i in range(20): box.add('event', 't/e', str(i).encode(), retain=False)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    box = Outbox(path, max_rows=100)
    assert [r.payload for r in box.pending()] == [str(i).encode() for i in range(20)]


def test_a_file_that_is_not_a_database_is_a_usage_error(tmp_path):
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UsageError, match="outbox"):
        Outbox(path, max_rows=10)
