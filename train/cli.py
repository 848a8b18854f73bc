"""The `harken` command. It lives in `train` because it offers both sides: training commands and,
through `monitor.daemon.commands`, the runtime ones (`monitor` never imports `train`)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path

from monitor import __version__
from monitor.errors import HarkenError, UsageError
from monitor.logs import configure_logging, get_logger


def _ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("at least one machine ID is needed")
    return ids


def _writable_dir(path: str, what: str) -> None:
    """Create an output directory up front: a bad path should fail before hours of work."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / ".harken-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the {what} there ({exc.strerror or exc})") from None


def _progress(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


# --------------------------------------------------------------------------- commands


def cmd_synth(args) -> int:
    from train.synth import write_dataset

    summary = write_dataset(Path(args.out), ids=args.ids, n_train=args.train,
                            n_test_normal=args.test_normal, n_test_anomaly=args.test_anomaly,
                            snr_db=args.snr_db, seed=args.seed, progress=_progress(args))
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
    _writable_dir(args.out, "model")
    try:
        result = fit_model(args.data, args.out, cfg, device=args.device, progress=_progress(args))
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
        _writable_dir(args.report, "report")
    if args.stream:
        return _evaluate_stream(args)
    m = evaluate(args.model, args.data, device=args.device, report=args.report,
                 progress=_progress(args), precision=args.precision)
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
        print(f"  at the daemon's default alarm (rule {a['rule']}, budget {a['budget_per_day']:.3g}/day): "
              f"window FPR {a['window_fpr']:.4f}  TPR {a['window_tpr']:.3f}; normal clips back to "
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
                         report=args.report, progress=_progress(args))
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
    if m.get("report"):
        print(f"  trade-off plot: {m['report']['tradeoff']}")
    return 0


def cmd_replay(args) -> int:
    from monitor.audio import MIN_HOP_S
    from monitor.detector import Detector
    from monitor.labels import find_audio
    from monitor.replay import check_output_path, replay

    if args.hop_s is not None and not (math.isfinite(args.hop_s) and args.hop_s >= MIN_HOP_S):
        raise UsageError(f"--hop-s must be a number >= {MIN_HOP_S} (seconds), got {args.hop_s}")
    files = find_audio(args.dir)
    to_file = bool(args.out) and args.out != "-"
    if to_file:
        check_output_path(args.out, files, model=args.model, what="replay output")
    detector = Detector.load(args.model, device=args.device, precision=args.precision)
    if to_file:
        # Written next to its final name and renamed at the end: an earlier result is replaced
        # only by a complete new one.
        with atomic_text_file(args.out, "JSONL") as f:
            summary = replay(detector, Path(args.dir), f, hop_s=args.hop_s, files=files,
                             progress=_progress(args))
    else:
        summary = replay(detector, Path(args.dir), sys.stdout, hop_s=args.hop_s, files=files)
    get_logger(stage="replay").info("replay_done", **summary)
    return 0


@contextlib.contextmanager
def atomic_text_file(path: str | Path, what: str):
    """A text file written to a temporary sibling, fsynced and renamed onto `path` on success;
    removed on failure (the old file, if any, stays)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        f = open(tmp, "w")
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the {what} there ({exc.strerror or exc})") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cmd_compare(args) -> int:
    from train.compare import DEFAULT_SCORERS, compare
    from train.config import load_train_config

    base = load_train_config(args.config, max_epochs=args.max_epochs, seed=args.seed)
    split = lambda text: [x for x in text.split(",") if x] if text else None  # noqa: E731
    split_scorers = split  # "," separates systems; "+" fuses scorers within one: diag+knn
    compare(args.data, args.out, encoders=split(args.encoders),
            decoders=split(args.decoders) or ("mlp", "unet", "cnn"),
            scorers=split_scorers(args.scorers) or DEFAULT_SCORERS, seeds=args.seeds,
            base=base, device=args.device, progress=_progress(args))
    print((Path(args.out) / "compare.md").read_text())
    print(f"table: {Path(args.out) / 'compare.md'}, {Path(args.out) / 'compare.csv'}; "
          f"plot: {Path(args.out) / 'compare.png'}")
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} takes integers >= 1, got {text!r}")
    return values


def cmd_bench(args) -> int:
    from train.bench import daemon_bench, run_bench, speedups, to_json

    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.seconds is not None and args.seconds <= 0:
        raise UsageError(f"--seconds must be > 0, got {args.seconds}")
    if args.daemon:
        encoders = args.encoder or ["efficientat"]
        if len(encoders) != 1:
            raise UsageError("--daemon benchmarks one --encoder at a time (mel or efficientat)")
        if args.time_scale <= 0 or args.budget_s <= 0:
            raise UsageError("--time-scale and --budget-s must be > 0")
        candidates = _int_list(args.sources, "--sources") if args.sources else None
        result = daemon_bench(encoders[0], candidates=candidates, seconds=args.seconds or 10.0,
                              time_scale=args.time_scale, budget_s=args.budget_s,
                              weights=args.weights, device=args.device, threads=args.threads,
                              log=log)
        if args.json:
            print(json.dumps(result))
        elif "skipped" not in result:
            real = result["max_equivalent_realtime_sources"]
            print(f"{result['encoder']}: {result['max_sources']} sources at time_scale "
                  f"{result['time_scale']:g} (= {real:g} real-time sources at a {result['hop_s']:g}-s "
                  f"hop) with zero dropped windows; window-end-to-score latency p50 "
                  f"{result['latency_ms_p50']} ms, p95 {result['latency_ms_p95']} ms"
                  + (" (time budget ran out: the search stopped early)"
                     if result["budget_exhausted"] else ""))
        return 0
    if args.sources:
        raise UsageError("--sources goes with --daemon")
    batches = _int_list(args.batch, "--batch")
    precisions = tuple(args.precision.split(",")) if args.precision else None
    if not args.json:
        print("harken bench: random-initialised weights unless noted (timing does not depend on them)")
    rows = run_bench(args.encoder or ["mel", "efficientat"], device=args.device, batches=batches,
                     seconds=args.seconds or 5.0, precisions=precisions, threads=args.threads,
                     weights=args.weights, log=log)
    if args.json:
        print(to_json(rows))
        return 0
    print()
    for name, s in speedups(rows).items():
        print(f"{name}: harken {s['best_windows_per_s']:.1f} windows/s ({s['best']}) vs reference "
              f"{s['reference_windows_per_s']:.1f} windows/s: {s['speedup']:.2f}x "
              f"(reference/harken time per window b/a = {s['reference_over_harken_time']:.2f})")
    import os

    import torch

    load = os.getloadavg()[0]
    print(f"peak RSS {max(r.peak_rss_mb for r in rows):.0f} MB; {torch.get_num_threads()} torch "
          f"threads, load average {load:.1f} on {os.cpu_count()} CPUs")
    if torch.get_num_threads() > 1 and load > (os.cpu_count() or 1):
        # Spinning intra-op threads on an oversubscribed machine cost up to 10x here.
        print("the machine is busy: compare with --threads 1 (and `threads: 1` in the daemon)")
    return 0


def cmd_demo(args) -> int:
    from train.demo import run_demo

    return run_demo(Path(args.out), progress=_progress(args))


def cmd_weights(args) -> int:
    from monitor.encoders.registry import ENCODERS
    from monitor.weights import store as w
    from train.weights import fetch_weights, import_weights

    if args.action == "list":
        rows = [w.check_weights(name) for name in ENCODERS]
        if args.json:
            print(json.dumps({"weights_dir": str(w.weights_dir()), "encoders": [r.to_json() for r in rows]}))
            return 0
        print(f"weights directory: {w.weights_dir()}")
        for r in rows:
            size = f"{r.size_bytes / 1e6:.1f} MB" if r.size_bytes is not None else "-"
            where = str(r.path) if r.path else "-"
            print(f"  {r.encoder:11s} {r.check:12s} {size:>10s}  {where}")
        return 0
    if args.action in ("fetch", "import") and not args.name:
        raise UsageError(f"weights {args.action} needs an encoder name, e.g. `harken weights {args.action} ast`")
    if args.action == "fetch":
        print(f"{args.name}: weights in {fetch_weights(args.name, force=args.force)}")
        return 0
    if args.action == "import":
        if not args.path:
            raise UsageError("weights import needs a PATH: a checkpoint file or a model directory")
        print(f"{args.name}: weights in {import_weights(args.name, args.path, force=args.force)}")
        return 0
    names = [args.name] if args.name else [n for n in w.KNOWN]
    if args.name and args.name not in w.KNOWN:
        raise UsageError(f"{args.name!r} has no pretrained weights; encoders with weights: {', '.join(w.KNOWN)}")
    failed = False
    for name in names:
        r = w.check_weights(name)
        if r.check == "absent" and args.name:
            w.locate(name)  # the one-line "not found ... fetch/import" error
        print(f"{name}: {r.check}" + (f" ({r.path})" if r.path else ""))
        for problem in r.problems:
            print(f"  {problem}", file=sys.stderr)
        failed |= r.check == "mismatch"
    if failed:
        raise HarkenError("weights verification failed: corrupted or replaced files listed above")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harken", description="Listen to machines: learn what normal "
                                "sounds like, flag what does not.")
    p.add_argument("--version", action="version", version=f"harken {__version__}")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    e.add_argument("--rule", default="kofn", help="--stream: kofn | ewma | cusum")
    e.add_argument("--false-alarms-per-day", type=float, default=None,
                   help="--stream: the budget (default: the daemon's, one a week)")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("replay", help="score every window of every WAV in a folder (JSON lines)")
    r.add_argument("dir")
    r.add_argument("--model", required=True)
    r.add_argument("--hop-s", type=float, default=None, help="window hop in seconds (default 10)")
    r.add_argument("--out", default=None, help="JSONL file (default stdout)")
    r.add_argument("--device", default="auto")
    r.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 (CUDA): autocast")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_replay)

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

    b = sub.add_parser("bench", help="inference speed: harken's path vs the reference pipeline; "
                                     "--daemon: how many real-time sources the daemon sustains")
    b.add_argument("--encoder", action="append",
                   help="encoder to time (repeatable; default mel, efficientat; --daemon: efficientat)")
    b.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    b.add_argument("--batch", default="1,8,32", help="batch sizes, comma-separated")
    b.add_argument("--seconds", type=float, default=None,
                   help="time per measurement (default 5); --daemon: wall seconds per run (default 10)")
    b.add_argument("--precision", default=None, help="fp32,bf16 (default both) or fp16 on CUDA")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    b.add_argument("--weights", default=None,
                   help="efficientat weights file (default: the weights directory, $HARKEN_WEIGHTS_DIR)")
    b.add_argument("--daemon", action="store_true",
                   help="run the whole daemon on simulated real-time folder sources")
    b.add_argument("--sources", default=None,
                   help="--daemon: source counts to try, e.g. 1,2,4 (default: search by doubling "
                        "then bisecting)")
    b.add_argument("--time-scale", type=float, default=10.0,
                   help="--daemon: replay this many times faster than real time (default 10)")
    b.add_argument("--budget-s", type=float, default=300.0,
                   help="--daemon: stop the search after this many seconds (default 300)")
    b.add_argument("--json", action="store_true", help="one JSON object on stdout")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="synth, train, evaluate and replay on embedded defaults")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    wt = sub.add_parser("weights", help="pretrained encoder weights: list, fetch, import, verify")
    wt.add_argument("action", choices=["list", "fetch", "import", "verify"])
    wt.add_argument("name", nargs="?", help="encoder (ast, panns, wav2vec2, resnet50, efficientat)")
    wt.add_argument("path", nargs="?", help="import: checkpoint file or Hugging Face model directory")
    wt.add_argument("--force", action="store_true", help="replace weights that are already there")
    wt.add_argument("--json", action="store_true", help="list: one JSON object on stdout")
    wt.set_defaults(func=cmd_weights)

    from monitor.daemon import commands as daemon_commands

    daemon_commands.register(sub)
    return p


# Errors of the machine's disks that the user fixes (space, quota, a read-only mount,
# permissions): one line, exit 2, wherever they surface.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so every `finally` and clean-up runs as for
    Ctrl-C (a half-written model or data set is removed)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.command != "monitor":  # the daemon installs its own graceful-stop handler
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except HarkenError as exc:
        print(f"harken: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("harken: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("harken: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `harken evaluate --json | head`: the reader left; not an error worth a traceback.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            get_logger().exception("unexpected_error", command=args.command)
            return 1
        where = f"{exc.filename}: " if exc.filename else ""
        hint = "; free some space and run it again" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"harken: error: {where}{exc.strerror or exc}{hint}", file=sys.stderr)
        return 2
    except Exception:  # unexpected: keep the traceback for the bug report
        get_logger().exception("unexpected_error", command=args.command)
        return 1


if __name__ == "__main__":
    sys.exit(main())
