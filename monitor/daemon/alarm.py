"""Per-source alarm state machine: ON when its rule triggers (default: k of the last n windows
exceed the threshold), OFF after `hold_s` with no window keeping it active (monitor/daemon/rules.py).

Time is the audio's own timeline (the windows' capture timestamps), not the wall clock: a
folder replayed at full speed covers an hour of audio in a minute, and "30 s of quiet" must
mean 30 s of audio there as it does live. It also makes the machine a pure function of its
input, so tests need no clock.
"""

from __future__ import annotations

from monitor.daemon.rules import AlarmRule, KOfNRule
from monitor.daemon.types import AlarmEvent, Score


class AlarmStateMachine:
    def __init__(self, node: str, source: str, *, k: int, n: int, hold_s: float,
                 rule: AlarmRule | None = None):
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
        self.rule: AlarmRule = rule if rule is not None else KOfNRule(k, n)
        self.node = node
        self.source = source
        self.k = k
        self.n = n
        self.hold_s = hold_s
        self.on = False
        self.alarm_id: str | None = None
        self._seq = 0
        self._peak = float("-inf")
        self._last_above_end_s = 0.0
        self.alarms = 0

    def update(self, score: Score) -> list[AlarmEvent]:
        """Feed one window's score (in capture order); return the events it caused."""
        step = self.rule.update(score)
        above = step.active
        if not self.on:
            if step.trigger:
                self.on = True
                self.alarms += 1
                self.alarm_id = f"{self.node}-{self.source}-{int(score.window_start_s * 1000)}"
                self._seq = 0
                self._peak = score.score
                self._last_above_end_s = score.window_end_s
                return [self._event("start", score)]
            return []
        if above:
            self._last_above_end_s = score.window_end_s
            if score.score > self._peak:
                self._peak = score.score
                return [self._event("update", score)]
            return []
        if score.window_end_s - self._last_above_end_s >= self.hold_s:
            event = self._event("end", score)
            self.on = False
            self.alarm_id = None
            self.rule.reset()
            return [event]
        return []

    def snapshot(self) -> dict:
        """Everything update() depends on, as JSON (the alarm stage checkpoints it)."""
        return {"on": self.on, "alarm_id": self.alarm_id, "seq": self._seq,
                "peak": self._peak if self.on else None, "last_above_end_s": self._last_above_end_s,
                "alarms": self.alarms, "rule": self.rule.snapshot()}

    def restore(self, state: dict) -> None:
        self.on, self.alarm_id, self._seq = bool(state["on"]), state["alarm_id"], int(state["seq"])
        self._peak = float("-inf") if state["peak"] is None else float(state["peak"])
        self._last_above_end_s = float(state["last_above_end_s"])
        self.alarms = int(state["alarms"])
        self.rule.restore(state["rule"])

    def _event(self, kind: str, score: Score) -> AlarmEvent:
        event = AlarmEvent(type=kind, id=self.alarm_id or "", source=self.source,
                           ts=score.window_start_s if kind == "start" else score.window_end_s,
                           peak_score=self._peak, threshold=score.threshold, seq=self._seq,
                           detail={"window_start": round(score.window_start_s, 3),
                                   "window_end": round(score.window_end_s, 3),
                                   "score": score.score,
                                   **({"file": score.label} if score.label else {})})
        self._seq += 1
        return event
