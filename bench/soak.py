"""Soak test of `harken monitor`: many sources for many minutes while the broker keeps dying.

    python -m bench.soak --sources 8 --minutes 10 --broker-restart-s 60 --kill-source-s 45

Builds (or reuses, under --workdir) a small synthetic slide-rail data set and a small mel+MLP
model, starts its own Mosquitto on a free port, and runs the daemon as a subprocess with N
sources at `--time-scale` times real time: even-numbered ones are watched folders that a
"recorder" thread fills with clips, odd-numbered ones are MQTT audio feeds that a sender thread
streams. Every `--broker-restart-s` the broker is SIGKILLed and restarted; every
`--kill-source-s` one source goes away for a while (its folder is moved out, or its feed stops)
and comes back. A durable subscriber counts what arrives. At the end it prints events produced
(the daemon's JSONL sink) / delivered / duplicated / missing, windows scored / dropped, and the
daemon's RSS at start and end.

The broker harness is a copy of the few lines of `tests/mosquitto.py` this needs: `bench`
never imports `tests` (the tests are not installed with harken and their helpers change freely).

One module (about 450 lines): the soak is one script whose threads (recorder, sender, broker
killer, subscriber) share one run's state and only make sense together.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from monitor.errors import UsageError

RATE = 16_000
NODE = "soak"
CHUNK_S = 0.5
# One alarm per cycle: 4 normal windows, 3 anomalous, 5 normal (hold_s 30 ends it).
CYCLE = ["normal"] * 4 + ["anomaly"] * 3 + ["normal"] * 5


# --------------------------------------------------------------------------- broker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A Mosquitto on 127.0.0.1:port with persistence saved on every change, so a SIGKILL
    loses neither the subscriber's session nor the QoS 1 messages queued for it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.exe = os.environ.get("HARKEN_MOSQUITTO", shutil.which("mosquitto") or "/usr/sbin/mosquitto")
        if not Path(self.exe).is_file():
            raise UsageError("soak: mosquitto not found (apt-get install mosquitto, or set "
                             "$HARKEN_MOSQUITTO)")
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 "log_dest stderr", "log_type error", "max_queued_messages 1000000",
                 "persistence true", f"persistence_location {workdir}/",
                 "autosave_on_changes true", "autosave_interval 1"]
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start on port {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- subscriber


class Counter:
    """A durable subscriber to everything under the prefix: events by (id, type, seq)."""

    def __init__(self, port: int):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.lock = threading.Lock()
        self.events: dict[tuple, int] = {}
        self.scores = 0
        self.states: list[tuple[str, str]] = []
        self.online = threading.Event()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="harken-soak-counter",
                                  protocol=paho.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: (
            None if rc.is_failure else c.subscribe("harken/#", qos=1))
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 24 * 3600
        self.client.connect("127.0.0.1", port, keepalive=5, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("soak: subscriber did not get its SUBACK")

    def _on_message(self, client, userdata, message) -> None:
        leaf = message.topic.rsplit("/", 1)[-1]
        with self.lock:
            if leaf == "event":
                e = json.loads(message.payload)
                key = (e["id"], e["type"], e["seq"])
                self.events[key] = self.events.get(key, 0) + 1
            elif leaf == "score":
                self.scores += 1
            elif leaf == "state":
                self.states.append((message.topic.split("/")[-2], message.payload.decode()))
            elif leaf == "status" and message.payload == b"online":
                self.online.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --------------------------------------------------------------------------- data and model


def build_assets(workdir: Path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """A small synthetic data set and model under workdir, reused when already there."""
    from train.config import load_train_config
    from train.fit import fit_model
    from train.synth import write_dataset

    data, model = workdir / "data", workdir / "model"
    if not (data / "labels.csv").is_file():
        shutil.rmtree(data, ignore_errors=True)
        print(f"soak: writing a small synthetic data set to {data}", flush=True)
        write_dataset(data, ids=(0,), n_train=24, n_test_normal=6, n_test_anomaly=6,
                      progress=False)
    if not (model / "manifest.json").is_file():
        print(f"soak: training a small model into {model}", flush=True)
        # Narrow layers: the seed's widths make a 350 MB artifact, which would dominate RSS.
        fit_model(data, model, load_train_config(None, max_epochs=10, decoder_dims=(8192, 128, 32)),
                  device="cpu", progress=False)
    clips = {kind: [sf.read(p, dtype="float32")[0] for p in sorted((data / "test").glob(f"{kind}_*.wav"))]
             for kind in ("normal", "anomaly")}
    return model, clips


# --------------------------------------------------------------------------- the run


class Soak:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(args.workdir)
        self.run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self.workdir))
        self.stop = threading.Event()
        self.source_ids = [f"s{i:02d}" for i in range(args.sources)]
        self.folders = {sid: self.run_dir / "drop" / sid for i, sid in enumerate(self.source_ids)
                        if i % 2 == 0}
        self.feeds = [sid for sid in self.source_ids if sid not in self.folders]
        self.paused: set[str] = set()  # sources taken away by the source killer
        self.lock = threading.Lock()
        self.counts = {"broker_restarts": 0, "source_kills": 0}

    # -- configuration

    def write_config(self, model: Path, port: int) -> Path:
        period = 10.0 / self.args.time_scale
        sources = []
        for sid in self.source_ids:
            base = {"id": sid, "model": str(model), "window_s": 10.0, "hop_s": 10.0}
            if sid in self.folders:
                self.folders[sid].mkdir(parents=True)
                sources.append(base | {"kind": "folder", "path": str(self.folders[sid]),
                                       "watch": True, "poll_s": min(1.0, period / 2),
                                       "speed": "realtime", "time_scale": self.args.time_scale})
            else:
                sources.append(base | {"kind": "mqtt", "topic": f"soak/{sid}/pcm"})
        cfg = {"node": NODE, "device": "cpu", "threads": 1, "state_dir": str(self.run_dir / "state"),
               "jsonl": str(self.run_dir / "out.jsonl"), "stats_interval_s": 10.0,
               "stall_after_s": max(3.0, 3 * period), "queue_max_windows": 256,
               "evidence": {"max_count": 20},
               "alarm": {"k": 2, "n": 3, "hold_s": 30.0},
               "mqtt": {"host": "127.0.0.1", "port": port, "keepalive_s": 5,
                        "reconnect_min_s": 0.5, "reconnect_max_s": 2.0},
               "sources": sources}
        path = self.run_dir / "harken.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    # -- producers of audio

    def recorder(self, clips) -> None:
        """Every window period, one new clip file per present folder (as a recorder would)."""
        period = 10.0 / self.args.time_scale
        store = self.run_dir / "clips"
        store.mkdir()
        paths = {}
        for kind, xs in clips.items():
            for i, x in enumerate(xs):
                paths[(kind, i)] = store / f"{kind}_{i}.wav"
                sf.write(paths[(kind, i)], x, RATE, subtype="PCM_16")
        n = 0
        while not self.stop.wait(period):
            kind = CYCLE[n % len(CYCLE)]
            src = paths[(kind, n % len(clips[kind]))]
            for sid, folder in self.folders.items():
                with self.lock:
                    if sid in self.paused or not folder.is_dir():
                        continue
                    try:
                        os.symlink(src, folder / f"{n:07d}_{kind}.wav")
                    except OSError:
                        pass  # moved away this instant by the source killer
            n += 1

    def sender(self, port: int, clips) -> None:
        """Every MQTT feed streams the cycle as s16le chunks, time_scale times real time."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from monitor.daemon.mqtt import user_properties

        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="harken-soak-sender",
                             protocol=paho.MQTTv5)
        client.reconnect_delay_set(0.2, 1.0)
        client.connect_async("127.0.0.1", port, keepalive=5)
        client.loop_start()
        chunk = int(CHUNK_S * RATE)
        audio_t0 = time.time()
        seq, n = 0, 0
        try:
            while not self.stop.is_set():
                kind = CYCLE[n % len(CYCLE)]
                x = clips[kind][n % len(clips[kind])][: 10 * RATE]
                for off in range(0, len(x) - chunk + 1, chunk):
                    if self.stop.wait(CHUNK_S / self.args.time_scale):
                        return
                    pcm = (np.clip(x[off:off + chunk], -1, 1) * 32767).astype("<i2").tobytes()
                    ts = audio_t0 + seq * CHUNK_S
                    for sid in self.feeds:
                        if sid not in self.paused:
                            client.publish(f"soak/{sid}/pcm", pcm, qos=0,
                                           properties=user_properties(seq, ts))
                    seq += 1
                n += 1
        finally:
            client.disconnect()
            client.loop_stop()

    # -- fault injectors

    def broker_restarter(self, broker: Broker) -> None:
        while not self.stop.wait(self.args.broker_restart_s):
            broker.stop(signal.SIGKILL)
            time.sleep(1.0)  # a short outage; the daemon's back-off takes it from there
            broker.start()
            self.counts["broker_restarts"] += 1

    def source_killer(self) -> None:
        victims = self.source_ids
        i = 0
        while not self.stop.wait(self.args.kill_source_s):
            sid = victims[i % len(victims)]
            i += 1
            away = self.run_dir / f"away-{sid}"
            with self.lock:
                self.paused.add(sid)
                if sid in self.folders:
                    shutil.move(str(self.folders[sid]), str(away))  # the share is unmounted
            self.counts["source_kills"] += 1
            self.stop.wait(min(self.args.kill_source_s / 2, 20.0))
            with self.lock:
                if sid in self.folders:
                    shutil.move(str(away), str(self.folders[sid]))
                self.paused.discard(sid)

    # -- main

    def run(self) -> int:
        args = self.args
        model, clips = build_assets(self.workdir)
        broker = Broker(self.run_dir / "broker")
        broker.start()
        counter = Counter(broker.port)
        cfg = self.write_config(model, broker.port)
        out = self.run_dir / "out.jsonl"
        print(f"soak: {args.sources} sources ({len(self.folders)} folders, {len(self.feeds)} MQTT "
              f"feeds) for {args.minutes} min at {args.time_scale}x; broker restart every "
              f"{args.broker_restart_s} s; source kill every {args.kill_source_s} s; in "
              f"{self.run_dir}", flush=True)
        daemon = subprocess.Popen([sys.executable, "-m", "monitor", "monitor", "--config",
                                   str(cfg), "--log-level", "warning"],
                                  stdout=subprocess.DEVNULL,
                                  stderr=open(self.run_dir / "daemon.log", "w"))
        threads = [threading.Thread(target=self.recorder, args=(clips,), daemon=True),
                   threading.Thread(target=self.sender, args=(broker.port, clips), daemon=True)]
        if args.broker_restart_s > 0:
            threads.append(threading.Thread(target=self.broker_restarter, args=(broker,), daemon=True))
        if args.kill_source_s > 0:
            threads.append(threading.Thread(target=self.source_killer, daemon=True))
        rss_start = rss_max = None
        try:
            deadline = time.monotonic() + 300
            while not counter.online.is_set():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"soak: the daemon did not start; see {self.run_dir}/daemon.log")
                time.sleep(0.2)
            for t in threads:
                t.start()
            while counter.scores == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            rss_start = rss_max = vm_rss_kb(daemon.pid)  # models loaded, audio flowing
            end = time.monotonic() + args.minutes * 60
            next_report = time.monotonic() + 60
            while time.monotonic() < end:
                if daemon.poll() is not None:
                    raise RuntimeError(f"soak: the daemon exited with {daemon.returncode}; see "
                                       f"{self.run_dir}/daemon.log")
                rss_max = max(rss_max, vm_rss_kb(daemon.pid) or 0)
                if time.monotonic() >= next_report:
                    next_report += 60
                    print(f"soak: {int(args.minutes * 60 - (end - time.monotonic()))} s, "
                          f"{len(counter.events)} distinct events delivered, "
                          f"RSS {vm_rss_kb(daemon.pid)} kB", flush=True)
                time.sleep(1.0)
            rss_end = vm_rss_kb(daemon.pid)
            self.stop.set()
            for t in threads:
                t.join(timeout=30)
            if broker.proc is None or broker.proc.poll() is not None:
                broker.start()
            produced = event_keys(out)
            wait_until = time.monotonic() + 120
            while time.monotonic() < wait_until and not produced <= set(counter.events):
                time.sleep(0.5)
                produced = event_keys(out)
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=120)
        finally:
            self.stop.set()
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            counter.close()
            broker.stop()
        rows = read_rows(out)
        produced = {(r["id"], r["type"], r["seq"]) for r in rows if r["kind"] == "event"}
        stats = [r for r in rows if r["kind"] == "stats"][-1]
        delivered = set(counter.events)
        stalls = sum(1 for r in rows if r["kind"] == "source_state" and r["state"] == "stalled")
        summary = {
            "sources": args.sources, "minutes": args.minutes, "time_scale": args.time_scale,
            "broker_restarts": self.counts["broker_restarts"],
            "source_kills": self.counts["source_kills"], "stalled_reports": stalls,
            "events_produced": len(produced),
            "alarms_started": sum(k[1] == "start" for k in produced),
            "events_delivered": len(produced & delivered),
            "events_missing": len(produced - delivered),
            "events_duplicated": sum(n - 1 for n in counter.events.values()),
            "windows_produced": stats["windows_produced"], "windows_scored": stats["windows_scored"],
            "windows_dropped": stats["windows_dropped"], "windows_failed": stats["windows_failed"],
            "scores_received": counter.scores,
            "scores_dropped_offline": stats.get("scores_dropped_offline"),
            "outbox_pending_at_exit": stats.get("outbox_pending"),
            "daemon_exit_code": daemon.returncode,
            "model_bytes": (model / "model.safetensors").stat().st_size,
            "rss_start_kb": rss_start, "rss_end_kb": rss_end, "rss_max_kb": rss_max,
        }
        print(json.dumps(summary, indent=1))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return 0 if summary["events_missing"] == 0 and daemon.returncode == 0 else 1


def read_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def event_keys(path: Path) -> set[tuple]:
    return {(r["id"], r["type"], r["seq"]) for r in read_rows(path) if r["kind"] == "event"}


def vm_rss_kb(pid: int) -> int | None:
    """Resident set size of a process, from /proc/<pid>/status (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", type=int, default=8, help="number of sources (half folders, half MQTT)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--broker-restart-s", type=float, default=60.0,
                   help="SIGKILL and restart the broker this often (0: never)")
    p.add_argument("--kill-source-s", type=float, default=45.0,
                   help="take one source away (folder moved out / feed stopped) this often (0: never)")
    p.add_argument("--time-scale", type=float, default=10.0,
                   help="audio runs this many times faster than real time")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "harken-soak"),
                   help="data set and model are built here once and reused")
    args = p.parse_args(argv)

    def interrupted(signum, frame):
        raise KeyboardInterrupt  # stop the daemon and the broker on the way out
    signal.signal(signal.SIGTERM, interrupted)
    try:
        if args.sources < 1 or args.minutes <= 0 or args.time_scale <= 0:
            raise UsageError("--sources must be >= 1, --minutes and --time-scale > 0")
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        return Soak(args).run()
    except UsageError as exc:
        print(f"harken soak: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
