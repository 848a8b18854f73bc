"""What a broker does with a dead share-group member's unacknowledged QoS 1 messages.

Two members, A and B, join `$share/g/t` with manual acks and Receive Maximum 5; A never acks
and is SIGKILLed (its own process, so the broker sees a dropped TCP connection, no DISCONNECT).
Measured for a persistent session (Session Expiry 3600 s) and a clean one (expiry 0):
  - of A's unacknowledged messages, how many B receives, and how many A gets again on restart
    with the same client id;
  - of messages published while A is dead, how many reach B and how many wait for A.
Run: `python -m bench.share_redelivery` (starts its own Mosquitto on a free port).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.mosquitto import Mosquitto

TOPIC = "bench/share/t"
SHARE = "$share/g/" + TOPIC


def member(port: int, client_id: str, expiry_s: int, *, ack: bool,
           on_message=None) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                         manual_ack=True)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry_s
    props.ReceiveMaximum = 5
    subscribed = threading.Event()

    def on_connect(c, u, flags, rc, p):
        c.subscribe(SHARE, qos=1)

    def on_msg(c, u, msg):
        if on_message:
            on_message(msg)
        if ack:
            c.ack(msg.mid, msg.qos)

    client.on_connect = on_connect
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_msg
    client.connect("127.0.0.1", port, keepalive=5, clean_start=expiry_s == 0, properties=props)
    client.loop_start()
    if not subscribed.wait(10):
        raise RuntimeError("member did not subscribe")
    return client


_CHILD = """
import sys, time, json
sys.path.insert(0, {repo!r})
from bench.share_redelivery import member
got = []
c = member({port}, {cid!r}, {expiry}, ack=False, on_message=lambda m: (got.append(m.payload.decode()), print(m.payload.decode(), flush=True)))
print("READY", flush=True)
time.sleep(3600)
"""


def publish(port: int, payloads: list[str]) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    for p in payloads:
        c.publish(TOPIC, p, qos=1).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def scenario(port: int, expiry_s: int) -> dict:
    repo = str(Path(__file__).resolve().parents[1])
    got_b: list[str] = []
    lock = threading.Lock()

    def on_b(msg):
        with lock:
            got_b.append(msg.payload.decode())
    cid = f"A-{expiry_s}"
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(repo=repo, port=port, cid=cid,
                                                                   expiry=expiry_s)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY"
    b = member(port, f"B-{expiry_s}", expiry_s, ack=True, on_message=on_b)
    publish(port, [f"m{i}" for i in range(20)])
    time.sleep(1.0)
    child.kill()
    held_by_a = []
    for line in child.stdout:
        held_by_a.append(line.strip())
    child.wait()
    time.sleep(1.0)  # the broker notices the closed socket at once (no keepalive wait needed)
    with lock:
        b_before = set(got_b)
    publish(port, [f"n{i}" for i in range(10)])  # while A is dead
    time.sleep(1.5)
    with lock:
        b_after_kill = set(got_b) - b_before
    # A comes back under the same client id: what does its session hand it?
    again: list[str] = []
    a2 = member(port, cid, expiry_s, ack=True, on_message=lambda m: again.append(m.payload.decode()))
    time.sleep(2.0)
    a2.disconnect()
    a2.loop_stop()
    b.disconnect()
    b.loop_stop()
    unacked = set(held_by_a)
    return {"session": "persistent (expiry 3600 s)" if expiry_s else "clean (expiry 0)",
            "a_unacked": len(unacked),
            "a_unacked_redelivered_to_b": len(unacked & set(got_b)),
            "a_unacked_redelivered_to_a_on_restart": len(unacked & set(again)),
            "published_while_a_dead": 10,
            "of_those_to_b": sum(1 for m in b_after_kill if m.startswith("n")),
            "of_those_to_a_on_restart": sum(1 for m in again if m.startswith("n"))}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with Mosquitto(Path(tmp)) as broker:
            version = subprocess.run([broker_binary(), "-h"], capture_output=True,
                                     text=True).stdout.splitlines()[0]
            print(f"# {version}, shared subscription {SHARE}, Receive Maximum 5, A never acks")
            for expiry in (3600, 0):
                print(json.dumps(scenario(broker.port, expiry)))


def broker_binary() -> str:
    from tests.mosquitto import MOSQUITTO
    return MOSQUITTO


if __name__ == "__main__":
    main()
