"""`harken watch`: a live terminal view of what harken daemons publish on MQTT.

Per source: last score against its threshold as a small bar, alarm state, source state, age of
the last scored audio, and the node's status. On a TTY the table is redrawn in place; otherwise
each update is one plain line. `--once N` collects for N seconds, prints one table and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from monitor.daemon.mqtt_publisher import check_topic_part, check_topic_prefix
from monitor.errors import HarkenError, UsageError

BAR_WIDTH = 20


@dataclass
class SourceView:
    score: float | None = None
    threshold: float | None = None
    window_end_s: float | None = None
    alarm: str = "?"
    state: str = "?"
    events: int = 0


@dataclass
class WatchState:
    """What has been heard so far, keyed by node and (node, source). Thread-safe updates."""

    prefix: str
    nodes: dict[str, str] = field(default_factory=dict)  # node -> online/offline/stopped
    sources: dict[tuple[str, str], SourceView] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, topic: str, payload: bytes) -> tuple[str, str] | None:
        """Apply one message; returns (node, what) for a plain-line log, None if ignored."""
        if not topic.startswith(self.prefix + "/"):
            return None
        parts = topic[len(self.prefix) + 1:].split("/")
        text = payload.decode("utf-8", errors="replace")
        with self.lock:
            if len(parts) == 2 and parts[1] == "status":
                self.nodes[parts[0]] = text
                return parts[0], f"status {text}"
            if len(parts) != 3:
                return None
            node, source, leaf = parts
            view = self.sources.setdefault((node, source), SourceView())
            self.nodes.setdefault(node, "?")
            if leaf == "score":
                try:
                    data = json.loads(text)
                    view.score = float(data["score"])
                    view.threshold = float(data["threshold"])
                    view.window_end_s = float(data.get("window_end", 0.0)) or None
                except (ValueError, KeyError, TypeError):
                    return None
                return node, f"{source} score {view.score:.4g} threshold {view.threshold:.4g}"
            if leaf == "alarm":
                view.alarm = text
                return node, f"{source} alarm {text}"
            if leaf == "state":
                view.state = text
                return node, f"{source} state {text}"
            if leaf == "event":
                view.events += 1
                return node, f"{source} event {text}"
            return None

    def table(self, now_s: float | None = None) -> str:
        now_s = time.time() if now_s is None else now_s
        rows = [("NODE", "SOURCE", "SCORE", "THRESHOLD", "BAR", "ALARM", "STATE", "AUDIO AGE",
                 "NODE STATUS")]
        with self.lock:
            for (node, source), v in sorted(self.sources.items()):
                age = "-" if v.window_end_s is None else f"{max(0.0, now_s - v.window_end_s):.0f}s"
                rows.append((node, source, _fmt(v.score), _fmt(v.threshold),
                             score_bar(v.score, v.threshold), v.alarm, v.state, age,
                             self.nodes.get(node, "?")))
            for node, status in sorted(self.nodes.items()):
                if not any(n == node for n, _ in self.sources):
                    rows.append((node, "-", "-", "-", "", "-", "-", "-", status))
        if len(rows) == 1:
            return "no harken sources seen yet"
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def score_bar(score: float | None, threshold: float | None, width: int = BAR_WIDTH) -> str:
    """`[#####-----|---------]`: the bar spans 0..2x threshold, `|` marks the threshold."""
    if score is None or threshold is None or threshold <= 0:
        return ""
    mark = width // 2
    filled = max(0, min(width, round(score / (2 * threshold) * width)))
    cells = ["#" if i < filled else "-" for i in range(width)]
    cells[mark] = "|"
    return "[" + "".join(cells) + "]" + ("!" if score > threshold else " ")


def parse_broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "1883")
    try:
        port_n = int(port)
    except ValueError:
        raise UsageError(f"--broker: expected HOST:PORT (got {text!r})") from None
    if not host or not 0 < port_n < 65536:
        raise UsageError(f"--broker: expected HOST:PORT (got {text!r})")
    return host, port_n


def read_password(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise UsageError(f"--password-file: cannot read {path} ({exc.strerror})") from None


def watch(args) -> int:
    host, port = parse_broker(args.broker)
    prefix = check_topic_prefix(args.prefix, "--prefix")
    node = args.node if args.node == "+" else check_topic_part(args.node, "--node")
    if args.password_file and not args.username:
        raise UsageError("--password-file needs --username")
    if args.once is not None and args.once <= 0:
        raise UsageError(f"--once: must be > 0 seconds (got {args.once})")
    state = WatchState(prefix)
    live = args.once is None
    tty = live and sys.stdout.isatty()
    outcome: dict = {}
    connected = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            outcome["refused"] = str(reason_code)
            return
        connected.set()
        client.subscribe(f"{prefix}/{node}/#", qos=1)

    def on_message(client, userdata, message):
        line = state.update(message.topic, bytes(message.payload))
        if line is not None and live and not tty:
            print(f"{time.strftime('%H:%M:%S')} {line[0]} {line[1]}", flush=True)

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    if args.username:
        client.username_pw_set(args.username, read_password(args.password_file))
    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise HarkenError(f"cannot connect to the MQTT broker at {host}:{port} ({exc})") from None
    client.loop_start()
    try:
        if not live:
            deadline = time.monotonic() + args.once
            while time.monotonic() < deadline and "refused" not in outcome:
                time.sleep(0.05)
        else:
            while "refused" not in outcome:
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J" + state.table() + "\n")
                    sys.stdout.flush()
                time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    if "refused" in outcome:
        raise UsageError(f"the MQTT broker at {host}:{port} refused the connection "
                         f"({outcome['refused']})")
    if not live:
        print(state.table())
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    w = subparsers.add_parser("watch", help="live view of the scores and alarms harken daemons "
                              "publish on MQTT")
    w.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT (default 127.0.0.1:1883)")
    w.add_argument("--prefix", default="harken", help="topic prefix (default harken)")
    w.add_argument("--node", default="+", help="one node, or + for all (default)")
    w.add_argument("--username", default=None)
    w.add_argument("--password-file", default=None, help="file holding the MQTT password")
    w.add_argument("--once", type=float, default=None, metavar="SECONDS",
                   help="collect for SECONDS, print one table and exit")
    w.set_defaults(func=watch)
    return w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harken")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["watch", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except HarkenError as exc:
        print(f"harken watch: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
