"""Benchmark of the distributed roles (issue 17) on this machine, against a real Mosquitto.

Prints: windows/s through 1, 2 and 4 worker processes (10-s windows of the weight-free stats
model, published by the benchmark as a capture box would); window-to-alarm latency p50/p95 at
a paced load (publish of a window -> its alarm's `start` event at a subscriber, through workers
and the alarm stage); the alarm stage's own throughput in scores/s over 10,000 sources
(JSON decode, reorder/de-duplicate, rule, SQLite checkpoint per round; no broker).
Run: `python -m bench.dist_bench [--windows 200]` (trains its model in a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from tests.helpers import REPO, harken, tone_clip, write_tone_dataset
from tests.monitor.daemon.conftest import Collector, wait_until
from tests.mosquitto import Mosquitto

MODEL = "stats-bench"


def role_config(tmp: Path, name: str, broker, role: str, models: Path, alarm: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "node": name, "role": role, "state_dir": str(tmp / name), "threads": 1, "alarm": alarm,
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.2,
                 "reconnect_max_s": 1.0},
        "distributed": {"models_dir": str(models)}, "evidence": {"enabled": False}}))
    return path


def start(cfg: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "monitor", "monitor", "--config", str(cfg),
                                 "--log-level", "warning"], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env=os.environ | {"PYTHONPATH": str(REPO)})


def stop(procs) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=60)


class WindowPublisher:
    def __init__(self, broker):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        rng = np.random.default_rng(0)
        self.clip = tone_clip(rng, 0, False)

    def publish(self, source: str, seq: int):
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from monitor.daemon import windowwire as ww

        payload, props = ww.encode(ww.WireWindow(source=source, model=MODEL, seq=seq,
                                                 start_time_s=1e9 + 10 * seq, samples=self.clip,
                                                 machine_id=0, hop_s=10.0))
        p = Properties(PacketTypes.PUBLISH)
        p.UserProperty = props
        return self.c.publish(f"harken/edge/{source}/window", payload, qos=1, properties=p)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def score_count(coll) -> int:
    return sum(len(coll.payloads(t)) for t in list(coll.messages) if t.endswith("/score"))


def workers_rate(tmp: Path, models: Path, n_workers: int, n_windows: int) -> float:
    with Mosquitto(tmp / f"broker{n_workers}") as broker:
        coll = Collector(broker, ("harken/+/+/score", "harken/+/status"))
        procs = []
        for i in range(n_workers):
            name = f"w{n_workers}x{i}"
            procs.append(start(role_config(tmp, name, broker, "worker", models, {}),
                               tmp / f"{name}.log"))
            coll.wait_for(f"harken/{name}/status", b"online", timeout_s=180)
        pub = WindowPublisher(broker)
        t0 = time.monotonic()
        for i in range(n_windows):
            pub.publish(f"s{i % 50}", i // 50)
        wait_until(lambda: score_count(coll) >= n_windows, 600, "all windows scored")
        rate = n_windows / (time.monotonic() - t0)
        pub.close()
        stop(procs)
        coll.close()
    return rate


def latency(tmp: Path, models: Path, n_sources: int, rate_hz: float) -> tuple[float, float]:
    alarm = {"k": 1, "n": 1, "hold_s": 0, "threshold": -1e9}  # every window alarms: one start per source
    with Mosquitto(tmp / "broker-lat") as broker:
        coll = Collector(broker, ("harken/+/+/event", "harken/+/status"))
        procs = [start(role_config(tmp, "alarms", broker, "alarms", models, alarm), tmp / "alarms.log")]
        coll.wait_for("harken/alarms/status", b"online", timeout_s=180)
        for i in range(2):
            procs.append(start(role_config(tmp, f"lw{i}", broker, "worker", models, alarm),
                               tmp / f"lw{i}.log"))
            coll.wait_for(f"harken/lw{i}/status", b"online", timeout_s=180)
        pub = WindowPublisher(broker)
        sent: dict[str, float] = {}
        got: dict[str, float] = {}

        def on_message(client, userdata, message):
            if not message.topic.endswith("/event"):
                return
            e = json.loads(message.payload)
            if e["type"] == "start":
                got.setdefault(e["source"], time.monotonic())
        coll.client.on_message = on_message
        for i in range(n_sources):
            sent[f"s{i}"] = time.monotonic()
            pub.publish(f"s{i}", 0)
            time.sleep(1.0 / rate_hz)
        wait_until(lambda: len(got) >= n_sources, 600, "every alarm")
        lat = [1000 * (got[s] - sent[s]) for s in sent]
        pub.close()
        stop(procs)
        coll.close()
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 95))


def alarm_stage_rate(tmp: Path, n_sources: int = 10_000, rounds: int = 6) -> float:
    from monitor.daemon.config import AlarmConfig
    from monitor.daemon.roles.alarm_stage import AlarmStage, Checkpoint, check_message

    events = []
    stage = AlarmStage(AlarmConfig(k=2, n=3, hold_s=30), resolve=lambda key: None,
                       emit=lambda key, e: events.append(e), reorder_window=32,
                       reorder_timeout_s=30.0)
    ck = Checkpoint(tmp / "bench-stage.sqlite")
    rng = np.random.default_rng(1)
    payloads = [json.dumps({"source": f"m{i}", "seq": seq, "score": float(rng.normal()),
                            "threshold": 2.0, "window_start": 1e9 + 10 * seq,
                            "window_end": 1e9 + 10 * seq + 10, "hop_s": 10.0, "model_key": "m",
                            "machine_id": None}).encode()
                for seq in range(rounds) for i in range(n_sources)]
    t0 = time.monotonic()
    for start_i in range(0, len(payloads), 5000):  # the role's round: up to 5000, one commit
        for raw in payloads[start_i:start_i + 5000]:
            msg = json.loads(raw)
            assert check_message(msg) is None
            stage.offer(f"box{hash(msg['source']) % 100}", msg, None)
        ck.save(stage)
    rate = len(payloads) / (time.monotonic() - t0)
    ck.close()
    assert stage.applied == len(payloads) and len(stage.tracks) == n_sources
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=200, help="windows per worker count")
    ap.add_argument("--latency-sources", type=int, default=100)
    ap.add_argument("--latency-rate-hz", type=float, default=10.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = write_tone_dataset(tmp / "data")
        proc = harken("train", "--data", str(data), "--out", str(tmp / "models" / MODEL), "--quiet",
                      "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        print(f"# {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}; stats model, "
              "10-s windows (640 kB WAV each), 1 torch thread per worker")
        for n in (1, 2, 4):
            rate = workers_rate(tmp, tmp / "models", n, args.windows)
            print(f"workers {n}: {rate:.1f} windows/s ({args.windows} windows)", flush=True)
        p50, p95 = latency(tmp, tmp / "models", args.latency_sources, args.latency_rate_hz)
        print(f"window-to-alarm latency at {args.latency_rate_hz:g} windows/s, 2 workers: "
              f"p50 {p50:.0f} ms, p95 {p95:.0f} ms", flush=True)
        rate = alarm_stage_rate(tmp)
        print(f"alarm stage, 10000 sources, 60000 scores: {rate:.0f} scores/s (one core, in process)")


if __name__ == "__main__":
    main()
