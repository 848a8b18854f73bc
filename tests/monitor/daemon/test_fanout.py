"""One failing sink does not stop the others; a sink that cannot start stops those started."""

from __future__ import annotations

import pytest

from monitor.daemon.fanout import FanoutPublisher
from monitor.daemon.types import Score


class Sink:
    def __init__(self, name, *, fail=(), counters=None):
        self.name, self.fail, self.counters = name, set(fail), counters or {}
        self.calls: list[str] = []

    def _do(self, method):
        self.calls.append(method)
        if method in self.fail:
            raise RuntimeError(f"{self.name} {method} broke")

    def start(self): self._do("start")
    def stop(self): self._do("stop")
    def publish_score(self, s): self._do("publish_score")
    def publish_alarm_state(self, source, on): self._do("publish_alarm_state")
    def publish_event(self, e): self._do("publish_event")
    def publish_source_state(self, source, state): self._do("publish_source_state")
    def publish_stats(self, stats): self._do("publish_stats")

    def status(self):
        self._do("status")
        return dict(self.counters)


SCORE = Score(source="fan", model="m", score=1.0, threshold=2.0, window_start_s=0.0,
              window_end_s=10.0, ready_mono_s=0.0, scored_time_s=0.0, label=None)


def test_a_failing_sink_does_not_stop_the_sinks_after_it():
    broken = Sink("mqtt", fail={"publish_score", "publish_event", "publish_stats", "stop",
                                "status"})
    page, log = Sink("web"), Sink("jsonl", counters={"lines": 3})
    fan = FanoutPublisher([broken, page, log])
    fan.start()
    for _ in range(3):
        fan.publish_score(SCORE)
    fan.publish_alarm_state("fan", True)
    fan.publish_event(object())
    fan.publish_source_state("fan", "running")
    fan.publish_stats({})
    expected = ["start"] + ["publish_score"] * 3 + ["publish_alarm_state", "publish_event",
                                                    "publish_source_state", "publish_stats"]
    assert page.calls == expected and log.calls == expected
    status = fan.status()
    assert status["lines"] == 3
    assert status["sink_failures"] == {"Sink.publish_score": 3, "Sink.publish_event": 1,
                                       "Sink.publish_stats": 1}
    fan.stop()
    assert page.calls[-1] == "stop" and log.calls[-1] == "stop"
    assert fan.failures["Sink.stop"] == 1


def test_a_sink_that_cannot_start_stops_those_started_and_the_error_goes_up():
    first, second, third = Sink("jsonl"), Sink("mqtt", fail={"start"}), Sink("web")
    fan = FanoutPublisher([first, second, third])
    with pytest.raises(RuntimeError, match="mqtt start broke"):
        fan.start()
    assert first.calls == ["start", "stop"]
    assert third.calls == [], "a sink after the failing one is never started"
