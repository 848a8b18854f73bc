"""train's sub-commands of `harken`: synth, train, evaluate, compare, demo, weights fetch and
import. Registered through the `harken.commands` entry-point group (see monitor/cli.py)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from monitor.cli import show_progress, writable_dir
from monitor.errors import UsageError


def _ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("at least one machine ID is needed")
    return ids


def cmd_synth(args) -> int:
    from train.synth import write_dataset

    summary = write_dataset(Path(args.out), ids=args.ids, n_train=args.train,
                            n_test_normal=args.test_normal, n_test_anomaly=args.test_anomaly,
                            snr_db=args.snr_db, seed=args.seed, progress=show_progress(args))
    print(json.dumps(summary) if args.json else _synth_text(args.out, summary))
    return 0


def _synth_text(out, summary: dict) -> str:
    return f"wrote {summary.get('total_files', '?')} clips to {out} ({json.dumps(summary.get('counts', summary))})"


def cmd_train(args) -> int:
    from train.config import load_train_config
    from train.fit import fit_model

    cfg = load_train_config(args.config, encoder=args.encoder, decoder=args.decoder,
                            scorers=args.scorer, weights=args.weights, seed=args.seed,
                            embedding=args.embedding,
                            max_epochs=args.max_epochs, fine_tune=args.fine_tune or None)
    from monitor.artifact import check_model_dir

    check_model_dir(args.out)  # before hours of training, not after
    created = not Path(args.out).exists()
    writable_dir(args.out, "model")
    try:
        result = fit_model(args.data, args.out, cfg, device=args.device, progress=show_progress(args))
    except BaseException:
        if created:  # a failed run leaves nothing behind that looks like a model
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    else:
        print(f"model saved to {result['model']}: {result['n_windows']} windows, "
              f"{result['epochs']} epochs, threshold {result['threshold']:.6g}")
        cal = result.get("calibration")
        if cal:
            print(f"calibrated tail: {cal['method']} over {cal['scores']} out-of-fold normal "
                  f"scores ({cal['folds']} folds, {cal['exceedances']} above the 90th "
                  f"percentile); the daemon sets thresholds from alarm.false_alarms_per_day")
        else:
            print("no calibrated tail (calibrate: false, too few clips per machine ID, or a "
                  "fine-tuned encoder): the daemon uses the stored threshold")
        if result.get("fine_tune"):
            ft = result["fine_tune"]
            print(f"fine-tuned encoder: held-out loss {ft['val_loss_before']:.6g} -> "
                  f"{ft['val_loss_after']:.6g} (best epoch {ft['best_epoch']} of {ft['epochs']}; 0: the frozen "
                  f"encoder was kept)")
    return 0


def cmd_evaluate(args) -> int:
    from train.evaluate import evaluate

    if args.report:
        writable_dir(args.report, "report")
    if args.stream:
        return _evaluate_stream(args)
    m = evaluate(args.model, args.data, device=args.device, report=args.report,
                 progress=show_progress(args), precision=args.precision)
    if args.json:
        print(json.dumps(m))
        return 0
    print(f"{m['model']}: AUC {m['auc']:.4f}  pAUC {m['pauc']:.4f}  "
          f"({m['n_normal']} normal, {m['n_anomaly']} anomalous clips)")
    for key, v in m["per_id"].items():
        if "auc" in v:
            print(f"  id {key}: AUC {v['auc']:.4f}  pAUC {v['pauc']:.4f}  "
                  f"({v['n_normal']} normal, {v['n_anomaly']} anomalous)")
    print(f"  harmonic mean over IDs: AUC {m['hmean_auc']:.4f}  pAUC {m['hmean_pauc']:.4f}")
    for name, v in m.get("per_fault", {}).items():
        print(f"  fault {name}: AUC {v['auc']:.4f}  pAUC {v['pauc']:.4f}  ({v['n_anomaly']} anomalous)")
    for band, v in m.get("per_severity", {}).items():
        print(f"  severity {band} ({v['range'][0]:.2f}-{v['range'][1]:.2f}): AUC {v['auc']:.4f}  "
              f"({v['n_anomaly']} anomalous)")
    if "tpr_at_threshold" in m:
        print(f"  at threshold {m['threshold']:.6g}: TPR {m['tpr_at_threshold']:.3f}  "
              f"FPR {m['fpr_at_threshold']:.3f}")
    if m.get("alarm"):
        a = m["alarm"]
        # ewma / cusum: the per-window level is what one window alone would need
        level = "" if a["rule"] == "kofn" else " at the level of one window alone"
        print(f"  at the daemon's default alarm (rule {a['rule']}, budget {a['budget_per_day']:.3g}/day): "
              f"window FPR {a['window_fpr']:.4f}  TPR {a['window_tpr']:.3f}{level}; normal clips back to "
              f"back ({a['normal_hours']:g} h): {a['false_alarm_episodes']} false alarms, "
              f"expected {a['expected_false_alarms_per_day']:.3g}/day "
              "(harken evaluate --stream for long streams and detection delay)")
    if args.report:
        rep = m["report"]
        print(f"  report: {rep['scores']}, {rep['roc']}, {rep['histogram']}")
        if rep.get("evidence"):
            print(f"  evidence for the {len(rep['evidence'])} most anomalous clips: "
                  f"{Path(rep['evidence'][0]).parent}/")
    return 0


def fault_lines(per_fault: dict) -> list[str]:
    """One line per fault type of stream_eval's `per_fault`, its severities after it."""
    from train.stream_eval import DETECT_WITHIN_S

    within = int(DETECT_WITHIN_S)

    def one(v):
        auc = "n/a" if v["window_auc"] is None else f"{v['window_auc']:.3f}"
        return (f"{100 * v[f'alarmed_within_{within}s']:.0f}% within {within} s "
                f"({100 * v['alarmed']:.0f}% at all) of {v['streams']}, window AUC {auc}")

    out = []
    for name, v in per_fault.items():
        out.append(f"{name}: {one(v)}")
        for sev, w in v.get("by_severity", {}).items():
            out.append(f"  severity {sev}: {one(w)}")
    return out


