"""`harken evaluate`: AUC / pAUC per machine ID and pooled, plus a report with plots."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from monitor.detector import Detector
from monitor.errors import UsageError
from monitor.labels import ANOMALY, NORMAL, find_audio, split_dir
from monitor.logs import get_logger
from monitor.replay import SkipCounter, score_files
from train.metrics import auc, harmonic_mean, pauc, roc_curve

MAX_FPR = 0.1
# Severity bands for per-fault figures: subtle, moderate and plain faults.
SEVERITY_BANDS = ((0.0, 1 / 3, "low"), (1 / 3, 2 / 3, "mid"), (2 / 3, 1.0001, "high"))


def read_fault_labels(data: str | Path, *, parent: bool = True) -> dict[str, tuple[str, float | None]]:
    """file name (and the file column as written) -> (fault type, severity) from the data set's
    labels.csv (as `harken synth` writes it: columns file, fault, severity); empty when there is
    none or it has no fault column. parent: also look one folder up (`harken synth` puts it next
    to test/). Rows that cannot be parsed are skipped and counted in the log."""
    root = Path(data)
    for path in (root / "labels.csv", *((root.parent / "labels.csv",) if parent else ())):
        if path.is_file():
            break
    else:
        return {}
    out: dict[str, tuple[str, float | None]] = {}
    paths_by_name: dict[str, set[str]] = {}
    bad = 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "fault" not in reader.fieldnames or "file" not in reader.fieldnames:
            return {}
        for row in reader:
            try:
                sev = row.get("severity")
                entry = (row["fault"] or "none", float(sev) if sev not in (None, "") else None)
                written = Path(row["file"])
                out[written.name] = entry
                # as written too: a path tells equal names in different folders apart
                # (stream_eval looks it up first)
                out[written.as_posix()] = entry
                paths_by_name.setdefault(written.name, set()).add(written.as_posix())
            except (TypeError, ValueError):
                bad += 1
    for name, paths in paths_by_name.items():
        if len(paths) > 1 and name not in paths:
            del out[name]  # one name, several folders: a name alone cannot say which
    if bad:
        get_logger(stage="evaluate").warning("labels_rows_skipped", file=str(path), count=bad)
    return out


def per_fault_metrics(rows: list[dict]) -> dict:
    """AUC of each fault type's anomalous clips (and of each severity band) against all normal
    clips; rows carry `fault` and `severity` (from labels.csv)."""
    y = np.array([r["label"] == ANOMALY for r in rows])
    s = np.array([r["score"] for r in rows])
    faults = np.array([r.get("fault") or "unknown" for r in rows])
    sev = np.array([np.nan if r.get("severity") is None else r["severity"] for r in rows], dtype=float)
    out: dict = {"per_fault": {}, "per_severity": {}}
    if not (~y).any():
        return out
    for name in sorted(set(faults[y])):
        sel = (~y) | (y & (faults == name))
        out["per_fault"][name] = {"n_anomaly": int((y & (faults == name)).sum()),
                                  "auc": auc(y[sel], s[sel]), "pauc": pauc(y[sel], s[sel], MAX_FPR)}
    for lo, hi, band in SEVERITY_BANDS:
        hit = y & (sev >= lo) & (sev < hi)
        if hit.any():
            sel = (~y) | hit
            out["per_severity"][band] = {"range": [round(lo, 3), round(min(hi, 1.0), 3)],
                                         "n_anomaly": int(hit.sum()), "auc": auc(y[sel], s[sel])}
    return out


def score_test_set(detector: Detector, data: str | Path, *, batch_size: int = 16,
                   progress: bool = True) -> tuple[list[dict], SkipCounter]:
    """One row per labelled file: file, machine_id, label, score (mean over its windows)."""
    root = split_dir(data, "test")
    files = find_audio(root)
    skips = SkipCounter()
    per_file: dict[str, list[float]] = defaultdict(list)
    meta: dict[str, tuple] = {}
    for ws in score_files(detector, files, batch_size=batch_size, skips=skips, progress=progress):
        per_file[ws.file].append(ws.score)
        meta[ws.file] = (ws.machine_id, ws.label)
    rows = [{"file": f, "machine_id": meta[f][0], "label": meta[f][1],
             "score": float(np.mean(s))} for f, s in per_file.items()]
    unlabelled = [r for r in rows if r["label"] not in (NORMAL, ANOMALY)]
    if unlabelled:
        get_logger(stage="evaluate").warning(
            "unlabelled_files_ignored", count=len(unlabelled), first=unlabelled[0]["file"])
    return [r for r in rows if r["label"] in (NORMAL, ANOMALY)], skips


def compute_metrics(rows: list[dict], threshold: float | None = None,
                    row_thresholds: np.ndarray | None = None) -> dict:
    """AUC/pAUC pooled and per machine ID; with a threshold (or one per row, for per-ID
    thresholds) also the TPR/FPR the detector's decisions give."""
    if not rows:
        raise UsageError("no labelled clips to evaluate (names must say normal_/anomaly_ or "
                         "sit in normal/ and abnormal/ folders)")
    y = np.array([r["label"] == ANOMALY for r in rows])
    s = np.array([r["score"] for r in rows])
    if y.all() or (~y).all():
        have = "anomalous" if y.all() else "normal"
        raise UsageError(f"evaluation needs normal and anomalous clips; found only {have} ones")
    per_id = {}
    for mid in sorted({r["machine_id"] for r in rows}, key=lambda m: -1 if m is None else m):
        sel = np.array([r["machine_id"] == mid for r in rows])
        key = "unknown" if mid is None else f"{mid:02d}"
        entry = {"n_normal": int((~y[sel]).sum()), "n_anomaly": int(y[sel].sum())}
        if entry["n_normal"] and entry["n_anomaly"]:
            entry["auc"] = auc(y[sel], s[sel])
            entry["pauc"] = pauc(y[sel], s[sel], MAX_FPR)
        per_id[key] = entry
    out = {
        "auc": auc(y, s),
        "pauc": pauc(y, s, MAX_FPR),
        "n_normal": int((~y).sum()),
        "n_anomaly": int(y.sum()),
        "per_id": per_id,
        "hmean_auc": harmonic_mean([v.get("auc") for v in per_id.values()]),
        "hmean_pauc": harmonic_mean([v.get("pauc") for v in per_id.values()]),
        "max_fpr": MAX_FPR,
    }
    if threshold is not None:
        pred = s > (row_thresholds if row_thresholds is not None else threshold)
        out["threshold"] = threshold
        out["tpr_at_threshold"] = float(pred[y].mean())
        out["fpr_at_threshold"] = float(pred[~y].mean())
    return out


