"""`make demo`: the whole job on embedded defaults, no broker, no microphone, no downloads.

synth a small slide-rail set -> train the weight-free default detector -> evaluate with a report ->
replay the test clips as JSON lines -> run the monitoring daemon over a folder of normal then
anomalous then normal clips (JSONL sink, alarms, evidence) -> print a summary.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from monitor.daemon.app import Daemon
from monitor.daemon.config import AlarmConfig, DaemonConfig, SourceConfig

from monitor.detector import Detector
from monitor.replay import replay
from train.config import load_train_config
from train.evaluate import evaluate
from train.fit import fit_model
from train.synth import write_dataset

DEMO_IDS = (0, 1, 2)
DEMO_SEED = 2026


def _step(n: int, text: str) -> float:
    print(f"[{n}/6] {text}", flush=True)
    return time.monotonic()


def run_demo(out: Path, *, progress: bool = True) -> int:
    out = Path(out)
    data, model, report = out / "data", out / "model", out / "report"
    jsonl = out / "replay.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    for old in (data, model, report):  # the demo owns demo-out: start clean every run
        shutil.rmtree(old, ignore_errors=True)
    started = time.monotonic()

    t = _step(1, f"synthesising slide-rail clips into {data}")
    write_dataset(data, ids=DEMO_IDS, n_train=40, n_test_normal=10, n_test_anomaly=10,
                  snr_db=0.0, seed=DEMO_SEED, progress=progress)
    print(f"      done in {time.monotonic() - t:.1f} s")

    t = _step(2, f"training the default detector (no weights: log-mel statistics, per-ID "
                 f"density models) into {model}")
    cfg = load_train_config(None, seed=DEMO_SEED)
    result = fit_model(data, model, cfg, device="auto", progress=progress)
    print(f"      {result['n_windows']} windows, threshold {result['threshold']:.4g}, "
          f"{time.monotonic() - t:.1f} s")

    t = _step(3, f"evaluating on {data / 'test'}")
    metrics = evaluate(model, data, report=str(report), progress=progress)
    print(f"      done in {time.monotonic() - t:.1f} s")

    t = _step(4, f"replaying the test clips window by window into {jsonl}")
    with open(jsonl, "w") as f:
        summary = replay(Detector.load(model), data / "test", f, progress=progress)
    print(f"      done in {time.monotonic() - t:.1f} s")

    t = _step(5, "the pretrained encoder: efficientat + mahalanobis (needs its weights)")
    pretrained = run_pretrained_step(data, out / "model-efficientat", progress=progress)
    print(f"      {pretrained['note']}, {time.monotonic() - t:.1f} s")
    chosen, chosen_metrics = model, metrics
    if pretrained["metrics"] is not None and pretrained["metrics"]["auc"] > metrics["auc"]:
        chosen, chosen_metrics = pretrained["model"], pretrained["metrics"]

    t = _step(6, f"running the monitoring daemon with {chosen_metrics['model']} over a folder of "
                 f"clips into {out / 'monitor.jsonl'}")
    # The daemon listens to one machine: the ID the model separates best tells the clearest story.
    best_id = max(chosen_metrics["per_id"], key=lambda k: chosen_metrics["per_id"][k].get("auc", 0.0))
    monitor = run_monitor_step(chosen, data / "test", out, machine_id=int(best_id))
    print(f"      done in {time.monotonic() - t:.1f} s")

    print()
    print(f"harken demo summary ({time.monotonic() - started:.0f} s in all)")
    print(f"  model     {metrics['model']}  ({model})")
    print(f"  AUC       {metrics['auc']:.3f}   pAUC {metrics['pauc']:.3f}   "
          f"({metrics['n_normal']} normal, {metrics['n_anomaly']} anomalous test clips)")
    for key, v in metrics["per_id"].items():
        print(f"    id {key}  AUC {v['auc']:.3f}   pAUC {v['pauc']:.3f}")
    print(f"  threshold {metrics['threshold']:.4g}: flags {metrics['tpr_at_threshold']:.0%} of "
          f"anomalous and {metrics['fpr_at_threshold']:.0%} of normal clips")
    print(f"  replay    {summary['windows']} windows, {summary['anomalous_windows']} over threshold "
          f"-> {jsonl}")
    print(f"  report    {report}/ (roc.png, histogram.png, scores.csv)")
    if pretrained["metrics"] is not None:
        pm = pretrained["metrics"]
        print(f"  pretrained {pm['model']}: AUC {pm['auc']:.3f}   pAUC {pm['pauc']:.3f}  "
              f"({pretrained['model']})")
    else:
        print(f"  pretrained {pretrained['note']}")
    print(f"  monitor   {chosen_metrics['model']} on machine id {best_id}: {monitor['windows']} windows "
          f"from {monitor['files']} clips (normal, then anomalous, then normal): "
          f"{monitor['alarms']} alarm(s), {monitor['alarms_on_anomalous']} raised on anomalous "
          f"and {monitor['alarms_on_normal']} on normal clips")
    print(f"            mean score {monitor['mean_normal']:.3g} on normal and "
          f"{monitor['mean_anomaly']:.3g} on anomalous clips; {monitor['rule']}")
    if monitor["first_start"] is not None:
        end = monitor["first_end"]
        print(f"            first alarm on at clip {monitor['first_start']['clip_index']} "
              f"({monitor['first_start']['file']}), off at clip "
              f"{end['clip_index'] if end else '-'}{' (' + end['file'] + ')' if end else ' (still on)'}")
        print(f"            evidence {monitor['first_start']['image']}")
    print(f"            -> {monitor['jsonl']}")
    (out / "summary.json").write_text(json.dumps({"metrics": metrics, "replay": summary,
                                                   "pretrained": pretrained, "monitor": monitor},
                                                  indent=2, default=str))
    return 0


def run_pretrained_step(data: Path, model: Path, *, progress: bool) -> dict:
    """efficientat + knn,mahalanobis when its weights are in the weights directory (nothing to
    train: embed and fit statistics); otherwise say how to get them. Never downloads."""
    from monitor.errors import UsageError
    from monitor.weights.store import locate

    shutil.rmtree(model, ignore_errors=True)
    try:
        locate("efficientat")
    except UsageError:
        return {"model": None, "metrics": None,
                "note": "skipped: efficientat weights not in the weights directory (`harken weights "
                        "fetch efficientat` on a connected machine, or `harken weights import "
                        "efficientat FILE`)"}
    cfg = load_train_config(None, encoder="efficientat", seed=DEMO_SEED)
    fit_model(data, model, cfg, device="auto", progress=progress)
    m = evaluate(model, data, progress=progress)
    return {"model": str(model), "metrics": m, "note": f"AUC {m['auc']:.3f}"}


def _rule_text(r) -> str:
    what = f"rule {r.rule_words()}"
    level = (f"score {r.threshold:.3g}" if r.rule == "kofn" else
             f"{r.threshold:.3g} standard deviations of normal scores")
    budget = "" if r.budget_per_day is None else f" (budget {r.budget_per_day:.3g} a day)"
    return f"{what} at {level}{budget}"


def run_monitor_step(model: Path, test_dir: Path, out: Path, *, machine_id: int | None = None,
                     n_lead: int = 4, n_each: int = 6, hold_s: float = 20.0) -> dict:
    """The daemon in-process over `out/monitor-in/`: symlinks to n_lead normal clips of one
    machine ID (default the lowest), then n_each anomalous ones, then n_each normal ones again
    (the default rule's average takes a few windows to fall back), numbered so name order is
    play order; the JSONL sink goes to `out/monitor.jsonl`."""
    from monitor.artifact import load_artifact
    from monitor.daemon.thresholds import resolve_for_manifest
    from monitor.labels import find_audio, parse_clip

    clips = find_audio(test_dir)
    first_id = machine_id if machine_id is not None else min(parse_clip(p).machine_id or 0
                                                             for p in clips)
    pick = lambda label: [p for p in clips if parse_clip(p).label == label  # noqa: E731
                          and (parse_clip(p).machine_id or 0) == first_id]
    normal, anomaly = pick("normal"), pick("anomaly")
    order = normal[:n_lead] + anomaly[:n_each] + normal[n_lead:n_lead + n_each]
    folder = out / "monitor-in"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, p in enumerate(order, 1):
        os.symlink(p.resolve(), folder / f"{i:04d}_{p.name}")
    jsonl = out / "monitor.jsonl"
    jsonl.unlink(missing_ok=True)
    cfg = DaemonConfig(
        sources=(SourceConfig(id="demo", kind="folder", model=str(model), path=str(folder),
                              speed="max"),),
        node="demo", device="auto", state_dir=str(out / "monitor-state"), jsonl=str(jsonl),
        alarm=AlarmConfig(hold_s=hold_s))
    art = load_artifact(model)
    resolved = resolve_for_manifest(art.manifest, art.tensors, Path(model) / "manifest.json",
                                    cfg.alarm, hop_s=float(art.manifest.window_s), machine_id=None)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # alarm_started etc. are warnings: the summary tells them better
    try:
        Daemon(cfg).run()
    finally:
        root.setLevel(level)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    scores = [r for r in rows if r["kind"] == "score"]
    index = {Path(r["file"]).name: int(Path(r["file"]).name[:4]) for r in scores}
    events = [r for r in rows if r["kind"] == "event"]

    def describe(kind: str) -> dict | None:
        e = next((e for e in events if e["type"] == kind), None)
        if e is None:
            return None
        name = Path(e["detail"].get("file", "")).name
        return {"ts": e["ts"], "file": name, "clip_index": index.get(name), "image": e["image"]}

    is_anomaly = [parse_clip(r["file"]).label == "anomaly" for r in scores]
    starts = [e for e in events if e["type"] == "start"]
    # An alarm is raised by the window that takes the rule over its threshold: the clip of
    # that window says whether it answered anomalous audio.
    start_labels = [parse_clip(Path(e["detail"].get("file", "x"))).label for e in starts]
    mean = lambda flag: float(np.mean([r["score"] for r, a in zip(scores, is_anomaly)  # noqa: E731
                                       if a == flag] or [np.nan]))
    return {"files": len(order), "windows": len(scores), "mean_normal": mean(False),
            "mean_anomaly": mean(True), "threshold": scores[0]["threshold"] if scores else float("nan"),
            "rule": _rule_text(resolved),
            "alarms": len(starts),
            "alarms_on_anomalous": sum(lab == "anomaly" for lab in start_labels),
            "alarms_on_normal": sum(lab != "anomaly" for lab in start_labels),
            "first_start": describe("start"), "first_end": describe("end"), "jsonl": str(jsonl)}