def _evaluate_stream(args) -> int:
    """`harken evaluate --stream`: false alarms per day and detection delays (train/stream_eval.py)."""
    from monitor.daemon.config import AlarmConfig
    from monitor.daemon.thresholds import rule_problems
    from train.stream_eval import evaluate_streams

    budget = {} if args.false_alarms_per_day is None else {"false_alarms_per_day": args.false_alarms_per_day}
    alarm = AlarmConfig(rule=args.rule, **budget)
    problems = rule_problems(alarm, "alarm")
    if problems:
        raise UsageError(problems[0].replace("alarm.rule", "--rule").replace(
            "alarm.false_alarms_per_day", "--false-alarms-per-day"))
    if not (math.isfinite(args.hop_s) and 0.1 <= args.hop_s <= 10.0):
        raise UsageError(f"--hop-s must be a number of seconds in 0.1-10, got {args.hop_s}")
    m = evaluate_streams(args.model, args.data, alarm, hop_s=args.hop_s, device=args.device,
                         report=args.report, progress=show_progress(args))
    if args.json:
        print(json.dumps(m))
        return 0

    def f(x, fmt=".3g"):
        return "n/a" if x is None else format(x, fmt)

    print(f"{m['model']}, rule {m['rule']}, budget {m['budget_per_day']:.4g} false alarms/day, "
          f"hop {m['hop_s']:g} s")
    print(f"  healthy audio: {m['normal_hours']:g} h, {m['false_alarm_episodes']} false alarms "
          f"({f(m['observed_false_alarms_per_day'])}/day observed, "
          f"{f(m['expected_false_alarms_per_day'])}/day expected), window FPR {f(m['window_fpr'])}")
    for key, v in m["per_id"].items():
        print(f"    id {key}: threshold {v['threshold']:.6g} ({v['origin']}), {v['false_alarms']} "
              f"false alarms in {v['hours']:g} h, expected {f(v['expected_per_day'])}/day")
    if m["streams"]:
        print(f"  faulty streams: {m['streams']}, alarmed {100 * m['streams_alarmed']:.1f}%, within "
              f"60 s {100 * m['streams_alarmed_within_60s']:.1f}%, delay median "
              f"{f(m['delay_s_median'])} s, p90 {f(m['delay_s_p90'])} s, window TPR {f(m['window_tpr'])}; "
              f"{m['lead_in_false_alarms']} alarms in their healthy lead-ins")
        for line in fault_lines(m["per_fault"]):
            print("    " + line)
    if m.get("report"):
        print(f"  trade-off plot: {m['report']['tradeoff']}")
    return 0


def cmd_compare(args) -> int:
    from train.compare import DEFAULT_SCORERS, compare
    from train.config import load_train_config

    base = load_train_config(args.config, max_epochs=args.max_epochs, seed=args.seed)
    split = lambda text: [x for x in text.split(",") if x] if text else None  # noqa: E731
    split_scorers = split  # "," separates systems; "+" fuses scorers within one: diag+knn
    compare(args.data, args.out, encoders=split(args.encoders),
            decoders=split(args.decoders) or ("mlp", "unet", "cnn"),
            scorers=split_scorers(args.scorers) or DEFAULT_SCORERS, seeds=args.seeds,
            base=base, device=args.device, progress=show_progress(args))
    print((Path(args.out) / "compare.md").read_text())
    print(f"table: {Path(args.out) / 'compare.md'}, {Path(args.out) / 'compare.csv'}; "
          f"plot: {Path(args.out) / 'compare.png'}")
    return 0


def cmd_demo(args) -> int:
    from train.demo import run_demo

    return run_demo(Path(args.out), progress=show_progress(args))


