"""Alarm settings that travel with the window (issue 17): a capture box puts each source's
effective `alarm:` settings in the window message, the worker copies them into its score, and
the alarm stage judges the source by them, so per-source overrides and the default budget give
the alarms of the single box (`role: all`) on the same audio.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from monitor.daemon import windowwire as ww
from monitor.daemon.config import AlarmConfig
from monitor.daemon.roles.alarm_stage import AlarmStage, Checkpoint, check_message
from tests.helpers import harken
from tests.monitor.daemon.conftest import Collector, wait_until
from tests.monitor.daemon.test_distributed import (ALARM, event_key, models_dir,  # noqa: F401
                                                   role_config, score_msgs, source_list,
                                                   sources_root, start, write_config)
from tests.mosquitto import Mosquitto

SOURCES = 4  # s00 and s03 have a fault in their middle two clips
OVERRIDES = {"s00": {"k": 2, "n": 3, "hold_s": 10, "threshold": 10.0},
             "s03": {"k": 1, "n": 2, "hold_s": 5, "false_alarms_per_day": 50.0}}
STAGE_ALARM = {"threshold": 1.0e6}  # the alarm stage's and workers' own: never to be used here


# --------------------------------------------------------------------------- the wire


def _wire(alarm: AlarmConfig | None) -> ww.WireWindow:
    import numpy as np

    return ww.WireWindow(source="fan1", model="m", seq=0, start_time_s=1.0, hop_s=5.0,
                         samples=np.zeros(1600, dtype=np.float32), alarm=alarm)


def test_alarm_settings_round_trip_and_old_messages_mean_the_stage_defaults():
    alarm = AlarmConfig(k=1, n=4, hold_s=12.5, threshold=3.25, false_alarms_per_day=2.0,
                        rule="cusum", ewma_lambda=0.4, cusum_k=0.75)
    payload, props = ww.encode(_wire(alarm))
    assert sum(1 for k, _ in props if k == "alarm") == 1
    assert ww.decode(payload, props).alarm == alarm
    old = [(k, v) for k, v in props if k != "alarm"]
    assert ww.decode(payload, old).alarm is None
    for other in (AlarmConfig(), AlarmConfig(rule="ewma", score_cap=None),
                  AlarmConfig(rule="ewma", score_cap=2.5, threshold=None)):
        assert ww.decode(*ww.encode(_wire(other))).alarm == other
    # Equal settings, equal text: they share one resolved rule at the alarm stage.
    assert ww.alarm_to_json(AlarmConfig(k=1, n=4)) == ww.alarm_to_json(AlarmConfig(n=4, k=1))


@pytest.mark.parametrize("text, why", [
    ("{not json", "not JSON"), ("[1, 2]", "JSON object"), ('{"kk": 1}', "unknown key"),
    ('{"k": "2"}', "bad k"), ('{"k": true}', "bad k"), ('{"hold_s": NaN}', "bad hold_s"),
    ('{"k": 4, "n": 3}', "k: must be <= n"), ('{"rule": "magic"}', "rule: must be one of"),
    ('{"false_alarms_per_day": 0}', "false_alarms_per_day"), ('{"score_cap": 0}', "score_cap"),
    ('{"score_cap": "3"}', "bad score_cap"), ("x" * 2000, "at most")])
def test_broken_alarm_settings_are_one_line_each(text, why):
    payload, props = ww.encode(_wire(None))
    with pytest.raises(ww.WireError, match=why) as info:
        ww.decode(payload, props + [("alarm", text)])
    assert "\n" not in str(info.value)
    msg = score_msgs("s1", [0.5])[0] | {"alarm": text}
    assert why in check_message(msg) and "\n" not in check_message(msg)
    assert check_message(score_msgs("s1", [0.5])[0] | {"alarm": 7}) == "alarm must be a string of JSON"


# --------------------------------------------------------------------------- the alarm stage


def _stage(keys: list, events: list) -> AlarmStage:
    from monitor.daemon.thresholds import ResolvedAlarm

    own = AlarmConfig(k=3, n=3, hold_s=100.0)

    def resolve(key):
        keys.append(key)
        a = ww.alarm_from_json(key[3]) if key[3] is not None else own
        return ResolvedAlarm(rule="kofn", threshold=1.0, window_threshold=1.0, origin="config",
                             expected_per_day=None, budget_per_day=None, mean=0.0, std=1.0,
                             k=a.k, n=a.n, ewma_lambda=0.2, cusum_k=0.5, tail="test")
    return AlarmStage(own, resolve=resolve,
                      emit=lambda key, e: events.append((key[1], e.type, e.detail.get("file"))),
                      reorder_window=8, reorder_timeout_s=30.0)


QUICK = ww.alarm_to_json(AlarmConfig(k=1, n=1, hold_s=0.0))
VALUES = [0.1, 2.0, 0.1, 0.1, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1] + [0.0] * 12


def _msgs(source: str, alarm: str | None) -> list[dict]:
    return [m | {"alarm": alarm} for m in score_msgs(source, VALUES)]


def test_sources_with_different_settings_get_different_rules_equal_ones_share_one(tmp_path):
    keys, events = [], []
    stage = _stage(keys, events)
    for m in _msgs("a", QUICK) + _msgs("b", QUICK) + _msgs("c", None):
        stage.offer("box1", m, None)
    assert sorted(k[3] or "" for k in keys) == ["", QUICK]  # one resolution per distinct settings
    starts = {e[0]: [x[2] for x in events if x[0] == e[0] and x[1] == "start"] for e in events}
    assert starts["a"] == starts["b"] == ["f1.wav", "f4.wav"]  # 1 of 1, no hold
    assert starts["c"] == ["f6.wav"]  # the stage's own 3 of 3


def test_an_alarm_on_when_the_settings_change_still_ends():
    """The capture box restarts with other settings mid-alarm: the track's new rule takes over,
    the alarm stays the same alarm and ends by the hold, so the retained ON gets its OFF."""
    events: list = []
    stage = _stage([], events)
    msgs = _msgs("a", QUICK)
    slow = ww.alarm_to_json(AlarmConfig(k=2, n=3, hold_s=20.0))
    for i, m in enumerate(msgs):
        stage.offer("box1", m if i < 5 else m | {"alarm": slow}, None)
    kinds = [e[1] for e in events if e[1] != "update"]
    assert kinds[-2:] == ["start", "end"] and kinds.count("start") == kinds.count("end")
    assert stage.tracks[("box1", "a")].rule_key[3] == slow


def test_a_restarted_alarm_stage_keeps_each_tracks_carried_settings(tmp_path):
    msgs = _msgs("a", QUICK)
    uninterrupted: list = []
    stage = _stage([], uninterrupted)
    for m in msgs:
        stage.offer("box1", m, None)
    got: list = []
    first = _stage([], got)
    for m in msgs[:3]:
        first.offer("box1", m, None)
    ck = Checkpoint(tmp_path / "alarm_stage.sqlite")
    ck.save(first)
    ck.close()
    keys: list = []
    again = _stage(keys, got)
    ck = Checkpoint(tmp_path / "alarm_stage.sqlite")
    for node, source, state in ck.load():
        again.restore_track(node, source, state)
    assert again.tracks[("box1", "a")].rule_key[3] == QUICK and keys[0][3] == QUICK
    for m in msgs:
        again.offer("box1", m, None)
    assert got == uninterrupted and again.duplicates == 3


def test_a_checkpoint_from_before_carried_settings_restores_with_the_stage_defaults():
    from monitor.daemon.alarm import AlarmStateMachine

    stage = _stage([], [])
    snapshot = AlarmStateMachine("box1", "a", k=3, n=3, hold_s=100.0).snapshot()
    stage.restore_track("box1", "a", {"next_seq": 2, "rule_key": ["m", 10.0, None],
                                      "machine": snapshot})
    assert stage.tracks[("box1", "a")].rule_key == ("m", 10.0, None, None)


# --------------------------------------------------------------------------- end to end


def single_box(tmp: Path, sources: list[dict], alarm: dict) -> set[tuple]:
    out = tmp / "out.jsonl"
    cfg = {"node": "box1", "state_dir": str(tmp / "state"), "jsonl": str(out),
           "evidence": {"enabled": False}, "threads": 1, "sources": sources}
    proc = harken("monitor", "--config", str(write_config(tmp / "all.yaml", cfg | {"alarm": alarm})),
                  "--log-level", "warning", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(1 for r in rows if r["kind"] == "score") == 4 * len(sources)
    return {event_key(r) for r in rows if r["kind"] == "event"}


def distributed(tmp: Path, models_dir: Path, sources: list[dict], *, capture_alarm: dict,
                own_alarm: dict) -> set[tuple]:
    """One capture box, one worker and one alarm stage; the last two with `own_alarm`
    ({}: the defaults)."""
    procs: dict[str, subprocess.Popen] = {}
    with Mosquitto(tmp / "broker") as broker:
        coll = Collector(broker, ("harken/+/+/event", "harken/+/status", "harken/+/stats"))
        try:
            for name, role in (("alarms", "alarms"), ("w1", "worker")):
                cfg = role_config(tmp, name, broker, role, models_dir, alarm=own_alarm,
                                  stats_interval_s=0.5)
                procs[name] = start(cfg, tmp / f"{name}.log")
            for name in ("alarms", "w1"):
                coll.wait_for(f"harken/{name}/status", b"online", timeout_s=120)
            capture = role_config(tmp, "box1", broker, "capture", models_dir, sources=sources,
                                  alarm=capture_alarm)
            procs["capture"] = start(capture, tmp / "capture.log")
            assert procs["capture"].wait(timeout=120) == 0, (tmp / "capture.log").read_text()[-3000:]

            def stats() -> dict:
                last = coll.last("harken/alarms/stats")
                return json.loads(last) if last else {}
            wait_until(lambda: stats().get("scores_applied") == 4 * len(sources), 120,
                       "every score applied")
            assert stats()["scores_rejected"] == 0 and stats()["windows_missing"] == 0
            return {event_key(json.loads(p)) for t in list(coll.messages)
                    if t.endswith("/event") for p in coll.payloads(t)}
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            coll.close()


def test_per_source_overrides_travel_with_the_window(tmp_path, models_dir, sources_root):  # noqa: F811
    sources = [s | ({"alarm": OVERRIDES[s["id"]]} if s["id"] in OVERRIDES else {}) | {"speed": "max"}
               for s in source_list(sources_root, models_dir)[:SOURCES]]
    (tmp_path / "one").mkdir()
    expected = single_box(tmp_path / "one", sources, ALARM)
    assert {e[0] for e in expected if e[1] == "start"} >= {"s00"}
    got = distributed(tmp_path, models_dir, sources, capture_alarm=ALARM, own_alarm=STAGE_ALARM)
    assert got == expected, (sorted(expected - got)[:4], sorted(got - expected)[:4])


def test_the_default_budget_gives_the_single_box_alarms(tmp_path, models_dir, sources_root):  # noqa: F811
    # the default budget and k of n: a faulty source has two faulty 10-s windows, too short
    # for the default rule (a capped ewma wants a fault to last)
    sources = [s | {"speed": "max", "alarm": {"rule": "kofn"}}
               for s in source_list(sources_root, models_dir)[:SOURCES]]
    (tmp_path / "one").mkdir()
    expected = single_box(tmp_path / "one", sources, {})
    assert any(e[1] == "start" for e in expected)  # the budget lets the faults alarm
    got = distributed(tmp_path, models_dir, sources, capture_alarm={}, own_alarm={})
    assert got == expected, (sorted(expected - got)[:4], sorted(got - expected)[:4])
