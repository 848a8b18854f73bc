"""Alarm hysteresis on the audio timeline: k of n to turn on, hold_s below to turn off."""

from monitor.daemon.alarm import AlarmStateMachine
from monitor.daemon.types import Score

T0 = 1_000.0


def scores(values, hop_s=10.0, threshold=1.0):
    return [Score("s", "m", v, threshold, T0 + i * hop_s, T0 + i * hop_s + 10.0, 0.0, 0.0)
            for i, v in enumerate(values)]


def run(machine, values, **kw):
    out = []
    for i, s in enumerate(scores(values, **kw)):
        out += [(i, e) for e in machine.update(s)]
    return out


def test_k_of_n_turns_on_and_k_minus_one_does_not():
    m = AlarmStateMachine("n", "s", k=2, n=3, hold_s=30)
    assert run(m, [2, 0, 0, 2, 0, 0, 2]) == []  # never 2 of any 3 consecutive
    m = AlarmStateMachine("n", "s", k=2, n=3, hold_s=30)
    events = run(m, [0, 2, 0, 2])
    assert [(i, e.type) for i, e in events] == [(3, "start")]
    start = events[0][1]
    assert start.id == f"n-s-{int((T0 + 30) * 1000)}" and start.seq == 0 and m.on


def test_update_on_new_peak_and_end_after_hold_on_audio_time():
    m = AlarmStateMachine("n", "s", k=2, n=3, hold_s=30)
    values = [2, 3, 5, 4, 0, 0, 6, 0, 0, 0, 0]
    events = run(m, values)
    kinds = [(i, e.type) for i, e in events]
    # on at window 1; peaks at 2 and 6; the last exceedance ends at window 6's end, and 30 s
    # of audio later (window 9's end) it clears
    assert kinds == [(1, "start"), (2, "update"), (6, "update"), (9, "end")]
    ids = {e.id for _, e in events}
    assert len(ids) == 1
    assert [e.seq for _, e in events] == [0, 1, 2, 3]
    assert events[-1][1].peak_score == 6
    assert not m.on and m.alarms == 1


def test_hold_counts_audio_seconds_not_windows():
    # 1-s hop: the hold of 5 s needs 5 windows, not 1
    m = AlarmStateMachine("n", "s", k=1, n=1, hold_s=5)
    events = run(m, [2] + [0] * 10, hop_s=1.0)
    assert [(i, e.type) for i, e in events] == [(0, "start"), (5, "end")]


def test_a_new_alarm_after_end_needs_k_fresh_exceedances_and_gets_a_new_id():
    m = AlarmStateMachine("n", "s", k=2, n=3, hold_s=10)
    events = run(m, [2, 2, 0, 2, 0, 0, 2, 2])
    kinds = [(i, e.type) for i, e in events]
    # window 3 alone (after the clear) is not enough; windows 6 and 7 are
    assert kinds == [(1, "start"), (2, "end"), (7, "start")]
    assert events[0][1].id != events[2][1].id
