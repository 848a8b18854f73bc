"""Each source's alarm: its threshold and rule, resolved from its detector's calibration
(monitor/daemon/thresholds.py) when the daemon starts, again when a learning source arms on its
enrolled detector, and moved by recalibration after normal verdicts
(monitor/daemon/recalibration.py). It fills the daemon's `alarms` dict (source -> state
machine) and the inference worker's threshold overrides; nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping

from monitor.daemon.alarm import AlarmStateMachine
from monitor.daemon.config import DaemonConfig, SourceConfig
from monitor.daemon.exposure import Exposure
from monitor.daemon.types import ScoringModel


class SourceAlarms:
    def __init__(self, config: DaemonConfig, detectors: Mapping[str, ScoringModel],
                 alarms: dict[str, AlarmStateMachine], exposure: Exposure, log):
        self.config = config
        self.node = config.node
        self.source_configs: dict[str, SourceConfig] = {s.id: s for s in config.sources}
        self.detectors = detectors  # the loaded models, by path
        self.alarms = alarms  # the daemon's dict, shared with the scored-window route
        self.exposure = exposure
        self.log = log
        self.no_verdict: dict = {}  # source -> its ResolvedAlarm without any verdict

    def build(self) -> dict:
        """Every source's state machine; returns the worker's threshold overrides (source, or
        (source, machine ID) -> window threshold)."""
        overrides: dict = {}
        for s in self.config.sources:
            alarm = s.alarm or self.config.alarm
            resolved = self._resolve(s, alarm, s.machine_id)
            self.alarms[s.id] = self._machine(s, resolved)
            if resolved is not None:
                self.no_verdict[s.id] = resolved
                overrides[s.id] = resolved.window_threshold
                overrides.update(self._per_id_thresholds(s, alarm))
            elif alarm.threshold is not None:
                overrides[s.id] = alarm.threshold
        return overrides

    def _machine(self, s: SourceConfig, resolved) -> AlarmStateMachine:
        alarm = s.alarm or self.config.alarm
        return AlarmStateMachine(self.node, s.id, k=alarm.k, n=alarm.n, hold_s=alarm.hold_s,
                                 rule=resolved.build_rule() if resolved is not None else None)

    def armed(self, sid: str, det, overrides: dict) -> None:
        """An enrolled source (monitor/daemon/learning.py): its threshold and rule from the
        enrolled detector's tail. On the inference thread, or before it starts."""
        s = self.source_configs[sid]
        resolved = self._resolve(s, s.alarm or self.config.alarm, s.machine_id, det)
        for k in [k for k in overrides if isinstance(k, tuple) and k[0] == sid]:
            del overrides[k]  # per-ID tails of the artifact: not the enrolled model's
        overrides[sid] = resolved.window_threshold
        self.alarms[sid] = self._machine(s, resolved)
        self.no_verdict[sid] = resolved

    def recalibrate(self, sid: str, overlay, worker, base_key: str) -> None:
        """On the inference worker: the threshold follows the judged windows, logged as
        `threshold_updated`. `base_key` is the worker's detector the overlay sits on."""
        from monitor.daemon.recalibration import recalibrate

        no_verdict = self.no_verdict.get(sid)
        if no_verdict is None:
            return
        s = self.source_configs[sid]
        new = recalibrate(worker.detectors[base_key], overlay,
                          s.alarm or self.config.alarm, hop_s=s.hop_s, machine_id=s.machine_id,
                          no_verdict=no_verdict, exposure_days=self.exposure.days(sid))
        old = worker.threshold_overrides.get(sid)
        rule = getattr(self.alarms.get(sid), "rule", None)
        if new.rule != "kofn" and hasattr(rule, "h"):
            # ewma / cusum alarm at a level of their statistic: that is what moves
            before, after = rule.h, new.threshold
            if before == after:
                return
            rule.h = after  # a float: the route reads it on this thread
            if old is not None:
                worker.threshold_overrides[sid] = new.window_threshold
        else:
            if old is None or new.window_threshold == old:
                return
            before, after = old, new.window_threshold
            worker.threshold_overrides[sid] = after
        self.log.info("threshold_updated", source=sid, rule=new.rule, old=before, new=after,
                      expected_false_alarms_per_day=new.expected_per_day,
                      judged_windows=overlay.windows, reference_version=overlay.version,
                      exposure_days=round(self.exposure.days(sid), 4), why=new.tail)

    def _resolve(self, s: SourceConfig, alarm, machine_id: int | None, det=None):
        """The source's rule and threshold (monitor/daemon/thresholds.py), logged; None for a
        stand-in detector without a manifest (tests)."""
        from monitor.daemon.thresholds import resolve_for_detector

        det = det if det is not None else self.detectors.get(s.model)
        if det is None or not hasattr(det, "manifest"):
            return None
        resolved = resolve_for_detector(det, alarm, hop_s=s.hop_s, machine_id=machine_id)
        self.log.info("alarm_threshold", source=s.id, machine_id=machine_id, **resolved.to_json())
        return resolved

    def _per_id_thresholds(self, s: SourceConfig, alarm) -> dict:
        """(source, machine ID) -> window threshold, for a source without a configured
        machine_id whose windows carry IDs from their file names: each such window is scored
        against its ID's statistics, so it must be judged at that ID's calibrated tail, not at
        the pooled one. Keyed by the IDs the model was trained on; windows of other IDs are
        scored against the pooled statistics and use the source's (pooled) threshold."""
        det = self.detectors.get(s.model)
        if s.machine_id is not None or alarm.threshold is not None or \
                getattr(det, "calibration", None) is None:
            return {}
        trained = det.manifest.files_per_id
        ids = sorted(int(k) for k in trained if k.isdigit())
        return {(s.id, mid): self._resolve(s, alarm, mid).window_threshold for mid in ids}