def cmd_weights_fetch(args) -> int:
    from train.weights import fetch_weights

    _need_name(args)
    print(f"{args.name}: weights in {fetch_weights(args.name, force=args.force)}")
    return 0


def cmd_weights_import(args) -> int:
    from train.weights import import_weights

    _need_name(args)
    if not args.path:
        raise UsageError("weights import needs a PATH: a checkpoint file or a model directory")
    print(f"{args.name}: weights in {import_weights(args.name, args.path, force=args.force)}")
    return 0


def _need_name(args) -> None:
    if not args.name:
        raise UsageError(f"weights {args.action} needs an encoder name, e.g. `harken weights {args.action} ast`")


def register(sub, weights_actions: dict) -> None:
    """Add train's sub-commands to `harken`'s subparsers and its `weights` actions."""
    s = sub.add_parser("synth", help="generate a synthetic slide-rail data set (DCASE layout)")
    s.add_argument("out", help="output directory (must not exist or be empty)")
    s.add_argument("--ids", type=_ids, default=(0, 1, 2), help="machine IDs, e.g. 0,1,2")
    s.add_argument("--train", type=int, default=100, help="normal training clips per ID")
    s.add_argument("--test-normal", type=int, default=30, help="normal test clips per ID")
    s.add_argument("--test-anomaly", type=int, default=30, help="anomalous test clips per ID")
    s.add_argument("--snr-db", type=float, default=0.0, help="machine-to-background ratio, dB")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_synth)

    t = sub.add_parser("train", help="train a model artifact on normal clips")
    t.add_argument("--data", required=True, help="data directory (uses DATA/train when it exists)")
    t.add_argument("--out", required=True, help="model directory to write")
    t.add_argument("--encoder", default=None,
                   help="stats (default: no weights), mel, conv, efficientat, ast, panns, "
                        "wav2vec2, resnet50")
    t.add_argument("--decoder", default=None, help="for the recon scorer: mlp (default), unet, cnn")
    t.add_argument("--scorer", default=None,
                   help="comma-separated: diag, mahalanobis, knn, recon, each optionally "
                        "on a named view (diag@shape); several are fused (default by encoder: "
                        "stats diag,diag@shape,mahalanobis; mel/conv recon; pretrained "
                        "mahalanobis)")
    t.add_argument("--weights", default=None, help="encoder weights file (pretrained encoders)")
    t.add_argument("--embedding", default=None,
                   help="encoder-specific embedding (efficientat: pooled384, hidden512, both)")
    t.add_argument("--config", default=None, help="YAML with training settings (see config/)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--max-epochs", type=int, default=None)
    t.add_argument("--fine-tune", action="store_true",
                   help="also train the encoder, end to end with --decoder cnn and the recon "
                        "scorer (pretrained encoders only; encoder LR: fine_tune_lr in --config)")
    t.add_argument("--json", action="store_true")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="AUC / pAUC of a model on labelled test clips")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True, help="data directory (uses DATA/test when it exists)")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    e.add_argument("--report", default=None, help="directory for scores.csv, roc.png, histogram.png")
    e.add_argument("--device", default="auto")
    e.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 (CUDA): autocast")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--stream", action="store_true",
                   help="DATA has normal/ and streams/<name>/: replay them as continuous streams "
                        "through the daemon's alarm code (false alarms/day, detection delay)")
    e.add_argument("--hop-s", type=float, default=10.0, help="--stream: window hop (default 10)")
    e.add_argument("--rule", default="auto",
                   help="--stream: auto (the daemon's default: ewma on a calibrated model) | "
                        "kofn | ewma | cusum")
    e.add_argument("--false-alarms-per-day", type=float, default=None,
                   help="--stream: the budget (default: the daemon's, one a week)")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("compare", help="train and evaluate every encoder x decoder/scorer pair")
    c.add_argument("--data", required=True, help="data directory with train/ and test/")
    c.add_argument("--out", required=True, help="report directory (compare.md, .csv, .png)")
    c.add_argument("--encoders", default=None, help="comma-separated (default: all registered)")
    c.add_argument("--decoders", default=None, help="comma-separated (default: mlp,unet,cnn)")
    c.add_argument("--scorers", default=None,
                   help="comma-separated systems; + fuses scorers into one, e.g. default,knn,diag+knn "
                        "(default: default,recon,knn,mahalanobis,diag; default = train's choice "
                        "for the encoder)")
    c.add_argument("--seeds", type=int, default=1, help="retrain each pair with N seeds")
    c.add_argument("--config", default=None, help="YAML with training settings for every pair")
    c.add_argument("--max-epochs", type=int, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--device", default="auto")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="synth, train, evaluate and replay on embedded defaults")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    weights_actions["fetch"] = cmd_weights_fetch
    weights_actions["import"] = cmd_weights_import
