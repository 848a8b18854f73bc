"""`role: alarms`: the one alarm stage. Subscribes to every worker's scores
(`<prefix>/+/+/score`, QoS 1, persistent session, manual acks), restores each source's order
in a small bounded reorder window, drops duplicates by (source, seq), runs each source's rule
(the same `resolve_alarm` + AlarmStateMachine as the single-box daemon, at the alarm settings
the window carried from its capture box; the stage's own `alarm:` for messages without them;
equal settings share one resolution) and publishes alarm
states and events on the same topics, through the same durable outbox (MqttPublisher).

Per score the work is O(1): a dict lookup of the source's track, at most `reorder_window`
held-back scores per source, no thread or timer per source (a sweep over the sources that
wait for a missing window). A score is acknowledged only once it has been applied and the
source's state (sequence position, alarm settings, alarm state machine) is committed to
`<state_dir>/alarm_stage.sqlite`: a killed alarm stage restarts from that state, the broker
hands back what it had not acknowledged, and the already-applied ones are dropped as duplicates,
so its alarms are the same as if it had not been killed.

One module (about 420 lines): the stage without MQTT (`AlarmStage`), its checkpoint and the
role that drives them are read together; each part is small.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from monitor.daemon import windowwire
from monitor.daemon.alarm import AlarmStateMachine
from monitor.daemon.config import AlarmConfig, DaemonConfig, resolve_mqtt_password, resolve_state_dir
from monitor.daemon.mqtt_publisher import MqttPublisher
from monitor.daemon.notify import SystemdNotifier
from monitor.daemon.outbox import open_durable_table
from monitor.daemon.ratelimit import RateLimitedWarning
from monitor.daemon.roles.session import RoleConnection
from monitor.daemon.types import AlarmEvent, Score
from monitor.errors import UsageError
from monitor.logs import get_logger

INBOX_TAKE_MAX = 5000  # scores handled (and checkpointed) per round

# (model_key, hop_s, machine_id, alarm settings as canonical JSON or None: the stage's own)
RuleKey = tuple


class SourceTrack:
    """One source's place in its sequence, its held-back scores and its alarm machine."""

    __slots__ = ("node", "source", "next_seq", "pending", "waiting_since", "machine", "rule_key")

    def __init__(self, node: str, source: str, machine: AlarmStateMachine, rule_key: RuleKey):
        self.node, self.source = node, source
        self.next_seq: int | None = None  # None: nothing applied yet
        self.pending: dict[int, tuple[dict, object]] = {}  # seq -> (score message, ack token)
        self.waiting_since: float | None = None
        self.machine = machine
        self.rule_key = rule_key


