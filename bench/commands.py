"""bench's sub-command of `harken`: `harken bench` (inference speed; `--daemon`: sustained
sources). Registered through the `harken.commands` entry-point group (see monitor/cli.py)."""

from __future__ import annotations

import json
import sys

from monitor.errors import UsageError


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} takes integers >= 1, got {text!r}")
    return values


def cmd_bench(args) -> int:
    from bench.inference_bench import daemon_bench, run_bench, speedups, to_json

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


def register(sub, weights_actions: dict) -> None:
    """Add `harken bench` to `harken`'s subparsers."""
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
