"""`harken watch --once` against a real broker and a real MqttPublisher."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from monitor.daemon.mqtt import MqttPublisher
from monitor.daemon.types import Score
from monitor.daemon.watch import WatchState, score_bar
from tests.helpers import REPO
from tests.monitor.daemon.conftest import fast_mqtt, wait_until


def run_watch(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor.daemon.watch", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s,
                          env=os.environ | {"PYTHONPATH": str(REPO)})


def test_watch_once_shows_score_alarm_and_node_status(broker, tmp_path):
    pub = MqttPublisher(fast_mqtt(broker), node="line1", source_ids=("pump", "fan"),
                        state_dir=tmp_path, password=None)
    pub.start()
    wait_until(lambda: pub.status()["connected"], what="publisher connected")
    pub.publish_alarm_state("pump", True)
    pub.publish_source_state("pump", "running")
    pub.publish_alarm_state("fan", False)
    done = threading.Event()

    def keep_scoring():  # scores are not retained: keep them coming while watch listens
        while not done.wait(0.1):
            pub.publish_score(Score(source="pump", model="m", score=0.75, threshold=0.5,
                                    window_start_s=0.0, window_end_s=1.0, ready_mono_s=0.0,
                                    scored_time_s=1.0))
    thread = threading.Thread(target=keep_scoring)
    thread.start()
    try:
        proc = run_watch("--broker", broker.address, "--once", "1.5")
    finally:
        done.set()
        thread.join()
        pub.stop()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["NODE", "SOURCE", "SCORE", "THRESHOLD"]
    pump = next(line for line in lines if " pump " in line).split()
    fan = next(line for line in lines if " fan " in line).split()
    assert pump[:4] == ["line1", "pump", "0.75", "0.5"]
    assert "ON" in pump and "running" in pump and pump[-1] == "online"
    assert fan[:3] == ["line1", "fan", "-"] and "OFF" in fan


def test_watch_filters_by_node_and_prefix(broker, tmp_path):
    pub = MqttPublisher(fast_mqtt(broker, topic_prefix="plant/a"), node="n2",
                        source_ids=("pump",), state_dir=tmp_path, password=None)
    pub.start()
    pub.publish_alarm_state("pump", True)
    wait_until(lambda: pub.status()["outbox_pending"] == 0, what="alarm acknowledged")
    pub.stop()
    other = run_watch("--broker", broker.address, "--prefix", "plant/a", "--node", "n1",
                      "--once", "0.5")
    mine = run_watch("--broker", broker.address, "--prefix", "plant/a", "--node", "n2",
                     "--once", "0.5")
    assert other.stdout.strip() == "no harken sources seen yet"
    row = next(line for line in mine.stdout.splitlines() if " pump " in line).split()
    assert row[0] == "n2" and "ON" in row and row[-1] == "stopped"


@pytest.mark.parametrize("args, match", [
    (["--broker", "localhost:notaport"], "--broker"),
    (["--node", "a/b"], "--node"),
    (["--prefix", "x/+"], "--prefix"),
    (["--password-file", "/nonexistent"], "--password-file needs --username"),
    (["--once", "0"], "--once"),
])
def test_usage_errors_are_one_line_exit_2(args, match):
    proc = run_watch(*args, "--once", "0.2") if "--once" not in args else run_watch(*args)
    assert proc.returncode == 2
    assert match in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_score_bar_marks_the_threshold():
    assert score_bar(0.25, 0.5) == "[#####-----|---------] "
    assert score_bar(2.0, 0.5) == "[##########|#########]!"
    assert score_bar(None, 0.5) == ""


def test_state_ignores_foreign_and_malformed_topics():
    state = WatchState("harken")
    assert state.update("other/n/pump/score", b"{}") is None
    assert state.update("harken/n/pump/score", b"not json") is None
    assert state.update("harken/n/pump/alarm", b"ON") == ("n", "pump alarm ON")
    assert "ON" in state.table(now_s=0.0)