class AlarmStage:
    """The alarm stage without MQTT: `offer()` a score message, get back the ack tokens of the
    messages it is done with; `expire()` gives up on missing windows that are overdue."""

    def __init__(self, alarm: AlarmConfig, *, resolve: Callable[[RuleKey], object | None],
                 emit: Callable[[tuple[str, str], AlarmEvent], None], reorder_window: int,
                 reorder_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.alarm = alarm
        self._resolve_fn = resolve
        self._resolved: dict[RuleKey, object | None] = {}
        self.emit = emit
        self.reorder_window = reorder_window
        self.reorder_timeout_s = reorder_timeout_s
        self.clock = clock
        self.tracks: dict[tuple[str, str], SourceTrack] = {}
        self.waiting: set[tuple[str, str]] = set()  # tracks with held-back scores
        self.dirty: set[tuple[str, str]] = set()  # tracks changed since the last checkpoint
        self.applied = 0
        self.duplicates = 0
        self.gaps_skipped = 0  # windows given up on
        self.nonfinite = 0

    # ---------------------------------------------------------------- rules

    def resolved(self, key: RuleKey):
        if key not in self._resolved:
            self._resolved[key] = self._resolve_fn(key)
        return self._resolved[key]

    def settings(self, text: str | None) -> AlarmConfig:
        """Carried alarm settings (already checked by check_message; parsed once per text by
        windowwire's cache), else the stage's own."""
        return self.alarm if text is None else windowwire.alarm_from_json(text)

    def _new_track(self, node: str, source: str, rule_key: RuleKey) -> SourceTrack:
        r = self.resolved(rule_key)
        a = self.settings(rule_key[3])
        machine = AlarmStateMachine(node, source, k=a.k, n=a.n, hold_s=a.hold_s,
                                    rule=r.build_rule() if r is not None else None)
        return SourceTrack(node, source, machine, rule_key)

    @staticmethod
    def rule_key(msg: dict) -> RuleKey:
        mid = msg.get("machine_id")
        return (str(msg.get("model_key") or msg.get("model")), float(msg["hop_s"]),
                None if mid is None else int(mid), msg.get("alarm"))

    # ---------------------------------------------------------------- scores

    def offer(self, node: str, msg: dict, token) -> list:
        """msg: a worker's score message (already JSON-decoded and checked by check_message)."""
        key = (node, msg["source"])
        track = self.tracks.get(key)
        if track is None:
            track = self.tracks[key] = self._new_track(node, msg["source"], self.rule_key(msg))
        elif msg.get("alarm") != track.rule_key[3]:  # the capture box's settings changed
            self._rekey(track, self.rule_key(msg))
        seq = int(msg["seq"])
        if (track.next_seq is not None and seq < track.next_seq) or seq in track.pending:
            self.duplicates += 1
            return [token]
        if seq != track.next_seq and not (track.next_seq is None and seq == 0):
            track.pending[seq] = (msg, token)
            if track.waiting_since is None:
                track.waiting_since = self.clock()
                self.waiting.add(key)
            if len(track.pending) <= self.reorder_window:
                return []
            return self._skip_gap(key, track)  # the bound: give up on the missing window
        done = [token]
        self._apply(key, track, msg)
        return done + self._drain(key, track)

    def expire(self) -> list:
        """Give up on missing windows that have been waited for reorder_timeout_s."""
        now = self.clock()
        done: list = []
        for key in list(self.waiting):
            track = self.tracks[key]
            if track.waiting_since is not None and now - track.waiting_since >= self.reorder_timeout_s:
                done += self._skip_gap(key, track)
        return done

    def _skip_gap(self, key, track: SourceTrack) -> list:
        first = min(track.pending)
        if track.next_seq is not None:
            self.gaps_skipped += first - track.next_seq
        track.next_seq = first
        return self._drain(key, track)

    def _drain(self, key, track: SourceTrack) -> list:
        done = []
        while track.next_seq in track.pending:
            msg, token = track.pending.pop(track.next_seq)
            self._apply(key, track, msg)
            done.append(token)
        if track.pending:
            track.waiting_since = self.clock()
        else:
            track.waiting_since = None
            self.waiting.discard(key)
        return done

    def _apply(self, key, track: SourceTrack, msg: dict) -> None:
        track.next_seq = int(msg["seq"]) + 1
        self.dirty.add(key)
        self.applied += 1
        if msg["score"] is None:  # not finite at the worker: kept away from the alarms
            self.nonfinite += 1
            return
        r = self.resolved(self.rule_key(msg))
        threshold = r.window_threshold if r is not None else float(msg["threshold"])
        score = Score(source=track.source, model=str(msg.get("model", "")), score=float(msg["score"]),
                      threshold=threshold, window_start_s=float(msg["window_start"]),
                      window_end_s=float(msg["window_end"]), ready_mono_s=0.0,
                      scored_time_s=float(msg.get("ts", 0.0)), label=msg.get("file"))
        for event in track.machine.update(score):
            self.emit(key, event)

    def _rekey(self, track: SourceTrack, rule_key: RuleKey) -> None:
        """A source's new settings: a new rule, as a restarted single box would build. An alarm
        that is on stays on under the new rule and ends by its hold, so its retained ON is
        always followed by an OFF."""
        old = track.machine
        fresh = self._new_track(track.node, track.source, rule_key).machine
        state = old.snapshot()
        state["rule"] = fresh.rule.snapshot()
        fresh.restore(state)
        track.machine, track.rule_key = fresh, rule_key

    # ---------------------------------------------------------------- checkpoint

    def track_state(self, key) -> dict:
        t = self.tracks[key]
        return {"next_seq": t.next_seq, "rule_key": list(t.rule_key), "machine": t.machine.snapshot()}

    def restore_track(self, node: str, source: str, state: dict) -> None:
        rk = state["rule_key"]  # a checkpoint from before carried settings has three parts
        track = self._new_track(node, source, (str(rk[0]), float(rk[1]),
                                               None if rk[2] is None else int(rk[2]),
                                               rk[3] if len(rk) > 3 else None))
        track.next_seq = state["next_seq"]
        track.machine.restore(state["machine"])
        self.tracks[(node, source)] = track


def check_message(msg) -> str | None:
    """Why a score message cannot be used, or None."""
    if not isinstance(msg, dict):
        return "not a JSON object"
    for key in ("source", "seq", "score", "threshold", "window_start", "window_end", "hop_s"):
        if key not in msg:
            return f"missing {key!r}"
    if not isinstance(msg["seq"], int) or isinstance(msg["seq"], bool) or msg["seq"] < 0:
        return "seq must be an integer >= 0"
    if not isinstance(msg["source"], str) or "/" in msg["source"]:
        return "bad source"
    for key in ("threshold", "window_start", "window_end", "hop_s"):
        if not isinstance(msg[key], (int, float)) or isinstance(msg[key], bool):
            return f"{key} must be a number"
    if msg["score"] is not None and not isinstance(msg["score"], (int, float)):
        return "score must be a number or null"
    if msg.get("alarm") is not None:
        return _alarm_problem(msg["alarm"]) if isinstance(msg["alarm"], str) else \
            "alarm must be a string of JSON"
    return None


def _alarm_problem(text: str) -> str | None:
    """Why carried settings are refused, or None (good texts are parsed once: windowwire caches
    them)."""
    try:
        windowwire.alarm_from_json(text)
    except windowwire.WireError as exc:
        return str(exc)
    return None


class Checkpoint:
    """Per-source state of the alarm stage in SQLite (WAL, synchronous=FULL: one fsync a round)."""

    def __init__(self, path: Path):
        self._db, _ = open_durable_table(
            path, "CREATE TABLE IF NOT EXISTS tracks (node TEXT NOT NULL, source TEXT NOT NULL, "
            "state TEXT NOT NULL, PRIMARY KEY (node, source))", "tracks",
            "the alarm stage's state")

    def load(self) -> list[tuple[str, str, dict]]:
        return [(n, s, json.loads(st)) for n, s, st in
                self._db.execute("SELECT node, source, state FROM tracks")]

    def save(self, stage: AlarmStage) -> None:
        if not stage.dirty:
            return
        rows = [(n, s, json.dumps(stage.track_state((n, s)))) for n, s in stage.dirty]
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany("INSERT OR REPLACE INTO tracks (node, source, state) VALUES (?, ?, ?)",
                             rows)
        self._db.execute("COMMIT")
        stage.dirty.clear()

    def close(self) -> None:
        self._db.close()


class StagePublisher(MqttPublisher):
    """MqttPublisher for sources of many capture nodes: a source is named `node/source`, and
    its alarm and event topics are `<prefix>/<node>/<source>/...` as the single box writes them."""

    def topic(self, source: str, leaf: str) -> str:
        node, _, sid = source.partition("/")
        if not sid:
            return super().topic(source, leaf)
        return f"{self.prefix}/{node}/{sid}/{leaf}"

    def publish_event_for(self, key: str, event: AlarmEvent) -> None:
        self._enqueue("event", self.topic(key, "event"), json.dumps(event.to_json()).encode(),
                      retain=False)


def resolver_from_models(models_dir: Path, alarm: AlarmConfig, log):
    """RuleKey -> ResolvedAlarm from the artifact's manifest and tensors (no encoder is built),
    at the key's carried alarm settings, else `alarm`; None, warned once, when the model is not
    there."""
    from monitor.artifact import load_artifact
    from monitor.daemon.thresholds import resolve_for_manifest

    artifacts: dict[str, object] = {}

    def resolve(key: RuleKey):
        model, hop_s, machine_id, text = key
        if model not in artifacts:
            try:
                artifacts[model] = load_artifact(models_dir / model)
            except UsageError as exc:
                log.error("model_unavailable", model=model, error=str(exc)[:300],
                          hint="alarms use the workers' thresholds and the k-of-n rule")
                artifacts[model] = None
        art = artifacts[model]
        if art is None:
            return None
        r = resolve_for_manifest(art.manifest, art.tensors, models_dir / model / "manifest.json",
                                 alarm if text is None else windowwire.alarm_from_json(text),
                                 hop_s=hop_s, machine_id=machine_id)
        log.info("alarm_threshold", model=model, hop_s=hop_s, machine_id=machine_id,
                 settings="carried" if text is not None else "own", **r.to_json())
        return r
    return resolve


class AlarmStageRole:
    def __init__(self, cfg: DaemonConfig, *, notifier: SystemdNotifier | None = None):
        assert cfg.mqtt is not None
        self.cfg = cfg
        d = cfg.distributed
        self.log = get_logger(stage="alarm_stage", node=cfg.node)
        self._warn = RateLimitedWarning(self.log, every_s=60.0)
        self.shutdown = threading.Event()
        self.notifier = notifier or SystemdNotifier()
        self.state_dir = resolve_state_dir(cfg)
        base_id = cfg.mqtt.client_id or f"harken-alarms-{cfg.node}"
        self.conn = RoleConnection(cfg, client_id=base_id, persistent=d.session_expiry_s > 0,
                                   manual_ack=True, on_connected=self._on_connected,
                                   stage="alarm_stage", announce=False)
        self.topic_filter = f"{self.conn.prefix}/+/+/score"
        self.conn.client.on_message = self._on_message
        self.publisher = StagePublisher(dataclasses.replace(cfg.mqtt, client_id=f"{base_id}-pub",
                                                            discovery=False),
                                        node=cfg.node, source_ids=[], state_dir=self.state_dir,
                                        password=resolve_mqtt_password(cfg.mqtt))
        self.stage = AlarmStage(cfg.alarm, resolve=resolver_from_models(Path(d.models_dir or "."),
                                                                        cfg.alarm, self.log),
                                emit=self._emit, reorder_window=d.reorder_window,
                                reorder_timeout_s=d.reorder_timeout_s)
        self.checkpoint = Checkpoint(self.state_dir / "alarm_stage.sqlite")
        self._inbox: deque = deque()
        self._cond = threading.Condition()
        self.rejected = 0

    def request_stop(self) -> None:
        self.shutdown.set()

    def run(self) -> int:
        for node, source, state in self.checkpoint.load():
            self.stage.restore_track(node, source, state)
        self.publisher.start()
        self.conn.start()
        self.notifier.ready()
        self.log.info("alarm_stage_ready", subscription=self.topic_filter,
                      sources_restored=len(self.stage.tracks))
        next_stats = time.monotonic() + self.cfg.stats_interval_s
        while not self.shutdown.is_set():
            self.handle_round()
            if time.monotonic() >= next_stats:
                self.publisher.publish_stats(self.stats())
                next_stats = time.monotonic() + self.cfg.stats_interval_s
        self.conn.stop()  # scores held back stay unacknowledged: the broker keeps them
        self.publisher.publish_stats(self.stats())
        self.publisher.stop()
        self.checkpoint.close()
        self.log.info("alarm_stage_stopped", **self.stats())
        return 0

    def stats(self) -> dict:
        s = self.stage
        return {"role": "alarms", "sources": len(s.tracks), "scores_applied": s.applied,
                "scores_duplicate": s.duplicates, "windows_missing": s.gaps_skipped,
                "scores_nonfinite": s.nonfinite, "scores_rejected": self.rejected,
                "sources_waiting": len(s.waiting), **self.publisher.status()}

    def _on_connected(self, client) -> None:
        client.subscribe(self.topic_filter, qos=1)

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self._inbox.append((self.conn.generation, message.mid, message.qos, message.topic,
                                bytes(message.payload)))
            self._cond.notify()

    def handle_round(self) -> None:
        with self._cond:
            if not self._inbox:
                self._cond.wait(0.2)
            batch = [self._inbox.popleft() for _ in range(min(len(self._inbox), INBOX_TAKE_MAX))]
        done = []
        for item in batch:
            gen, mid, qos, topic, payload = item
            levels = topic.split("/")
            try:
                msg = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                msg = None
            why = check_message(msg) if msg is not None else "not JSON"
            if why is None and levels[-2] != msg["source"]:
                why = "source does not match the topic"
            if why is not None:
                self.rejected += 1
                # keyed by the kind of problem, not the carried value: one warning a minute
                self._warn("score_rejected", why.split(":")[0][:40], topic=topic[:200], reason=why)
                done.append(item)
                continue
            done += self.stage.offer(levels[-3], msg, item)
        done += self.stage.expire()
        self.checkpoint.save(self.stage)  # before any ack: an acked score is never applied twice
        for gen, mid, qos, _, _ in done:
            if gen == self.conn.generation:
                self.conn.client.ack(mid, qos)

    def _emit(self, key: tuple[str, str], event: AlarmEvent) -> None:
        name = f"{key[0]}/{key[1]}"
        self.publisher.publish_event_for(name, event)
        if event.type == "start":
            self.publisher.publish_alarm_state(name, True)
            self.log.warning("alarm_started", node=key[0], source=event.source, alarm_id=event.id,
                             score=round(event.peak_score, 6), threshold=event.threshold,
                             file=event.detail.get("file"))
        elif event.type == "end":
            self.publisher.publish_alarm_state(name, False)
            self.log.warning("alarm_ended", node=key[0], source=event.source, alarm_id=event.id,
                             peak_score=round(event.peak_score, 6))