def write_report(out_dir: str | Path, rows: list[dict], metrics: dict, threshold: float,
                 model_name: str) -> dict[str, str]:
    """scores.csv, roc.png and histogram.png in out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"scores": out / "scores.csv", "roc": out / "roc.png", "histogram": out / "histogram.png"}
    with open(paths["scores"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "machine_id", "label", "fault", "severity",
                                          "score", "threshold", "anomaly"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            t = r.get("threshold", threshold)
            w.writerow({**r, "threshold": t, "anomaly": r["score"] > t})

    y = np.array([r["label"] == ANOMALY for r in rows])
    s = np.array([r["score"] for r in rows])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ids = sorted({r["machine_id"] for r in rows}, key=lambda m: -1 if m is None else m)
    for mid in ids:
        sel = np.array([r["machine_id"] == mid for r in rows])
        if y[sel].any() and (~y[sel]).any():
            fpr, tpr = roc_curve(y[sel], s[sel])
            key = "unknown" if mid is None else f"{mid:02d}"
            ax.plot(fpr, tpr, lw=1, alpha=0.7, label=f"id {key} (AUC {metrics['per_id'][key]['auc']:.3f})")
    fpr, tpr = roc_curve(y, s)
    ax.plot(fpr, tpr, "k", lw=2, label=f"pooled (AUC {metrics['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.axvspan(0, MAX_FPR, color="orange", alpha=0.12, label=f"pAUC region (FPR<{MAX_FPR})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {model_name}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["roc"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    bins = np.histogram_bin_edges(s, bins=40)
    ax.hist(s[~y], bins=bins, alpha=0.6, label=f"normal (n={int((~y).sum())})", color="tab:blue")
    ax.hist(s[y], bins=bins, alpha=0.6, label=f"anomalous (n={int(y.sum())})", color="tab:red")
    ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="anomaly score", ylabel="clips", title=f"Scores: {model_name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["histogram"], dpi=110)
    plt.close(fig)
    if metrics.get("per_fault"):
        paths["faults"] = out / "faults.png"
        names = list(metrics["per_fault"])
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        ax.bar(names, [metrics["per_fault"][n]["auc"] for n in names], color="tab:red", alpha=0.7)
        for i, n in enumerate(names):
            ax.text(i, metrics["per_fault"][n]["auc"] + 0.01, f"{metrics['per_fault'][n]['auc']:.2f}",
                    ha="center", fontsize=8)
        ax.axhline(0.5, color="grey", ls=":")
        ax.set(ylim=(0, 1.05), ylabel="AUC vs all normal clips", title=f"Per fault type: {model_name}")
        fig.tight_layout()
        fig.savefig(paths["faults"], dpi=110)
        plt.close(fig)
    return {k: str(v) for k, v in paths.items()}


def evaluate(model: str | Path, data: str | Path, *, device: str = "auto", report: str | None = None,
             progress: bool = True, precision: str = "fp32") -> dict:
    detector = Detector.load(model, device=device, precision=precision)
    rows, skips = score_test_set(detector, data, progress=progress)
    for r in rows:
        r["threshold"] = detector.threshold_for(r["machine_id"])
    per_row = np.array([r["threshold"] for r in rows])
    metrics = compute_metrics(rows, detector.threshold, per_row)
    if detector.thresholds_per_id:
        metrics["thresholds_per_id"] = {f"{k:02d}": v for k, v in detector.thresholds_per_id.items()}
    metrics["model"] = detector.name
    metrics["skipped_files"] = skips.total
    if detector.calibration is not None:  # what an operator lives with (train/stream_eval.py)
        from train.stream_eval import clip_alarm_figures

        metrics["alarm"] = clip_alarm_figures(detector, rows)
    labels = read_fault_labels(data)
    if labels:
        for r in rows:
            r["fault"], r["severity"] = labels.get(Path(r["file"]).name, (None, None))
        metrics.update(per_fault_metrics(rows))
    if report:
        metrics["report"] = write_report(report, rows, metrics, detector.threshold, detector.name)
        metrics["report"]["evidence"] = write_evidence(Path(report) / "evidence", detector, rows)
    return metrics


def write_evidence(out: Path, detector: Detector, rows: list[dict], top: int = 4) -> list[str]:
    """PNG per most anomalous clip: log-mel plus the error map / attention rollout when the
    model has one. Returns the written paths."""
    from monitor.audio import load_audio, split_windows
    from monitor.plots import save_evidence_png

    rollout = getattr(detector.encoder, "attention_rollout", None)
    paths = []
    for rank, r in enumerate(sorted(rows, key=lambda r: -r["score"])[:top], 1):
        window = split_windows(load_audio(r["file"]))[0]
        emap = detector.error_map(window)
        att = None
        if rollout is not None:
            import torch

            with torch.inference_mode():
                att = rollout(torch.as_tensor(window[None]).to(detector.device))[0].cpu().numpy()
        if emap is None and att is None and rank > 1:
            break  # nothing model-specific to show: one log-mel picture is enough
        name = f"{rank:02d}_{Path(r['file']).stem}.png"
        title = f"{Path(r['file']).name}  score {r['score']:.4g} (threshold {detector.threshold:.4g}), {r['label']}"
        paths.append(str(save_evidence_png(out / name, detector.log_mel(window), error_map=emap,
                                           attention=att, title=title)))
    return paths
