"""Several sinks at once (MQTT, a JSONL file, the web page), written out method by method.

A sink that raises does not stop the sinks after it: the error is counted per sink and method
and logged at a limited rate, and the window, state or event still reaches every other sink
(an MQTT client that has lost its mind must not blank the operator's page or the JSONL log).
`start` is the exception: a sink that cannot start is a configuration problem, so the sinks
already started are stopped again and the error goes up. `stop` stops every sink, whatever
one of them raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monitor.daemon.ratelimit import RateLimitedWarning
from monitor.daemon.types import AlarmEvent, Publisher, Score
from monitor.logs import get_logger


class FanoutPublisher:
    def __init__(self, sinks: Sequence[Publisher]):
        self.sinks: tuple[Publisher, ...] = tuple(sinks)
        self.failures: dict[str, int] = {}  # "<sink class>.<method>" -> count
        self._log = get_logger(stage="publisher")
        self._warn = RateLimitedWarning(self._log, every_s=60.0)

    def _each(self, method: str, call: Callable[[Publisher], object]) -> None:
        for sink in self.sinks:
            try:
                call(sink)
            except Exception as exc:  # noqa: BLE001 - one sink's failure is not the others'
                key = f"{type(sink).__name__}.{method}"
                self.failures[key] = self.failures.get(key, 0) + 1
                self._warn("sink_failed", key, sink=type(sink).__name__, method=method,
                           error=f"{type(exc).__name__}: {exc}", count=self.failures[key])

    def start(self) -> None:
        started: list[Publisher] = []
        try:
            for sink in self.sinks:
                sink.start()
                started.append(sink)
        except BaseException:
            for sink in reversed(started):
                try:
                    sink.stop()
                except Exception:  # noqa: BLE001 - the start error is the one to report
                    pass
            raise

    def publish_score(self, score: Score) -> None:
        self._each("publish_score", lambda s: s.publish_score(score))

    def publish_alarm_state(self, source: str, on: bool) -> None:
        self._each("publish_alarm_state", lambda s: s.publish_alarm_state(source, on))

    def publish_event(self, event: AlarmEvent) -> None:
        self._each("publish_event", lambda s: s.publish_event(event))

    def publish_source_state(self, source: str, state: str) -> None:
        self._each("publish_source_state", lambda s: s.publish_source_state(source, state))

    def publish_stats(self, stats: dict) -> None:
        self._each("publish_stats", lambda s: s.publish_stats(stats))

    def status(self) -> dict:
        """The sinks' counters merged (MQTT: connection, outbox), and sink failures if any."""
        out: dict = {}
        for sink in self.sinks:
            try:
                out.update(sink.status())
            except Exception:  # noqa: BLE001 - a status is a report, never a reason to stop
                continue
        if self.failures:
            out["sink_failures"] = dict(self.failures)
        return out

    def stop(self) -> None:
        self._each("stop", lambda s: s.stop())
