"""`per_fault` of the stream figures: per fault type and severity, through the alarm code."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.daemon.thresholds import ResolvedAlarm
from train.commands import fault_lines
from train.stream_eval import StreamScores, stream_figures


def _kofn(threshold: float) -> ResolvedAlarm:
    return ResolvedAlarm(rule="kofn", threshold=threshold, window_threshold=threshold,
                         origin="config", expected_per_day=None, budget_per_day=None, mean=0.0,
                         std=1.0, k=2, n=3, ewma_lambda=0.2, cusum_k=0.5, tail="test")


def _faulty(rng, name, mid, shift, fault, severity, n=18, lead=6):
    s = rng.normal(size=n)
    s[lead:] += shift
    return StreamScores(name, mid, np.arange(n) * 10.0, s, 10.0, n * 10.0, lead * 10.0, fault,
                        severity)


def test_each_fault_type_and_severity_gets_its_own_share_delay_and_window_auc():
    rng = np.random.default_rng(0)
    normal = [StreamScores(f"n{m}", m, np.arange(2000) * 10.0, rng.normal(size=2000), 10.0,
                           20_000.0) for m in (0, 1)]
    faulty = [_faulty(rng, f"loud{i}", i % 2, 20.0, "loud", 1.0) for i in range(4)]
    faulty += [_faulty(rng, f"quiet{i}", i % 2, 0.0, "quiet", sev)
               for i, sev in enumerate((0.5, 0.5, 0.75, 0.75))]
    faulty.append(_faulty(rng, "unlabelled", 0, 20.0, None, None))
    r = stream_figures(normal, faulty, lambda mid: _kofn(6.0), hold_s=30.0)
    pf = r["per_fault"]
    assert set(pf) == {"loud", "quiet", "unknown"}
    loud, quiet = pf["loud"], pf["quiet"]
    assert loud["streams"] == 4 and loud["alarmed"] == 1.0 and loud["alarmed_within_60s"] == 1.0
    # 2 of 3 windows over the threshold: the second faulty window ends 20 s after the start
    assert loud["delay_s_median"] == pytest.approx(20.0)
    assert loud["window_auc"] == pytest.approx(1.0)
    assert quiet["alarmed"] == 0.0 and quiet["delay_s_median"] is None
    assert 0.35 < quiet["window_auc"] < 0.65  # the same distribution as healthy windows
    assert set(quiet["by_severity"]) == {"0.5", "0.75"}
    assert quiet["by_severity"]["0.5"]["streams"] == 2
    assert "by_severity" not in pf["unknown"] and pf["unknown"]["alarmed"] == 1.0
    lines = fault_lines(pf)
    assert lines[0].startswith("loud: 100% within 60 s (100% at all) of 4, window AUC 1.000")
    assert any(ln.strip().startswith("severity 0.75: 0% within 60 s") for ln in lines)


def test_a_stream_whose_machine_id_has_no_healthy_stream_has_no_window_auc():
    rng = np.random.default_rng(1)
    normal = [StreamScores("n0", 0, np.arange(100) * 10.0, rng.normal(size=100), 10.0, 1000.0)]
    faulty = [_faulty(rng, "other", 7, 20.0, "loud", 1.0)]
    pf = stream_figures(normal, faulty, lambda mid: _kofn(6.0), hold_s=30.0)["per_fault"]
    assert pf["loud"]["window_auc"] is None and pf["loud"]["alarmed"] == 1.0
    assert fault_lines(pf)[0].endswith("window AUC n/a")


class _LoudnessDetector:
    """Scores a window by its RMS: enough to run the folder path without a model."""

    window_s = 10.0

    def score_windows(self, windows, machine_ids):
        return np.sqrt((np.asarray(windows, dtype=np.float64) ** 2).mean(axis=1))

    def threshold_for(self, machine_id):
        return 1.0


def test_stream_folders_take_each_streams_fault_from_labels_csv_by_path(tmp_path):
    import soundfile as sf

    from train.stream_eval import score_stream_folders

    root = tmp_path / "eval"
    rng = np.random.default_rng(2)
    for stream in ("a", "b", "c"):  # the same file names in each stream
        d = root / "streams" / stream
        d.mkdir(parents=True)
        for name, scale in (("normal_id_00_00000000.wav", 0.01), ("anomaly_id_00_00000000.wav", 0.3)):
            sf.write(d / name, (rng.normal(size=160_000) * scale).astype(np.float32), 16000)
    (root / "labels.csv").write_text(
        "file,fault,severity\n"
        "streams/a/anomaly_id_00_00000000.wav,hiss,1.0\n"
        "streams/b/anomaly_id_00_00000000.wav,hum,0.5\n")
    # one folder up, as `harken synth` writes it: not a stream set's labels
    (tmp_path / "labels.csv").write_text("file,fault,severity\nanomaly_id_00_00000000.wav,other,1\n")
    _, faulty, skipped = score_stream_folders(_LoudnessDetector(), root, hop_s=10.0)
    assert skipped == 0
    got = {s.name: (s.fault, s.severity) for s in faulty}
    assert got == {"a": ("hiss", 1.0), "b": ("hum", 0.5), "c": (None, None)}
    assert all(s.fault_start_s == 10.0 for s in faulty)
