"""Operator figures: false alarms per day and detection delay, through the daemon's alarm code.

Scores of a continuous stream (a folder of files played one after another, or audio rendered in
memory by a benchmark) go through the same `resolve_alarm` and `AlarmStateMachine` (with its
rule) as `harken monitor`; nothing here re-implements an alarm rule.

`harken evaluate --stream DATA` reads:
- `DATA/normal/`: healthy recordings; each machine ID's files, in name order, are one stream,
  whose alarms are false alarms;
- `DATA/streams/<name>/`: one stream each, healthy files then faulty ones (`normal_...` then
  `anomaly_...` names); the fault starts with the first anomalous file, and the delay is the
  time from there to the end of the window that raised the alarm.
- `DATA/labels.csv` (optional, columns file, fault, severity, as `harken synth` writes it):
  the fault type and severity of a stream's first anomalous file, for the figures per fault
  type and severity (`per_fault`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from monitor.calibration import SECONDS_PER_DAY
from monitor.daemon.alarm import AlarmStateMachine
from monitor.daemon.thresholds import ResolvedAlarm, effective_rule, resolve_for_detector
from monitor.daemon.types import Score
from monitor.errors import UsageError
from monitor.labels import ANOMALY, find_audio, parse_clip
from monitor.replay import SkipCounter, score_files
from train.evaluate import read_fault_labels
from train.metrics import auc

DETECT_WITHIN_S = 60.0
SWEEP_BUDGETS = (0.01, 0.03, 0.1, 1 / 7, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass(frozen=True)
class StreamScores:
    name: str
    machine_id: int | None
    starts_s: np.ndarray  # window start, seconds from the stream's start
    scores: np.ndarray
    window_s: float
    seconds: float  # audio duration of the stream
    fault_start_s: float | None = None  # None: a healthy stream
    fault: str | None = None  # the fault's type and severity, where labels tell (breakdown)
    severity: float | None = None


def alarm_times(stream: StreamScores, resolved: ResolvedAlarm, hold_s: float) -> list[float]:
    """End times (stream seconds) of the windows that started an alarm, by AlarmStateMachine."""
    machine = AlarmStateMachine("eval", stream.name, k=resolved.k, n=resolved.n, hold_s=hold_s,
                                rule=resolved.build_rule())
    out = []
    for start, value in zip(stream.starts_s, stream.scores):
        score = Score(source=stream.name, model="eval", score=float(value),
                      threshold=resolved.window_threshold, window_start_s=float(start),
                      window_end_s=float(start) + stream.window_s, ready_mono_s=0.0,
                      scored_time_s=0.0)
        for event in machine.update(score):
            if event.type == "start":
                out.append(float(event.detail["window_end"]))
    return out


def stream_figures(normal: list[StreamScores], faulty: list[StreamScores], resolve, hold_s: float,
                   within_s: float = DETECT_WITHIN_S, *, per_fault: bool = True) -> dict:
    """Observed against expected false alarms on the healthy streams, and for the faulty ones
    the share alarmed (within `within_s` of the fault) and the delays. resolve(machine_id) gives
    the ResolvedAlarm of that ID's source."""
    cache: dict = {}

    def res(mid):
        if mid not in cache:
            cache[mid] = resolve(mid)
        return cache[mid]

    per_id, episodes, seconds, fp, n_normal_windows = {}, 0, 0.0, 0, 0
    expected_sum = 0.0
    for s in normal:
        r = res(s.machine_id)
        n_alarms = len(alarm_times(s, r, hold_s))
        key = "unknown" if s.machine_id is None else f"{s.machine_id:02d}"
        days = s.seconds / SECONDS_PER_DAY
        per_id[key] = {"hours": round(s.seconds / 3600, 3), "false_alarms": n_alarms,
                       "observed_per_day": n_alarms / days if days else None,
                       "expected_per_day": r.expected_per_day, "threshold": r.threshold,
                       "window_threshold": r.window_threshold, "origin": r.origin}
        episodes += n_alarms
        seconds += s.seconds
        fp += int((s.scores > r.window_threshold).sum())
        n_normal_windows += len(s.scores)
        expected_sum += (r.expected_per_day or 0.0) * days
    delays, alarmed, tp, n_fault_windows = [], 0, 0, 0
    early = 0  # alarms before the fault started: false alarms in the healthy lead-in
    first_delay: list[float | None] = []  # per faulty stream: its first alarm after the fault
    for s in faulty:
        r = res(s.machine_id)
        times = alarm_times(s, r, hold_s)
        assert s.fault_start_s is not None
        early += sum(t <= s.fault_start_s for t in times)
        after = [t - s.fault_start_s for t in times if t > s.fault_start_s]
        faulty_windows = s.starts_s + s.window_s > s.fault_start_s
        tp += int((s.scores[faulty_windows] > r.window_threshold).sum())
        n_fault_windows += int(faulty_windows.sum())
        first_delay.append(after[0] if after else None)
        if after:
            alarmed += 1
            delays.append(after[0])
    d = np.array(delays)
    days = seconds / SECONDS_PER_DAY
    return {
        "normal_hours": round(seconds / 3600, 3),
        "false_alarm_episodes": episodes,
        "observed_false_alarms_per_day": episodes / days if days else None,
        "expected_false_alarms_per_day": expected_sum / days if days else None,
        "window_fpr": fp / n_normal_windows if n_normal_windows else None,
        "window_tpr": tp / n_fault_windows if n_fault_windows else None,
        "streams": len(faulty),
        "streams_alarmed": alarmed / len(faulty) if faulty else None,
        f"streams_alarmed_within_{int(within_s)}s":
            float(np.mean([x <= within_s for x in delays] + [False] * (len(faulty) - alarmed)))
            if faulty else None,
        "delay_s_median": round(float(np.median(d)), 3) if len(d) else None,
        "delay_s_p90": round(float(np.quantile(d, 0.9)), 3) if len(d) else None,
        "lead_in_false_alarms": early,
        "per_id": per_id,
        **({"per_fault": fault_breakdown(normal, faulty, first_delay, within_s)}
           if per_fault else {}),
    }


