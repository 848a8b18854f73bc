"""`make demo`: the whole job on embedded defaults, no broker, no microphone, no downloads.

synth a small slide-rail set -> train the seed's mel+MLP baseline -> evaluate with a report ->
replay the test clips as JSON lines -> print a summary.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from monitor.detector import Detector
from monitor.replay import replay
from train.config import load_train_config
from train.evaluate import evaluate
from train.fit import fit_model
from train.synth import write_dataset

DEMO_IDS = (0, 1, 2)
DEMO_SEED = 2026


def _step(n: int, text: str) -> float:
    print(f"[{n}/4] {text}", flush=True)
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

    t = _step(2, f"training the seed's log-mel MLP autoencoder into {model}")
    # The seed trains up to 500 epochs; the demo caps at 30 to finish in a few minutes.
    cfg = load_train_config(None, max_epochs=30, seed=DEMO_SEED)
    result = fit_model(data, model, cfg, device="auto", progress=progress)
    print(f"      {result['epochs']} epochs, {result['parameters']:,} parameters, "
          f"threshold {result['threshold']:.4g}, {time.monotonic() - t:.1f} s")

    t = _step(3, f"evaluating on {data / 'test'}")
    metrics = evaluate(model, data, report=str(report), progress=progress)
    print(f"      done in {time.monotonic() - t:.1f} s")

    t = _step(4, f"replaying the test clips window by window into {jsonl}")
    with open(jsonl, "w") as f:
        summary = replay(Detector.load(model), data / "test", f, progress=progress)
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
    (out / "summary.json").write_text(json.dumps({"metrics": metrics, "replay": summary}, indent=2))
    return 0
