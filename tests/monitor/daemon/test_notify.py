"""sd_notify: messages arrive on a real AF_UNIX datagram socket, path and abstract namespace."""

import os
import socket
import threading
import uuid

import numpy as np
import soundfile as sf

from monitor.daemon.notify import SystemdNotifier
from tests.helpers import tone_clip


def listen(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(60)
    return sock


def test_notify_to_a_path_socket_and_the_abstract_namespace(tmp_path):
    path = str(tmp_path / "notify.sock")
    with listen(path) as sock:
        n = SystemdNotifier({"NOTIFY_SOCKET": path})
        assert n.ready() and sock.recv(100) == b"READY=1"
    name = f"harken-test-{uuid.uuid4().hex}"
    with listen(b"\0" + name.encode()) as sock:
        n = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert n.stopping() and sock.recv(100) == b"STOPPING=1"
    silent = SystemdNotifier({})
    assert not silent.enabled and not silent.ready() and silent.watchdog_interval_s is None


def test_watchdog_interval_is_half_the_period_and_only_for_this_pid():
    assert SystemdNotifier({"WATCHDOG_USEC": "20000000"}).watchdog_interval_s == 10.0
    assert SystemdNotifier({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    mine = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier(mine).watchdog_interval_s == 2.0


def test_daemon_sends_ready_watchdog_and_stopping(tmp_path, tiny_model):
    from monitor.daemon.app import Daemon
    from monitor.daemon.config import DaemonConfig, SourceConfig

    d = tmp_path / "drop"
    d.mkdir()
    sf.write(d / "001.wav", tone_clip(np.random.default_rng(0), 0, False), 16000)
    path = str(tmp_path / "notify.sock")
    sock = listen(path)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    cfg = DaemonConfig(sources=(SourceConfig(id="f", kind="folder", model=str(tiny_model),
                                             path=str(d), watch=True, poll_s=0.05),),
                       node="t", device="cpu", state_dir=str(tmp_path / "state"),
                       jsonl=str(tmp_path / "out.jsonl"))
    daemon = Daemon(cfg, notifier=notifier)
    result = {}
    runner = threading.Thread(target=lambda: result.update(rc=daemon.run()))
    runner.start()
    try:
        assert sock.recv(100) == b"READY=1"
        assert sock.recv(100) == b"WATCHDOG=1"
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        daemon.request_stop()
        runner.join(timeout=60)
    messages = []
    sock.settimeout(0.5)
    try:
        while True:
            messages.append(sock.recv(100))
    except socket.timeout:
        pass
    sock.close()
    assert messages[-1] == b"STOPPING=1"
    assert set(messages[:-1]) <= {b"WATCHDOG=1"}
    assert result == {"rc": 0}


def test_no_watchdog_while_inference_is_dead(tmp_path, tiny_model):
    import shutil

    from monitor.daemon.app import Daemon
    from monitor.daemon.config import DaemonConfig, SourceConfig
    from tests.monitor.daemon.conftest import wait_until

    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = DaemonConfig(sources=(SourceConfig(id="f", kind="folder", model=str(tiny_model),
                                             path=str(drop), watch=True, poll_s=0.05),),
                       node="t", device="cpu", state_dir=str(tmp_path / "state"),
                       jsonl=str(tmp_path / "out.jsonl"), watchdog_dead_s=1.0)
    daemon = Daemon(cfg, notifier=SystemdNotifier({}))
    daemon.start()
    try:
        daemon.reporter.started_mono -= 5.0  # silent for longer than watchdog_dead_s...
        assert daemon.alive()  # ...but an idle watched folder is waiting, not dead
        shutil.rmtree(drop)  # the share is gone: the only source is dead
        wait_until(lambda: daemon.sources["f"].status()["state"] == "stalled", what="stalled")
        assert not daemon.alive()
        drop.mkdir()
        wait_until(lambda: daemon.sources["f"].status()["state"] != "stalled", what="back")
        assert daemon.alive()
        daemon.worker.heartbeat_mono_s -= 100.0  # a hung inference worker
        assert not daemon.alive()
    finally:
        daemon.stop()