def _group_figures(streams: list[StreamScores], delays: list[float | None], within_s: float,
                   healthy: dict) -> dict:
    hit, fault_scores = [d for d in delays if d is not None], []
    for s in streams:
        if s.machine_id in healthy:
            fault_scores.append(s.scores[s.starts_s + s.window_s > s.fault_start_s])
    # this group's faulty windows against the healthy windows of its machine IDs (of the IDs
    # that have healthy streams); scores that are not finite are left out
    ids = sorted({s.machine_id for s in streams if s.machine_id in healthy}, key=str)
    neg = np.concatenate([healthy[m] for m in ids]) if ids else np.zeros(0)
    pos = np.concatenate(fault_scores) if fault_scores else np.zeros(0)
    neg, pos = neg[np.isfinite(neg)], pos[np.isfinite(pos)]
    window_auc = (auc(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
                  if len(neg) and len(pos) else None)
    return {"streams": len(streams), "alarmed": len(hit) / len(streams),
            f"alarmed_within_{int(within_s)}s": sum(d <= within_s for d in hit) / len(streams),
            "delay_s_median": round(float(np.median(hit)), 3) if hit else None,
            "window_auc": window_auc}


def fault_breakdown(normal: list[StreamScores], faulty: list[StreamScores],
                    delays: list[float | None], within_s: float = DETECT_WITHIN_S) -> dict:
    """Per fault type, and per severity within it: the share of streams alarmed (within
    `within_s`), the median delay, and the window AUC (the type's faulty windows against the
    healthy windows of the same machine IDs: how far apart single windows are, before any
    rule). delays: each faulty stream's first alarm after its fault (None: none), as
    stream_figures found them. Streams without a fault label are grouped as "unknown"; {}
    without faulty streams."""
    healthy = {}
    for s in normal:
        healthy.setdefault(s.machine_id, []).append(s.scores)
    healthy = {m: np.concatenate(v) for m, v in healthy.items()}
    groups: dict = {}
    for s, d in zip(faulty, delays):
        groups.setdefault(s.fault or "unknown", []).append((s, d))

    def figures(members):
        return _group_figures([s for s, _ in members], [d for _, d in members], within_s, healthy)

    out = {}
    for name in sorted(groups):
        entry = figures(groups[name])
        by_sev: dict = {}
        for s, d in groups[name]:
            if s.severity is not None:
                by_sev.setdefault(round(float(s.severity), 3), []).append((s, d))
        if by_sev:
            entry["by_severity"] = {f"{sev:g}": figures(by_sev[sev]) for sev in sorted(by_sev)}
        out[name] = entry
    return out


# --------------------------------------------------------------------------- folders


def _stream_from_files(detector, name: str, files: list[Path], hop_s: float,
                       skips: SkipCounter, labels: dict | None = None,
                       root: Path | None = None) -> StreamScores | None:
    """Files played back to back: each file's windows shifted by the files before it. labels:
    labels.csv's file (relative to root, else the name) -> (fault, severity); the first
    anomalous file's labels name the stream's fault."""
    offsets, t, fault_start, mids = {}, 0.0, None, set()
    fault, severity = None, None
    for f in files:
        info = parse_clip(f)
        mids.add(info.machine_id)
        try:
            dur = sf.info(str(f)).duration
        except (RuntimeError, sf.LibsndfileError):
            continue  # score_files skips and counts it
        offsets[str(f)] = t
        if info.label == ANOMALY and fault_start is None:
            fault_start = t
            labels = labels or {}
            key = f.relative_to(root).as_posix() if root is not None else f.name
            fault, severity = labels.get(key, labels.get(f.name, (None, None)))
        t += dur
    starts, scores = [], []
    machine_id = next(iter(mids)) if len(mids) == 1 else None
    for ws in score_files(detector, files, hop_s=hop_s, skips=skips):
        starts.append(offsets[ws.file] + ws.window_start_s)
        scores.append(ws.score)
    if not scores:
        return None
    return StreamScores(name, machine_id, np.array(starts), np.array(scores), detector.window_s,
                        t, fault_start, fault, severity)


def score_stream_folders(detector, data: str | Path, *, hop_s: float,
                         progress: bool = False) -> tuple[list[StreamScores], list[StreamScores], int]:
    root = Path(data)
    normal_dir, streams_dir = root / "normal", root / "streams"
    if not normal_dir.is_dir() and not streams_dir.is_dir():
        raise UsageError(f"{root}: a stream evaluation needs {root}/normal/ (healthy recordings) "
                         f"and/or {root}/streams/<name>/ (healthy then faulty recordings)")
    skips = SkipCounter()
    normal = []
    if normal_dir.is_dir():
        by_id: dict = {}
        for f in find_audio(normal_dir):
            by_id.setdefault(parse_clip(f).machine_id, []).append(f)
        for mid, files in sorted(by_id.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
            s = _stream_from_files(detector, f"normal-{'x' if mid is None else mid}",
                                   sorted(files), hop_s, skips)
            if s is not None:
                normal.append(s)
    faulty = []
    if streams_dir.is_dir():
        labels = read_fault_labels(root, parent=False)
        for d in sorted(p for p in streams_dir.iterdir() if p.is_dir()):
            # healthy files, then the faulty ones, each in name order (by name alone
            # `anomaly_...` would play first and the healthy lead-in after the fault)
            files = sorted(find_audio(d), key=lambda f: (parse_clip(f).label == ANOMALY, str(f)))
            s = _stream_from_files(detector, d.name, files, hop_s, skips, labels, root)
            if s is None:
                continue
            if s.fault_start_s is None:
                raise UsageError(f"{d}: no anomalous file (anomaly_... name) in this stream; "
                                 "put healthy streams under normal/")
            faulty.append(s)
    return normal, faulty, skips.total


def evaluate_streams(model: str | Path, data: str | Path, alarm, *, hop_s: float = 10.0,
                     device: str = "auto", report: str | None = None, progress: bool = True) -> dict:
    """`harken evaluate --stream`: figures at `alarm` (an AlarmConfig) and, with a report
    directory, the trade-off curve over budgets (tradeoff.png)."""
    from monitor.detector import Detector

    detector = Detector.load(model, device=device)
    normal, faulty, skipped = score_stream_folders(detector, data, hop_s=hop_s, progress=progress)

    def resolve_at(a):
        return lambda mid: resolve_for_detector(detector, a, hop_s=hop_s, machine_id=mid)

    out = stream_figures(normal, faulty, resolve_at(alarm), alarm.hold_s)
    rule = effective_rule(alarm, getattr(detector, "calibration", None) is not None)
    out.update({"model": detector.name, "rule": rule, "hop_s": hop_s,
                "budget_per_day": alarm.false_alarms_per_day, "skipped_files": skipped})
    if report:
        out["report"] = {"tradeoff": str(write_tradeoff(
            Path(report) / "tradeoff.png", sweep(normal, faulty, alarm, resolve_at), detector.name))}
    return out


def sweep(normal, faulty, alarm, resolve_at, budgets=SWEEP_BUDGETS) -> dict[str, list[dict]]:
    """Figures per rule and budget (for the trade-off plot)."""
    curves = {}
    for rule in ("kofn", "ewma", "cusum"):
        rows = []
        for b in budgets:
            a = dataclasses.replace(alarm, rule=rule, false_alarms_per_day=b, threshold=None)
            fig = stream_figures(normal, faulty, resolve_at(a), a.hold_s, per_fault=False)
            rows.append({"budget_per_day": b, **{k: v for k, v in fig.items() if k != "per_id"}})
        curves[rule] = rows
    return curves


def write_tradeoff(path: Path, curves: dict[str, list[dict]], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for rule, rows in curves.items():
        xs = [r["expected_false_alarms_per_day"] for r in rows]
        ys = [r["delay_s_median"] if r["delay_s_median"] is not None else np.nan for r in rows]
        line, = ax.plot(xs, ys, "o-", label=f"{rule} (default)" if rule == "ewma" else rule)
        share = [100 * (r["streams_alarmed_within_60s"] or 0.0) for r in rows]
        ax2.plot(xs, share, "o-", color=line.get_color(), label=f"{rule} (expected)")
        obs = [r["observed_false_alarms_per_day"] for r in rows]
        ax2.plot([o if o else np.nan for o in obs], share, "x", color=line.get_color(), alpha=0.7)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.axvline(1 / 7, color="grey", ls=":", label="default budget (1 a week)")
        a.set_xlabel("false alarms per day per machine")
    ax.set(ylabel="median delay of the alarmed streams, s", title="detection delay")
    ax2.set(ylabel="faulty streams alarmed within 60 s, %", ylim=(0, 100),
            title="detected within 60 s (x: at the observed false alarms)")
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"False-alarm budget vs detection: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def clip_alarm_figures(detector, rows: list[dict], alarm=None) -> dict:
    """For `harken evaluate` on clips: the thresholds the daemon would use at `alarm` (default
    AlarmConfig, hop = window), window FPR/TPR there, and the normal clips of each machine ID
    played back to back as one stream: observed against expected false alarms per day."""
    from monitor.daemon.config import AlarmConfig
    from monitor.labels import NORMAL

    alarm = alarm or AlarmConfig()
    hop = detector.window_s
    normal, tp, n_anomalous = [], 0, 0
    resolved: dict = {}

    def resolve(mid):
        if mid not in resolved:
            resolved[mid] = resolve_for_detector(detector, alarm, hop_s=hop, machine_id=mid)
        return resolved[mid]

    for mid in sorted({r["machine_id"] for r in rows}, key=lambda m: -1 if m is None else m):
        mine = sorted((r for r in rows if r["machine_id"] == mid), key=lambda r: r["file"])
        s = np.array([r["score"] for r in mine if r["label"] == NORMAL])
        a = np.array([r["score"] for r in mine if r["label"] == ANOMALY])
        tp += int((a > resolve(mid).window_threshold).sum())
        n_anomalous += len(a)
        if len(s):
            normal.append(StreamScores(f"normal-{mid}", mid, np.arange(len(s)) * hop, s, hop,
                                       len(s) * hop))
    out = stream_figures(normal, [], resolve, alarm.hold_s)
    return {"rule": effective_rule(alarm, getattr(detector, "calibration", None) is not None),
            "budget_per_day": alarm.false_alarms_per_day,
            "window_fpr": out["window_fpr"],
            "window_tpr": tp / n_anomalous if n_anomalous else None,
            "normal_hours": out["normal_hours"], "false_alarm_episodes": out["false_alarm_episodes"],
            "observed_false_alarms_per_day": out["observed_false_alarms_per_day"],
            "expected_false_alarms_per_day": out["expected_false_alarms_per_day"],
            "per_id": out["per_id"]}
